//! `--refine adaround|genie`: block-wise reconstruction of a planned model on the calibration
//! images. The BN-folded graph is cut into blocks where a single value is live (a residual block
//! with its skip, or one layer where there is no block); each block's weights and activation
//! steps are fitted by zq-quant's [`reconstruct`] so that its output on the inputs the already
//! refined blocks produce matches the FP32 block's output, then hardened into the plan.

use std::collections::{HashMap, HashSet};

use candle_core::Tensor;
use serde::Serialize;
use zq_quant::bias::quantize_bias;
use zq_quant::refine::{
    reconstruct, run_batched, run_quantized, Block, LsqAct, RefineOptions, SoftWeight,
};
use zq_quant::{LayerQuant, QuantPlan};

use crate::error::{Error, Result};
use crate::exec::Plan;
use crate::ir::{Graph, ValueId};

/// One block: the nodes (by first output) between two cuts.
#[derive(Debug, Clone)]
pub struct BlockSpan {
    pub input: ValueId,
    pub output: ValueId,
    /// First outputs of the block's nodes.
    pub values: HashSet<ValueId>,
    /// Node indices in the graph, in order.
    pub nodes: Vec<usize>,
}

/// Cut `g` (topologically ordered, one input, one output) where exactly one non-constant value
/// is live; blocks without a weighted node join the block before them (or the first one after).
pub fn blocks(g: &Graph) -> Vec<BlockSpan> {
    let (Some(input), [output]) = (g.inputs.first().map(|i| i.value), g.outputs.as_slice()) else {
        return Vec::new();
    };
    let n = g.nodes.len();
    // Last node index reading each value (graph outputs live to the end).
    let mut last_read: HashMap<ValueId, usize> = HashMap::new();
    for (i, node) in g.nodes.iter().enumerate() {
        for v in node.inputs.iter().flatten() {
            if g.konst(*v).is_none() {
                last_read.insert(*v, i);
            }
        }
    }
    for v in &g.outputs {
        last_read.insert(*v, n);
    }
    // Live after node i: produced at or before i (or the input), read after i.
    let mut live: HashSet<ValueId> = HashSet::from([input]);
    let mut segments: Vec<(ValueId, Vec<usize>)> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut seg_input = input;
    for (i, node) in g.nodes.iter().enumerate() {
        current.push(i);
        for o in &node.outputs {
            live.insert(*o);
        }
        live.retain(|v| last_read.get(v).is_some_and(|&r| r > i));
        if live.len() == 1 {
            let v = *live.iter().next().unwrap();
            segments.push((seg_input, std::mem::take(&mut current)));
            seg_input = v;
        }
    }
    if !current.is_empty() {
        segments.push((seg_input, current));
    }
    // Merge weightless segments backwards (forwards for leading ones).
    let weighted = |s: &[usize]| s.iter().any(|&i| g.nodes[i].op.is_weighted());
    let mut merged: Vec<(ValueId, Vec<usize>)> = Vec::new();
    let mut pending: Option<(ValueId, Vec<usize>)> = None;
    for (inp, nodes) in segments {
        let (inp, nodes) = match pending.take() {
            Some((pi, mut pn)) => {
                pn.extend(nodes);
                (pi, pn)
            }
            None => (inp, nodes),
        };
        if weighted(&nodes) {
            merged.push((inp, nodes));
        } else if let Some(last) = merged.last_mut() {
            last.1.extend(nodes);
        } else {
            pending = Some((inp, nodes));
        }
    }
    if let Some(p) = pending {
        merged.push(p);
    }
    let k = merged.len();
    merged
        .iter()
        .enumerate()
        .map(|(b, (inp, nodes))| {
            let out = if b + 1 < k { merged[b + 1].0 } else { *output };
            BlockSpan {
                input: *inp,
                output: out,
                values: nodes
                    .iter()
                    .filter_map(|&i| g.nodes[i].outputs.first().copied())
                    .collect(),
                nodes: nodes.clone(),
            }
        })
        .collect()
}

/// What refinement did, per block and in all.
#[derive(Debug, Clone, Serialize)]
pub struct RefineReport {
    pub method: &'static str,
    pub iters: usize,
    pub batch: usize,
    pub images: usize,
    pub blocks: Vec<BlockReport>,
    pub seconds: f64,
    /// The model-level check on the held-out images (absent with `--holdout 0`).
    pub holdout: Option<HoldoutCheck>,
}

