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

    /// Flattened `[N, K]` outputs with only layer `layer`'s input quantized to `bits`
    /// (per-tensor affine over the batch's range, MSE-shrunk below 8 bits as calibration does;
    /// every reader of that value sees it quantized, as in the emitted graph).
    pub fn with_input_bits(&mut self, layer: usize, bits: u8) -> Result<Vec<f32>> {
        let &(node, _) = self
            .layers
            .get(layer)
            .ok_or_else(|| Error::Internal(format!("sensitivity asked for layer {layer}")))?;
        let g = &self.plan.graph;
        let v = g.nodes[node]
            .input(0)
            .ok_or_else(|| Error::Internal(format!("layer {layer} has no input")))?;
        let Some(x) = self.cache.get(v).cloned().flatten() else {
            return Err(Error::Internal(format!(
                "no cached value for the input of layer {layer}"
            )));
        };
        let shape = x.dims().to_vec();
        let vals = x.flatten_all()?.to_vec1::<f32>()?;
        let (lo, hi) = vals
            .iter()
            .fold((0f32, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
        let (lo, hi) = if bits < 8 {
            let step = (vals.len() / 16_384).max(1);
            let sample: Vec<f32> = vals.iter().step_by(step).copied().collect();
            zq_quant::range::mse_range(&sample, lo, hi, bits)
        } else {
            (lo, hi)
        };
        let q = zq_quant::ActQuant::unsigned(lo, hi, bits);
        let fake: Vec<f32> = vals.iter().map(|&v| q.fake(v)).collect();
        let mut cache = self.cache.clone();
        cache[v] = Some(Tensor::from_vec(
            fake,
            shape.as_slice(),
            self.plan.device(),
        )?);
        // Start at the first step that reads the value.
        let from = (0..self.plan.steps_len())
            .find(|&si| {
                g.nodes[self.plan.node_of_step(si)]
                    .inputs
                    .contains(&Some(v))
            })
            .unwrap_or(0);
        let out = self.plan.run_from(&cache, from, None)?;
        Ok(out[0].flatten_all()?.to_vec1::<f32>()?)
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
