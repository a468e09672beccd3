//! zq's executor as a `zq_synth::TapModel`: BatchNormalization inputs are tapped through the graph
//! (each BN's own input value), so pairing never depends on layer order.

use candle_core::Tensor;
use zq_synth::{Autograd, BnTarget, Coeffs, Moments, TapGrad, TapModel};

use crate::error::{Error, Result};
use crate::exec::tape::Tape;
use crate::exec::{Plan, RunOptions};
use crate::ir::{Graph, Op, ValueId};

pub struct PlanTaps {
    pub plan: Plan,
    taps: Vec<ValueId>,
    targets: Vec<BnTarget>,
}

impl PlanTaps {
    /// Specialise `g` for `batch` and collect every BatchNormalization layer's statistics.
    /// A model without BatchNormalization is an error: there is nothing to match.
    pub fn new(g: &Graph, batch: usize) -> Result<PlanTaps> {
        let plan = Plan::new(g, batch)?;
        let pg = &plan.graph;
        let mut taps = Vec::new();
        let mut targets = Vec::new();
        for n in &pg.nodes {
            let Op::BatchNorm { epsilon } = n.op else {
                continue;
            };
            let param = |i: usize| -> Result<Vec<f32>> {
                n.input(i)
                    .and_then(|v| pg.konst(v))
                    .map(|t| t.to_f32_vec())
                    .ok_or_else(|| {
                        Error::node(&n.name, n.op.name(), "running statistics must be constants")
                    })
            };
            let (mean, var) = (param(3)?, param(4)?);
            taps.push(n.input(0).unwrap());
            targets.push(BnTarget {
                name: n.name.clone(),
                mean,
                std: var.iter().map(|v| (v + epsilon).sqrt()).collect(),
                eps: epsilon,
            });
        }
        if targets.is_empty() {
            return Err(Error::Usage(
                "the model has no BatchNormalization layers, so there are no statistics to distil data from; export it keeping BatchNormalization (PyTorch: torch.onnx.export(..., training=torch.onnx.TrainingMode.PRESERVE, dynamo=False))".into(),
            ));
        }
        Ok(PlanTaps {
            plan,
            taps,
            targets,
        })
    }
}

impl PlanTaps {
    /// The engine distillation steps through: the tape when it runs every op on the way to the
    /// BatchNormalization inputs, else candle's autograd over the general executor.
    pub fn engine(&self) -> Box<dyn TapGrad + '_> {
        self.engine_named().0
    }

    /// [`PlanTaps::engine`] and its name for reports: `tape`, or `autograd (<why not the tape>)`.
    pub fn engine_named(&self) -> (Box<dyn TapGrad + '_>, String) {
        match self.tape() {
            Ok(t) => (Box::new(t), "tape".into()),
            Err(e) => (Box::new(Autograd::new(self)), format!("autograd ({e})")),
        }
    }

    /// The tape engine alone; `Err` names what it does not run.
    pub fn tape(&self) -> std::result::Result<TapeTaps<'_>, String> {
        Ok(TapeTaps {
            tape: Tape::new(&self.plan, &self.taps)?,
            model: self,
        })
    }
}

/// [`Tape`] as a [`TapGrad`].
pub struct TapeTaps<'a> {
    tape: Tape,
    model: &'a PlanTaps,
}

impl TapGrad for TapeTaps<'_> {
    fn input_shape(&self) -> Vec<usize> {
        self.model.input_shape()
    }
    fn bn_targets(&self) -> &[BnTarget] {
        &self.model.targets
    }
    fn forward(&mut self, x: &[f32]) -> candle_core::Result<Vec<Moments>> {
        Ok(self.tape.forward(x))
    }
    fn backward(&mut self, coeffs: &[Coeffs]) -> candle_core::Result<Vec<f32>> {
        Ok(self.tape.backward(coeffs))
    }
}

impl TapModel for PlanTaps {
    fn input_shape(&self) -> Vec<usize> {
        self.plan.input_shape(0).to_vec()
    }
    fn bn_targets(&self) -> &[BnTarget] {
        &self.targets
    }
    fn forward_taps(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        let opts = RunOptions {
            taps: &self.taps,
            overrides: None,
        };
        self.plan
            .run_with(std::slice::from_ref(x), &opts)
            .map(|(_, t)| t)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}