/// Refined against round-to-nearest on the held-out distilled images, by mean KL from FP32.
#[derive(Debug, Clone, Serialize)]
pub struct HoldoutCheck {
    pub kl_round_to_nearest: f64,
    pub kl_refined: f64,
    /// The refined model was further from FP32 there, so the written model is round to nearest.
    pub kept_round_to_nearest: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct BlockReport {
    /// The block's layers, by name.
    pub layers: Vec<String>,
    /// Output reconstruction error on the calibration images before and after.
    pub error_before: f64,
    pub error_after: f64,
    /// The refined block was worse than round-to-nearest on the calibration images, so the
    /// block keeps its round-to-nearest plan.
    pub kept_round_to_nearest: bool,
    pub seconds: f64,
}

/// A block of the planned graph run by the reference executor.
#[derive(Clone)]
struct GraphBlock<'a> {
    plans: &'a HashMap<usize, Plan>,
    steps: HashMap<usize, Vec<usize>>,
    input: ValueId,
    output: ValueId,
    /// The weight value of each soft layer, in the order of the weights passed in.
    weights: Vec<ValueId>,
    /// Activation quantizer index of each quantized value the block reads.
    acts: HashMap<ValueId, usize>,
    /// The planned (bias-corrected) biases of its integer layers.
    biases: HashMap<ValueId, Tensor>,
}

