//! Calibration: the images (distilled inline, from a file, or real for comparison), one pass of
//! the FP32 graph over them observing every activation to quantize, and the activation
//! parameters that result (observed ranges joined with what the model's own statistics imply).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::Tensor as CTensor;
use zq_quant::observer::{ChannelMeans, MinMax};
use zq_quant::range::{calibrated_range, mse_range};
use zq_quant::{ActQuant, Prior};

use super::report::ActReport;
use super::{AbitsScope, Calib, QuantizeOptions};
use crate::error::{Error, Result};
use crate::exec::Plan;
use crate::ir::passes::BnPrior;
use crate::ir::{Graph, Op, ValueId};
use crate::pipeline::distill;

/// Images optimised together when distilling, and run together when calibrating.
pub const BATCH: usize = 32;

/// How much distillation `zq quantize` does by default, by input size: measured across models
/// (README, "Defaults"), and sized so that the whole run stays within a few minutes on 2 cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub num: usize,
    pub iters: usize,
    pub holdout: usize,
}

impl Budget {
    /// Inputs up to this many pixels (64x64) count as small (CIFAR-like).
    pub const SMALL_PIXELS: usize = 64 * 64;

    /// Images distilled for `--refine` on small inputs: reconstruction fits every block to
    /// them, and on ResNet-20 W4A4 256 images measured 1.25 points above 64 (512 no better).
    pub const REFINE_SMALL_NUM: usize = 256;

    pub fn for_pixels(pixels: usize) -> Budget {
        if pixels <= Self::SMALL_PIXELS {
            Budget {
                num: 64,
                iters: 200,
                holdout: 32,
            }
        } else {
            Budget {
                num: 32,
                iters: 50,
                holdout: 16,
            }
        }
    }

    /// The budget when the calibration images also feed `--refine`.
    pub fn for_refinement(pixels: usize) -> Budget {
        let b = Self::for_pixels(pixels);
        if pixels <= Self::SMALL_PIXELS {
            Budget {
                num: Self::REFINE_SMALL_NUM,
                ..b
            }
        } else {
            b
        }
    }
}

/// Held-out images are distilled from a seed of their own, derived from the user's: the same
/// `--seed` must not give the calibration images again ("holdout" in ASCII).
const HOLDOUT_SEED_XOR: u64 = 0x0068_6F6C_646F_7574;

/// Calibration images `[n, C, H, W]` flattened, a description, and held-out images for the
/// quality estimate.
pub struct CalibSet {
    pub images: Vec<f32>,
    pub n: usize,
    pub label: String,
    pub holdout: Option<(Vec<f32>, usize)>,
}

