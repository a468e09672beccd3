//! zq's reference executor as zq-quant's [`Perturb`]: one layer's weights replaced, the run
//! starting at that layer from the cached FP32 activations of the calibration batch.

use std::collections::HashMap;

use candle_core::Tensor;
use zq_quant::sensitivity::Perturb;

use crate::error::{Error, Result};
use crate::exec::{Plan, RunOptions};
use crate::ir::ValueId;

pub struct PlanPerturb<'a> {
    plan: &'a Plan,
    input: &'a Tensor,
    /// Every value of one FP32 run.
    cache: Vec<Option<Tensor>>,
    /// Candidate layers: (node index in `plan.graph`, weight value).
    layers: &'a [(usize, ValueId)],
}

impl<'a> PlanPerturb<'a> {
    pub fn new(plan: &'a Plan, input: &'a Tensor, layers: &'a [(usize, ValueId)]) -> Result<Self> {
        let cache = plan.run_keep_all(std::slice::from_ref(input))?;
        Ok(PlanPerturb {
            plan,
            input,
            cache,
            layers,
        })
    }

    /// The FP32 output, flattened `[N, K]`.
    pub fn reference(&self) -> Result<Vec<f32>> {
        let opts = RunOptions {
            taps: &[],
            overrides: None,
        };
        let (y, _) = self
            .plan
            .run_with(std::slice::from_ref(self.input), &opts)?;
        Ok(y[0].flatten_all()?.to_vec1::<f32>()?)
    }
}

impl Perturb for PlanPerturb<'_> {
    type Error = Error;

    fn with_weights(&mut self, layer: usize, weights: Vec<f32>) -> Result<Vec<f32>> {
        let &(node, wv) = self
            .layers
            .get(layer)
            .ok_or_else(|| Error::Internal(format!("sensitivity asked for layer {layer}")))?;
        let shape = self
            .plan
            .graph
            .konst(wv)
            .map(|w| w.shape.clone())
            .unwrap_or_default();
        let t = Tensor::from_vec(weights, shape.as_slice(), self.plan.device())?;
        let overrides = HashMap::from([(wv, t)]);
        let from = self.plan.step_of(node).unwrap_or(0);
        let out = self.plan.run_from(&self.cache, from, Some(&overrides))?;
        Ok(out[0].flatten_all()?.to_vec1::<f32>()?)
    }
}