fn candle_err(e: Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl Block for GraphBlock<'_> {
    fn forward(
        &self,
        x: &Tensor,
        weights: &[Tensor],
        act: &mut dyn FnMut(usize, &Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let m = x.dim(0)?;
        let plan = self
            .plans
            .get(&m)
            .ok_or_else(|| candle_core::Error::Msg(format!("no plan for batch {m}")))?;
        let mut env: Vec<Option<Tensor>> = vec![None; plan.graph.values.len()];
        env[self.input] = Some(match self.acts.get(&self.input) {
            Some(&k) => act(k, x)?,
            None => x.clone(),
        });
        let mut overrides: HashMap<ValueId, Tensor> = self.biases.clone();
        overrides.extend(self.weights.iter().copied().zip(weights.iter().cloned()));
        plan.run_steps(
            &mut env,
            &self.steps[&m],
            Some(&overrides),
            &mut |v, t| match self.acts.get(&v) {
                Some(&k) => act(k, &t).map_err(Error::from),
                None => Ok(t),
            },
        )
        .map_err(candle_err)?;
        env[self.output]
            .take()
            .ok_or_else(|| candle_core::Error::Msg("the block did not compute its output".into()))
    }
}

/// Refine `plan` in place on the calibration images `x` ([n, C, H, W] flattened) of the
/// BN-folded graph `g`. `progress(stage, done, total)` per step.
pub fn refine(
    g: &Graph,
    plan: &mut QuantPlan<ValueId>,
    x: &[f32],
    n: usize,
    o: &RefineOptions,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<RefineReport> {
    let start = std::time::Instant::now();
    let batch = o.batch.min(n).max(1);
    let mut plans: HashMap<usize, Plan> = HashMap::new();
    for m in [batch, n % batch] {
        if m > 0 && !plans.contains_key(&m) {
            plans.insert(m, Plan::new(g, m)?);
        }
    }
    let pg = plans[&batch].graph.clone();
    let spans = blocks(&pg);
    if spans.is_empty() {
        return Err(Error::Usage(
            "--refine needs a model with one input and one output".into(),
        ));
    }
    let dev = plans[&batch].device().clone();
    let shape = {
        let mut s = plans[&batch].input_shape(0).to_vec();
        s[0] = n;
        s
    };
    let mut x_fp = Tensor::from_slice(x, shape, &dev)?;
    let mut x_q = x_fp.clone();
    let mut reports = Vec::new();
    let total = spans.len();
    let input = pg.inputs[0].value;
    for (bi, span) in spans.iter().enumerate() {
        let t0 = std::time::Instant::now();
        // The block's integer layers and the quantized values it reads.
        let mut layers: Vec<(String, ValueId, usize)> = Vec::new();
        for &ni in &span.nodes {
            let node = &pg.nodes[ni];
            if let (Some(LayerQuant::Int { .. }), Some(w)) =
                (plan.layers.get(&node.name), node.input(1))
            {
                if pg.konst(w).is_some() {
                    layers.push((node.name.clone(), w, ni));
                }
            }
        }
        let mut read: Vec<ValueId> = Vec::new();
        for &ni in &span.nodes {
            for v in pg.nodes[ni].inputs.iter().flatten() {
                if plan.activations.contains_key(v) && !read.contains(v) {
                    read.push(*v);
                }
            }
        }
        let steps: HashMap<usize, Vec<usize>> = plans
            .iter()
            .map(|(&m, p)| (m, p.steps_producing(&span.values)))
            .collect();
        let soft = fresh_soft(plan, &layers, &pg, o, &dev)?;
        let acts = fresh_acts(plan, &read, input, o, &dev)?;
        // Biases as the plan has them (bias correction included), in float: the block runs
        // with them, and they are requantized on the learned steps at the end.
        let mut biases: HashMap<ValueId, Tensor> = HashMap::new();
        let mut float_bias: HashMap<String, Vec<f32>> = HashMap::new();
        for (name, _, ni) in &layers {
            let LayerQuant::Int {
                bias: Some(bq),
                per_channel,
                ..
            } = &plan.layers[name]
            else {
                continue;
            };
            let Some(bv) = pg.nodes[*ni].input(2).filter(|b| pg.konst(*b).is_some()) else {
                continue;
            };
            let b = bq.dequantize(*per_channel);
            let shape = pg.konst(bv).unwrap().shape.clone();
            biases.insert(bv, Tensor::from_vec(b.clone(), shape, &dev)?);
            float_bias.insert(name.clone(), b);
        }
        let block = GraphBlock {
            plans: &plans,
            steps,
            input: span.input,
            output: span.output,
            weights: layers.iter().map(|l| l.1).collect(),
            acts: read.iter().enumerate().map(|(k, &v)| (v, k)).collect(),
            biases,
        };
        // FP32 target: the float block, i.e. float weights, the model's own biases (not the
        // plan's, which are corrected for the round-to-nearest weights), no quantizers.
        let float_w: Vec<Tensor> = layers
            .iter()
            .map(|(_, w, _)| plans[&batch].constant(*w).cloned().unwrap())
            .collect();
        let float_block = GraphBlock {
            biases: HashMap::new(),
            ..block.clone()
        };
        let target = run_batched(&float_block, &x_fp, &float_w, batch, &mut |_, t| {
            Ok(t.clone())
        })?;
        let name = format!("refining block {}/{total}", bi + 1);
        let r = if soft.is_empty() {
            None
        } else {
            let bo = RefineOptions {
                seed: o.seed ^ (bi as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                ..*o
            };
            Some(reconstruct(
                &block,
                &x_q,
                &target,
                &soft,
                &acts,
                &bo,
                &mut |s| progress(&name, s, o.iters),
            )?)
        };
        // A block whose hardened error came out above round-to-nearest's keeps the plan.
        let kept = r.is_some_and(|r| r.error_after > r.error_before);
        let (soft, acts) = if kept {
            (
                fresh_soft(plan, &layers, &pg, o, &dev)?,
                fresh_acts(plan, &read, input, o, &dev)?,
            )
        } else {
            (soft, acts)
        };
        // Harden into the plan.
        for ((lname, _, ni), sw) in layers.iter().zip(&soft).filter(|_| !kept) {
            let weight = sw.harden()?;
            let LayerQuant::Int { per_channel, .. } = plan.layers[lname] else {
                unreachable!()
            };
            let node = &pg.nodes[*ni];
            let xs = node
                .input(0)
                .and_then(|v| read.iter().position(|r| *r == v))
                .map(|k| acts[k].result())
                .transpose()?
                .map(|a| a.scale);
            let bias = match (float_bias.get(lname), xs) {
                (Some(b), Some(s)) => Some(quantize_bias(b, s, &weight.scales, per_channel)),
                _ => None,
            };
            plan.layers.insert(
                lname.clone(),
                LayerQuant::Int {
                    weight,
                    per_channel,
                    bias,
                },
            );
        }
        for (v, a) in read.iter().zip(&acts).filter(|_| !kept) {
            plan.activations.insert(*v, a.result()?);
        }
        // The next block's inputs: FP32 from FP32, quantized from the refined block.
        x_q = run_quantized(&block, &x_q, &soft, &acts, batch)?;
        x_fp = target;
        reports.push(BlockReport {
            layers: layers.iter().map(|l| l.0.clone()).collect(),
            error_before: r.map_or(0.0, |r| r.error_before),
            error_after: r.map_or(0.0, |r| r.error_after),
            kept_round_to_nearest: kept,
            seconds: t0.elapsed().as_secs_f64(),
        });
    }
    Ok(RefineReport {
        method: o.method.name(),
        iters: o.iters,
        batch,
        images: n,
        blocks: reports,
        seconds: start.elapsed().as_secs_f64(),
        holdout: None,
    })
}

/// Soft weights of a block's integer layers, starting from the plan (round to nearest).
fn fresh_soft(
    plan: &QuantPlan<ValueId>,
    layers: &[(String, ValueId, usize)],
    pg: &Graph,
    o: &RefineOptions,
    dev: &candle_core::Device,
) -> Result<Vec<SoftWeight>> {
    layers
        .iter()
        .map(|(name, w, _)| {
            let LayerQuant::Int { weight, .. } = &plan.layers[name] else {
                return Err(Error::Internal(format!("{name} is not an integer layer")));
            };
            let wt = pg
                .konst(*w)
                .ok_or_else(|| Error::Internal(format!("{name} has no constant weight")))?;
            Ok(SoftWeight::new(
                &wt.to_f32_vec(),
                &wt.shape,
                weight,
                o.method == zq_quant::refine::Method::Genie,
                dev,
            )?)
        })
        .collect()
}

/// Activation quantizers of the values a block reads, from the plan; the network input's step
/// stays fixed (its range is the input box).
fn fresh_acts(
    plan: &QuantPlan<ValueId>,
    read: &[ValueId],
    input: ValueId,
    o: &RefineOptions,
    dev: &candle_core::Device,
) -> Result<Vec<LsqAct>> {
    read.iter()
        .map(|v| {
            Ok(LsqAct::new(
                plan.activations[v],
                o.method == zq_quant::refine::Method::Genie && *v != input,
                dev,
            )?)
        })
        .collect()
}