/// Distil, read or load the calibration (and held-out) images `o` asks for.
pub fn images(
    g: &Graph,
    path: &Path,
    o: &QuantizeOptions,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<CalibSet> {
    let [c, h, w] = crate::pipeline::eval::chw_of(g, path)?;
    let dopts = |num: usize, iters: usize, seed: u64, stats| distill::DistillOptions {
        num,
        batch: num.min(BATCH),
        iters,
        lr: distill::DEFAULT_LR,
        seed,
        pre: o.pre.clone(),
        stats,
        schedule: zq_synth::zeroq::Schedule::default(),
        method: distill::Method::ZeroQ,
        genie: distill::GenieOptions::default(),
    };
    let (images, label) = match &o.calib {
        Calib::Distill { num, iters, stats } => {
            let d = distill::distill(
                g,
                path,
                &dopts(*num, *iters, o.seed, *stats),
                &mut |a, b, _| progress("distilling calibration images", a, b),
            )?;
            (
                d.images,
                format!(
                    "{num} distilled images ({} BN statistics, {iters} iterations, seed {})",
                    stats.name(),
                    o.seed
                ),
            )
        }
        Calib::File(p) => {
            let d = distill::read_distilled(p)?;
            if d.shape[1..] != [c, h, w] {
                return Err(Error::Model {
                    path: p.clone(),
                    msg: format!(
                        "images are {:?} but the model takes [N, {c}, {h}, {w}]",
                        d.shape
                    ),
                });
            }
            (d.images, format!("{}", p.display()))
        }
        Calib::Images { dir, num } => {
            let folder = crate::data::ImageFolder::open(dir)?;
            let idx = crate::pipeline::eval::spread(folder.items.len(), Some(*num));
            let items: Vec<_> = idx.iter().map(|&i| folder.items[i].clone()).collect();
            let x = crate::data::load_batch(&items, c, h, w, &o.pre)?;
            (
                x,
                format!("{} real images from {}", items.len(), dir.display()),
            )
        }
    };
    let n = images.len() / (c * h * w).max(1);
    let holdout = if o.holdout > 0 {
        let d = distill::distill(
            g,
            path,
            &dopts(
                o.holdout,
                o.holdout_iters,
                o.seed ^ HOLDOUT_SEED_XOR,
                o.holdout_stats,
            ),
            &mut |a, b, _| progress("distilling held-out images", a, b),
        )?;
        Some((d.images, o.holdout))
    } else {
        None
    };
    Ok(CalibSet {
        images,
        n,
        label,
        holdout,
    })
}

/// What calibration found: parameters for every activation to quantize, and the per-channel
/// means of the inputs of weighted layers (for bias correction).
pub struct Calibration {
    pub params: HashMap<ValueId, ActQuant>,
    pub reports: Vec<ActReport>,
    pub means: HashMap<ValueId, Vec<f32>>,
}

/// Values whose activation gets a QuantizeLinear/DequantizeLinear pair: every non-constant
/// input of every node (the network input, residual sums and pooled features included), except
/// a weighted layer's output that only a Relu or Clip reads. That activation is quantized at its
/// output instead, as ONNX Runtime's quantizer does: the integer kernel then applies it as a
/// clamp of its requantized output (`Conv -> Clip -> Q` runs as one QLinearConv), and the
/// range is the activation's, not the conv's (a ReLU6 after a conv that spans +-40 keeps all
/// 256 levels for [0, 6] instead of about 20).
fn activations(pg: &Graph) -> Vec<ValueId> {
    let consumers = pg.consumers();
    let weighted: HashSet<ValueId> = pg
        .nodes
        .iter()
        .filter(|n| n.op.is_weighted())
        .flat_map(|n| n.outputs.iter().copied())
        .collect();
    let fused = |v: &ValueId| {
        weighted.contains(v)
            && !pg.outputs.contains(v)
            && consumers[v]
                .iter()
                .all(|&i| matches!(pg.nodes[i].op, Op::Relu | Op::Clip))
    };
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for n in &pg.nodes {
        for v in n.inputs.iter().flatten() {
            if pg.konst(*v).is_none() && !fused(v) && seen.insert(*v) {
                out.push(*v);
            }
        }
    }
    out
}

/// The values weighted layers read as their input.
fn layer_inputs(pg: &Graph) -> HashSet<ValueId> {
    pg.nodes
        .iter()
        .filter(|n| n.op.is_weighted())
        .filter_map(|n| n.input(0))
        .collect()
}

/// Values of one calibration batch kept per low-bit activation for its range search.
const SAMPLES_PER_BATCH: usize = 16_384;

/// The bits of every activation to quantize: `--layer-abits` for a layer's input, else 8 for the
/// network input and the last layer's input when the low-bit defaults apply (as the literature
/// keeps them), else `--abits`. A value read by several layers takes the widest of their choices.
/// Under [`AbitsScope::LayerInputs`] an activation no weighted layer reads (a conv's output
/// before a residual Add, the sum itself, a pool's input) stays at 8 bits.
pub(crate) fn activation_bits(pg: &Graph, o: &QuantizeOptions) -> HashMap<ValueId, u8> {
    let acts = activations(pg);
    let layer_inputs = layer_inputs(pg);
    let mut bits: HashMap<ValueId, u8> = acts
        .iter()
        .map(|&v| {
            let b = match o.abits_scope {
                AbitsScope::LayerInputs if !layer_inputs.contains(&v) => 8,
                _ => o.abits,
            };
            (v, b)
        })
        .collect();
    let ends = super::end_layers(pg);
    let mut chosen: HashMap<ValueId, u8> = HashMap::new();
    for n in pg.nodes.iter().filter(|n| n.op.is_weighted()) {
        let Some(x) = n.input(0) else { continue };
        let b = match o.layer_abits.get(&n.name) {
            Some(&b) => b,
            None if o.low_bit_defaults() && ends.last.as_deref() == Some(n.name.as_str()) => 8,
            None => continue,
        };
        let e = chosen.entry(x).or_insert(b);
        *e = (*e).max(b);
    }
    if o.low_bit_defaults() {
        if let Some(i) = pg.inputs.first() {
            chosen.entry(i.value).or_insert(8);
        }
    }
    for (v, b) in chosen {
        if let Some(e) = bits.get_mut(&v) {
            *e = b;
        }
    }
    bits
}

/// What the model itself says about activation ranges: the input box, `beta +- k|gamma|` after
/// a folded BN (through its ReLU), the residual-stream widening.
fn priors(
    pg: &Graph,
    prior: &BnPrior,
    input_box: (f32, f32),
    k: f32,
    widen: f32,
) -> HashMap<ValueId, Prior> {
    let mut r: HashMap<ValueId, Prior> = HashMap::new();
    if let Some(i) = pg.inputs.first() {
        r.insert(i.value, Prior::Range(input_box.0, input_box.1));
    }
    for n in &pg.nodes {
        let x = n.input(0).and_then(|v| r.get(&v).copied());
        let y = n.outputs[0];
        let d = match &n.op {
            _ if k > 0.0 && prior.contains_key(&y) => {
                let (beta, gamma) = &prior[&y];
                Some(Prior::from_bn(beta, gamma, k))
            }
            Op::Relu => x.map(Prior::relu),
            Op::Add if widen != 1.0 => Some(Prior::Widen(widen)),
            _ => None,
        };
        if let Some(d) = d {
            r.insert(y, d);
        }
    }
    r
}

/// Run the (BN-folded) graph `g` over all `n` images — in batches of [`BATCH`], the last one
/// short — observing every activation, and derive their parameters.
pub fn calibrate(
    g: &Graph,
    prior: &BnPrior,
    set: &CalibSet,
    input_box: (f32, f32),
    o: &QuantizeOptions,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<Calibration> {
    let n = set.n;
    let batch = n.min(BATCH);
    let per = set.images.len() / n.max(1);
    let mut plans: HashMap<usize, Plan> = HashMap::from([(batch, Plan::new(g, batch)?)]);
    let pg = plans[&batch].graph.clone();
    let acts = activations(&pg);
    let mut obs: HashMap<ValueId, MinMax> = acts.iter().map(|&v| (v, MinMax::default())).collect();
    let weighted_inputs = layer_inputs(&pg);
    let mut sums: HashMap<ValueId, ChannelMeans> = HashMap::new();
    let bits = activation_bits(&pg, o);
    // Low-bit activations keep a sample of their values for the range search.
    let mut samples: HashMap<ValueId, Vec<f32>> = acts
        .iter()
        .filter(|v| bits[v] < 8)
        .map(|&v| (v, Vec::new()))
        .collect();
    let opts = crate::exec::RunOptions {
        taps: &acts,
        overrides: None,
    };
    for s in (0..n).step_by(batch.max(1)) {
        let m = batch.min(n - s);
        progress("calibrating", s + m, n);
        let plan = match plans.entry(m) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(Plan::new(g, m)?),
        };
        let shape = plan.input_shape(0).to_vec();
        let t = CTensor::from_slice(&set.images[s * per..(s + m) * per], shape, plan.device())?;
        let (_, taps) = plan.run_with(&[t], &opts)?;
        for (v, t) in acts.iter().zip(taps) {
            let data = t.flatten_all()?.to_vec1::<f32>()?;
            obs.get_mut(v).unwrap().update(&data);
            if let Some(keep) = samples.get_mut(v) {
                let stride = (data.len() / SAMPLES_PER_BATCH).max(1);
                keep.extend(data.iter().step_by(stride));
            }
            if weighted_inputs.contains(v) && t.rank() >= 2 {
                let inner = t.dims()[2..].iter().product::<usize>();
                sums.entry(*v).or_default().update(&data, t.dim(1)?, inner);
            }
        }
    }
    let derived = priors(&pg, prior, input_box, o.bn_sigmas, o.residual_widen);
    let mut params = HashMap::new();
    let mut reports = Vec::new();
    for &v in &acts {
        let ob = &obs[&v];
        let observed = calibrated_range(ob, None);
        let (lo, hi) = if v == pg.inputs[0].value {
            // The input never leaves its box.
            input_box
        } else {
            calibrated_range(ob, derived.get(&v).copied())
        };
        let b = bits[&v];
        let (lo, hi) = match samples.get(&v) {
            Some(x) => mse_range(x, lo, hi, b),
            None => (lo, hi),
        };
        let a = ActQuant::unsigned(lo, hi, b);
        params.insert(v, a);
        reports.push(ActReport {
            tensor: g.values[v].name.clone(),
            bits: b,
            observed: [observed.0, observed.1],
            range: [lo, hi],
            scale: a.scale,
            zero_point: a.zero_point,
        });
    }
    let means = sums.into_iter().map(|(v, m)| (v, m.means())).collect();
    Ok(Calibration {
        params,
        reports,
        means,
    })
}
