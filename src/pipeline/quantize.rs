//! `zq quantize`: fold BN, calibrate activation ranges on distilled (or given) data, quantize
//! weights per channel, emit a QDQ ONNX graph, and estimate its quality against FP32 on held-out
//! distilled images by running the emitted graph itself (zq executes QuantizeLinear and
//! DequantizeLinear exactly as ONNX defines them, so the estimate is of the model written).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::Tensor as CTensor;
use serde::Serialize;
use zq_quant::observer::MinMax;
use zq_quant::{quantize_weights, ClipSearch};

use crate::data::Preprocess;
use crate::error::{Error, Result};
use crate::exec::Plan;
use crate::ir::fold_bn::{fold_bn, BnPrior};
use crate::ir::{DType, Graph, Node, Op, Tensor, ValueId};
use crate::pipeline::distill;

/// Where calibration images come from.
#[derive(Debug, Clone)]
pub enum Calib {
    /// ZeroQ distillation inline (the zero-shot default).
    Distill {
        num: usize,
        iters: usize,
        stats: zq_synth::zeroq::Stats,
    },
    /// A distilled set written by `zq distill` (or any `images` [N,C,H,W] safetensors).
    File(PathBuf),
    /// Real images from a folder (for comparison only).
    Images { dir: PathBuf, num: usize },
}

#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    pub wbits: u8,
    pub per_tensor: bool,
    /// Weight scale search.
    pub clip: ClipSearch,
    /// Per-layer weight bits, by node name.
    pub layer_bits: BTreeMap<String, u8>,
    /// Layers left in float, by node name.
    pub keep_float: BTreeSet<String>,
    pub calib: Calib,
    /// Held-out distilled images for the quality estimate (0: none).
    pub holdout: usize,
    pub holdout_iters: usize,
    pub holdout_stats: zq_synth::zeroq::Stats,
    pub seed: u64,
    pub pre: Preprocess,
    /// Widening of BN-derived activation ranges, in standard deviations.
    pub bn_sigmas: f32,
    /// Widening of observed ranges on the residual stream.
    pub residual_widen: f32,
    /// Subtract the expected output shift of weight rounding from each bias.
    pub bias_correction: bool,
    /// Mixed precision: pick per-layer bits on the size/sensitivity Pareto frontier.
    pub pareto: Option<ParetoOptions>,
    /// Output format (the size model counts its bytes).
    pub format: OutputFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Onnx,
    Safetensors,
}

#[derive(Debug, Clone)]
pub struct ParetoOptions {
    /// Largest output file, in bytes (u64::MAX: none).
    pub budget: u64,
    /// Largest bit-operation count per image (sum over layers of MACs x weight bits x 8).
    pub bops_budget: Option<u64>,
    /// Candidate weight bit widths.
    pub bits: Vec<u8>,
}

/// The result of the mixed-precision search.
#[derive(Debug, Clone, Serialize)]
pub struct ParetoReport {
    pub budget: u64,
    pub candidate_bits: Vec<u8>,
    /// Layer names, in the order of every `bits` vector below.
    pub layers: Vec<String>,
    /// Sensitivity table: layer -> (bits, KL).
    pub sensitivity: Vec<Vec<(u8, f64)>>,
    pub frontier: Vec<zq_quant::pareto::Point>,
    pub chosen: zq_quant::pareto::Point,
    /// Uniform assignments (every layer at one width), for comparison.
    pub uniform: Vec<zq_quant::pareto::Point>,
    pub predicted_bytes: u64,
    /// Bit-operations per image of the chosen assignment (MACs x weight bits x 8 activation bits).
    pub chosen_bops: u64,
    pub bops_budget: Option<u64>,
    /// Multiply-accumulates per image of each layer (same order as `layers`).
    pub macs: Vec<u64>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    pub name: String,
    pub op: String,
    pub bits: Option<u8>,
    pub params: usize,
    /// How ONNX Runtime (CPU) will run it.
    pub kernel: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct ActReport {
    pub tensor: String,
    pub observed: [f32; 2],
    pub range: [f32; 2],
    pub scale: f32,
    pub zero_point: u8,
}

#[derive(Debug, Clone, Serialize)]
pub struct Quality {
    pub images: usize,
    /// Fraction of held-out images where the quantized and FP32 models pick the same class.
    pub agreement: f64,
    /// Mean KL(FP32 || quantized) of the softmax outputs.
    pub kl: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct QuantizeReport {
    pub model: String,
    pub bn_folded: usize,
    pub calibration: String,
    pub calibration_images: usize,
    pub layers: Vec<LayerReport>,
    pub activations: Vec<ActReport>,
    pub fp32_weight_bytes: usize,
    pub quantized_weight_bytes: usize,
    pub quality: Option<Quality>,
    pub pareto: Option<ParetoReport>,
}

pub struct Quantized {
    pub graph: Graph,
    pub report: QuantizeReport,
    /// The output file's bytes, serialised in the requested format.
    pub bytes: Vec<u8>,
}

/// Serialise a quantized graph in `format`.
pub fn serialize(
    qg: &Graph,
    format: OutputFormat,
    model: &str,
    layers: &[LayerReport],
) -> Result<Vec<u8>> {
    use prost::Message;
    Ok(match format {
        OutputFormat::Onnx => crate::onnx::write::to_model(qg).encode_to_vec(),
        OutputFormat::Safetensors => {
            let bits: BTreeMap<String, u8> = layers
                .iter()
                .filter_map(|l| l.bits.map(|b| (l.name.clone(), b)))
                .collect();
            crate::pipeline::packed::to_safetensors(qg, model, &bits)?
        }
    })
}

/// Build the QDQ graph and fix its declared output shapes (checkers require them): specialise
/// once for batch 1; the writer puts the symbolic batch back.
fn build_final(
    g: &Graph,
    act: &HashMap<ValueId, (f32, u8)>,
    means: &HashMap<ValueId, Vec<f32>>,
    o: &QuantizeOptions,
) -> Result<Built> {
    let (mut qg, layers, fp32_bytes, q_bytes) = build_qdq(g, act, means, o)?;
    let one = Plan::new(&qg, 1)?;
    for &v in &qg.outputs.clone() {
        if qg.values[v].shape.is_none() {
            qg.values[v].shape = one.graph.values[v].shape.clone();
        }
    }
    Ok((qg, layers, fp32_bytes, q_bytes))
}

/// Error raised when no assignment fits the budget (the CLI maps it to exit code 1).
pub const INFEASIBLE: &str = "infeasible budget";

impl QuantizeOptions {
    pub fn validate(&self, g: &Graph) -> Result<()> {
        let ok = |b: u8| (2..=8).contains(&b) || b == 16;
        if !ok(self.wbits) {
            return Err(Error::Usage(format!(
                "--wbits must be between 2 and 8, or 16 (float16), got {}",
                self.wbits
            )));
        }
        let layers: HashSet<&str> = g
            .nodes
            .iter()
            .filter(|n| n.op.is_weighted())
            .map(|n| n.name.as_str())
            .collect();
        for (name, &b) in &self.layer_bits {
            if !layers.contains(name.as_str()) {
                return Err(Error::Usage(format!(
                    "--layer-bits: no quantizable layer named '{name}' (zq inspect lists them)"
                )));
            }
            if !ok(b) {
                return Err(Error::Usage(format!(
                    "--layer-bits {name}={b}: bits must be between 2 and 8, or 16 (float16)"
                )));
            }
        }
        for name in &self.keep_float {
            if !layers.contains(name.as_str()) {
                return Err(Error::Usage(format!(
                    "--keep-float: no quantizable layer named '{name}' (zq inspect lists them)"
                )));
            }
        }
        Ok(())
    }
}

/// Calibration images, their count, a description, and held-out images with their count.
type CalibSet = (Vec<f32>, usize, String, Option<(Vec<f32>, usize)>);

/// Calibration and held-out images, [N, C, H, W] flattened.
fn calibration_images(
    g: &Graph,
    path: &Path,
    o: &QuantizeOptions,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<CalibSet> {
    let [c, h, w] = crate::pipeline::eval::chw_of(g, path)?;
    let chw = c * h * w;
    let dopts = |num: usize, iters: usize, seed: u64, stats| distill::DistillOptions {
        num,
        batch: num.min(32),
        iters,
        lr: 0.5,
        seed,
        pre: o.pre.clone(),
        stats,
    };
    let (x, label) = match &o.calib {
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
    let n = x.len() / chw;
    let holdout = if o.holdout > 0 {
        let d = distill::distill(
            g,
            path,
            &dopts(
                o.holdout,
                o.holdout_iters,
                o.seed ^ 0x0068_6F6C_646F_7574,
                o.holdout_stats,
            ),
            &mut |a, b, _| progress("distilling held-out images", a, b),
        )?;
        Some((d.images, o.holdout))
    } else {
        None
    };
    Ok((x, n, label, holdout))
}

/// Values whose activation gets a QuantizeLinear/DequantizeLinear pair: every non-constant
/// input of every node (the network input, residual sums, pooled features included).
fn activations(pg: &Graph) -> Vec<ValueId> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for n in &pg.nodes {
        for v in n.inputs.iter().flatten() {
            if pg.konst(*v).is_none() && seen.insert(*v) {
                out.push(*v);
            }
        }
    }
    out
}

/// What the model itself says about an activation's range beyond the calibration images.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Prior {
    /// A fixed interval: the input box, or `beta +- k*|gamma|` after a folded BN (and its ReLU).
    Range(f32, f32),
    /// The residual stream (Add outputs and what follows them elementwise): distilled images
    /// match BN moments but not tails, and sums of branches reach further on real data, so the
    /// observed range is widened by this factor.
    Widen(f32),
}

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
                let lo = beta
                    .iter()
                    .zip(gamma)
                    .map(|(b, g)| b - k * g)
                    .fold(f32::INFINITY, f32::min);
                let hi = beta
                    .iter()
                    .zip(gamma)
                    .map(|(b, g)| b + k * g)
                    .fold(f32::NEG_INFINITY, f32::max);
                Some(Prior::Range(lo, hi))
            }
            Op::Relu => match x {
                Some(Prior::Range(a, b)) => Some(Prior::Range(a.max(0.0), b.max(0.0))),
                w => w,
            },
            Op::Add if widen != 1.0 => Some(Prior::Widen(widen)),
            _ => None,
        };
        if let Some(d) = d {
            r.insert(y, d);
        }
    }
    r
}

/// uint8 affine parameters covering [lo, hi] and 0.
fn uint8_params(lo: f32, hi: f32) -> (f32, u8) {
    let m = MinMax {
        min: lo.min(0.0),
        max: hi.max(0.0),
    };
    m.uint8_params().unwrap_or((1.0, 0))
}

/// Run `g` on `n` images `x` in batches of up to 64; returns [n, K] scores flattened and K.
fn logits(g: &Graph, path: &Path, x: &[f32], n: usize) -> Result<(Vec<f32>, usize)> {
    let mut clf = crate::pipeline::eval::ZqClassifier::new(g.clone(), path)?;
    let per = x.len() / n.max(1);
    let (mut out, mut k) = (Vec::with_capacity(x.len()), 0);
    for s in (0..n).step_by(64) {
        let m = 64.min(n - s);
        let (y, kk) = clf.scores(&x[s * per..(s + m) * per], m)?;
        out.extend(y);
        k = kk;
    }
    Ok((out, k))
}

/// Argmax agreement and mean KL(p || q) between two [N, K] output tables.
pub fn compare(a: &[f32], b: &[f32], k: usize) -> Quality {
    use zq_quant::sensitivity::{agreement, kl_divergence};
    Quality {
        images: a.len() / k.max(1),
        agreement: agreement(a, b, k),
        kl: kl_divergence(a, b, k),
    }
}

/// The whole pipeline. `progress(stage, done, total)` reports long stages.
pub fn quantize(
    g0: &Graph,
    path: &Path,
    o: &QuantizeOptions,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<Quantized> {
    o.validate(g0)?;
    let chw = crate::pipeline::eval::chw_of(g0, path)?;
    let pc = o.pre.per_channel(chw[0])?;
    let bx = distill::input_box(&pc);
    let input_box = (
        bx.iter().map(|b| b.0).fold(f32::INFINITY, f32::min),
        bx.iter().map(|b| b.1).fold(f32::NEG_INFINITY, f32::max),
    );
    let (x, n, label, holdout) = calibration_images(g0, path, o, progress)?;
    let (g, prior, folded) = fold_bn(g0);

    // Calibrate on the specialised graph (same value ids as `g`).
    let batch = n.min(32);
    let per: usize = chw.iter().product();
    let plan = Plan::new(&g, batch)?;
    let acts = activations(&plan.graph);
    let mut obs: HashMap<ValueId, MinMax> = acts.iter().map(|&v| (v, MinMax::default())).collect();
    // Per-channel sums of the inputs of weighted layers (for bias correction).
    let weighted_inputs: HashSet<ValueId> = plan
        .graph
        .nodes
        .iter()
        .filter(|n| n.op.is_weighted())
        .filter_map(|n| n.input(0))
        .collect();
    let mut sums: HashMap<ValueId, (Vec<f64>, usize)> = HashMap::new();
    let opts = crate::exec::RunOptions {
        taps: &acts,
        overrides: None,
    };
    let full = n / batch * batch;
    for s in (0..full).step_by(batch) {
        progress("calibrating", s + batch, full);
        let t = CTensor::from_slice(
            &x[s * per..(s + batch) * per],
            (batch, chw[0], chw[1], chw[2]),
            plan.device(),
        )?;
        let (_, taps) = plan.run_with(&[t], &opts)?;
        for (v, t) in acts.iter().zip(taps) {
            let data = t.flatten_all()?.to_vec1::<f32>()?;
            obs.get_mut(v).unwrap().update(&data);
            if weighted_inputs.contains(v) && t.rank() >= 2 {
                let c = t.dim(1)?;
                let inner = t.dims()[2..].iter().product::<usize>();
                let e = sums.entry(*v).or_insert_with(|| (vec![0.0; c], 0));
                for (k, run) in data.chunks(inner.max(1)).enumerate() {
                    e.0[k % c] += run.iter().map(|&x| f64::from(x)).sum::<f64>();
                }
                e.1 += data.len() / c;
            }
        }
    }
    let derived = priors(
        &plan.graph,
        &prior,
        input_box,
        o.bn_sigmas,
        o.residual_widen,
    );

    // Activation parameters: the union of what was observed and what the model's own statistics
    // imply (distilled images match BN moments, not tails).
    let mut act_params: HashMap<ValueId, (f32, u8)> = HashMap::new();
    let mut act_reports = Vec::new();
    for &v in &acts {
        let ob = &obs[&v];
        let (mut lo, mut hi) = if ob.min <= ob.max {
            (ob.min, ob.max)
        } else {
            (0.0, 0.0)
        };
        let observed = [lo, hi];
        match derived.get(&v) {
            Some(&Prior::Range(a, b)) => {
                lo = lo.min(a);
                hi = hi.max(b);
            }
            Some(&Prior::Widen(f)) => {
                lo *= f;
                hi *= f;
            }
            None => {}
        }
        if v == plan.graph.inputs[0].value {
            // The input never leaves its box.
            (lo, hi) = input_box;
        }
        let (scale, zp) = uint8_params(lo, hi);
        act_params.insert(v, (scale, zp));
        act_reports.push(ActReport {
            tensor: g.values[v].name.clone(),
            observed,
            range: [lo, hi],
            scale,
            zero_point: zp,
        });
    }

    let means: HashMap<ValueId, Vec<f32>> = sums
        .into_iter()
        .map(|(v, (s, n))| (v, s.iter().map(|x| (x / n.max(1) as f64) as f32).collect()))
        .collect();
    let model_name = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut o = o.clone();
    let pareto = match o.pareto.clone() {
        Some(p) => {
            let r = search(
                &g,
                &x[..batch * per],
                batch,
                chw,
                &act_params,
                &means,
                &o,
                &p,
                &model_name,
                progress,
            )?;
            for (name, &b) in r.layers.iter().zip(&r.chosen.bits) {
                o.layer_bits.insert(name.clone(), b);
            }
            Some(r)
        }
        None => None,
    };
    let o = &o;
    let (qg, layers, fp32_bytes, q_bytes) = build_final(&g, &act_params, &means, o)?;
    let bytes = serialize(&qg, o.format, &model_name, &layers)?;
    if let Some(p) = &pareto {
        if bytes.len() as u64 > p.budget {
            return Err(Error::Usage(format!(
                "{INFEASIBLE}: the chosen assignment serialises to {} bytes, over the budget of {} (predicted {})",
                bytes.len(),
                p.budget,
                p.predicted_bytes
            )));
        }
    }

    let quality = match &holdout {
        Some((hx, hn)) => {
            progress("estimating quality", 0, 1);
            let (a, k) = logits(g0, path, hx, *hn)?;
            let (b, _) = logits(&qg, path, hx, *hn)?;
            Some(compare(&a, &b, k))
        }
        None => None,
    };
    Ok(Quantized {
        graph: qg,
        bytes,
        report: QuantizeReport {
            model: path.display().to_string(),
            bn_folded: folded,
            calibration: label,
            calibration_images: n,
            layers,
            activations: act_reports,
            fp32_weight_bytes: fp32_bytes,
            quantized_weight_bytes: q_bytes,
            quality,
            pareto,
        },
    })
}

/// ZeroQ sensitivity of every candidate layer at every candidate width (only that layer's
/// weights quantized, KL of the output on distilled images), the exact byte cost of each
/// choice in the output format, the Pareto frontier, and the point chosen under the budget.
#[allow(clippy::too_many_arguments)]
fn search(
    g: &Graph,
    x: &[f32],
    batch: usize,
    chw: [usize; 3],
    act: &HashMap<ValueId, (f32, u8)>,
    means: &HashMap<ValueId, Vec<f32>>,
    o: &QuantizeOptions,
    p: &ParetoOptions,
    model_name: &str,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<ParetoReport> {
    use zq_quant::pareto::{frontier, pick, Choice, Point};
    let t0 = std::time::Instant::now();
    let plan = Plan::new(g, batch)?;
    // Candidate layers: weighted, constant weight, not kept in float, not pinned by --layer-bits.
    let cand: Vec<(usize, ValueId)> = plan
        .graph
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| {
            n.op.is_weighted()
                && !o.keep_float.contains(&n.name)
                && !o.layer_bits.contains_key(&n.name)
        })
        .filter_map(|(i, n)| {
            n.input(1)
                .filter(|w| plan.graph.konst(*w).is_some())
                .map(|w| (i, w))
        })
        .collect();
    if cand.is_empty() {
        return Err(Error::Usage(
            "--pareto: no layer left to choose bits for".into(),
        ));
    }
    let xt = CTensor::from_slice(x, (batch, chw[0], chw[1], chw[2]), plan.device())?;
    let run = |ov: Option<&HashMap<ValueId, CTensor>>| -> Result<Vec<f32>> {
        let opts = crate::exec::RunOptions {
            taps: &[],
            overrides: ov,
        };
        let (y, _) = plan.run_with(std::slice::from_ref(&xt), &opts)?;
        Ok(y[0].flatten_all()?.to_vec1::<f32>()?)
    };
    let reference = run(None)?;
    // Every FP32 activation once; each perturbed run starts at the perturbed layer.
    let cache = plan.run_keep_all(std::slice::from_ref(&xt))?;
    let classes = reference.len() / batch;
    let total = cand.len() * p.bits.len();
    let mut sens = Vec::with_capacity(cand.len());
    for (ci, &(ni, wv)) in cand.iter().enumerate() {
        let w = plan.graph.konst(wv).unwrap();
        let n = &plan.graph.nodes[ni];
        let per_channel =
            matches!(n.op, Op::Conv(_) | Op::Gemm { trans_b: true, .. }) && !o.per_tensor;
        let m = if per_channel { w.shape[0] } else { 1 };
        let wf = w.to_f32_vec();
        let mut row = Vec::with_capacity(p.bits.len());
        for (bi, &b) in p.bits.iter().enumerate() {
            progress("measuring sensitivity", ci * p.bits.len() + bi + 1, total);
            let dq = if b == 16 {
                wf.iter()
                    .map(|&v| half::f16::from_f32(v).to_f32())
                    .collect()
            } else {
                quantize_weights(&wf, m, b, o.clip).dequantize()
            };
            let t = CTensor::from_vec(dq, w.shape.as_slice(), plan.device())?;
            let ov = HashMap::from([(wv, t)]);
            let from = plan.step_of(ni).unwrap_or(0);
            let out = plan.run_from(&cache, from, Some(&ov))?[0]
                .flatten_all()?
                .to_vec1::<f32>()?;
            row.push((
                b,
                zq_quant::sensitivity::kl_divergence(&reference, &out, classes),
            ));
        }
        sens.push(row);
    }
    // Exact sizes: serialise once with every candidate at 8 bits, then each choice changes only
    // its own packed weight (and zero point) bytes.
    let names: Vec<String> = cand
        .iter()
        .map(|&(ni, _)| plan.graph.nodes[ni].name.clone())
        .collect();
    let mut o8 = o.clone();
    for nm in &names {
        o8.layer_bits.insert(nm.clone(), 8);
    }
    let (qg8, l8, _, _) = build_final(g, act, means, &o8)?;
    let s8 = serialize(&qg8, o.format, model_name, &l8)?.len() as u64;
    // Each choice's exact byte delta against the all-8-bit file: serialise with only that
    // layer changed (layers' bytes are independent of each other).
    let mut delta: Vec<Vec<i64>> = Vec::with_capacity(cand.len());
    let (qa, la, _, _) = build_qdq(g, act, means, &o8)?;
    let s8_raw = serialize(&qa, o.format, model_name, &la)?.len() as i64;
    for (ci, nm) in names.iter().enumerate() {
        let mut row = Vec::with_capacity(p.bits.len());
        for &b in &p.bits {
            if b == 8 {
                row.push(0);
                continue;
            }
            progress(
                "measuring sizes",
                ci * p.bits.len() + 1,
                names.len() * p.bits.len(),
            );
            let mut ob = o8.clone();
            ob.layer_bits.insert(nm.clone(), b);
            let (qb, lb, _, _) = build_qdq(g, act, means, &ob)?;
            row.push(serialize(&qb, o.format, model_name, &lb)?.len() as i64 - s8_raw);
        }
        delta.push(row);
    }
    let low: Vec<i64> = delta
        .iter()
        .map(|r| r.iter().copied().min().unwrap_or(0))
        .collect();
    let cost = |ci: usize, b: u8| -> u64 {
        let k = p.bits.iter().position(|&x| x == b).unwrap();
        (delta[ci][k] - low[ci]) as u64
    };
    let base = (s8 as i64 + low.iter().sum::<i64>()) as u64;
    let options: Vec<Vec<Choice>> = (0..cand.len())
        .map(|ci| {
            sens[ci]
                .iter()
                .map(|&(b, s)| Choice {
                    bits: b,
                    bytes: cost(ci, b),
                    sensitivity: s,
                })
                .collect()
        })
        .collect();
    let front = frontier(base, &options);
    let uniform: Vec<Point> = p
        .bits
        .iter()
        .map(|&b| Point {
            bytes: base + (0..cand.len()).map(|ci| cost(ci, b)).sum::<u64>(),
            sensitivity: sens
                .iter()
                .map(|r| r.iter().find(|x| x.0 == b).map_or(0.0, |x| x.1))
                .sum(),
            bits: vec![b; cand.len()],
        })
        .collect();
    // Multiply-accumulates per image: output elements x weights feeding each output.
    let macs: Vec<u64> = cand
        .iter()
        .map(|&(ni, wv)| {
            let n = &plan.graph.nodes[ni];
            let out = plan.graph.values[n.outputs[0]]
                .shape
                .clone()
                .unwrap_or_default();
            let per_image: usize = out.iter().skip(1).product();
            let oc = out.get(1).copied().unwrap_or(1).max(1);
            let params: usize = plan.graph.konst(wv).unwrap().shape.iter().product();
            (per_image * (params / oc)) as u64
        })
        .collect();
    let bops = |ci: usize, b: u8| macs[ci] * u64::from(b) * 8;
    let smallest_bits = p.bits.iter().min().copied().unwrap_or(0);
    let chosen = match p.bops_budget {
        None => pick(&front, p.budget).cloned(),
        Some(maxb) => {
            let o2: Vec<Vec<zq_quant::pareto::Choice2>> = options
                .iter()
                .enumerate()
                .map(|(ci, row)| {
                    row.iter()
                        .map(|c| zq_quant::pareto::Choice2 {
                            bits: c.bits,
                            bytes: c.bytes,
                            bops: bops(ci, c.bits),
                            sensitivity: c.sensitivity,
                        })
                        .collect()
                })
                .collect();
            let f2 = zq_quant::pareto::frontier2(base, &o2);
            zq_quant::pareto::pick2(&f2, p.budget, maxb).map(|q| Point {
                bytes: q.bytes,
                sensitivity: q.sensitivity,
                bits: q.bits.clone(),
            })
        }
    };
    let chosen = chosen.ok_or_else(|| {
        let smallest = front.first().map_or(0, |f| f.bytes);
        let least_bops: u64 = (0..cand.len()).map(|ci| bops(ci, smallest_bits)).sum();
        Error::Usage(match p.bops_budget {
            Some(maxb) if maxb < least_bops => format!(
                "{INFEASIBLE}: --bops-budget {maxb} is below the smallest achievable {least_bops} bit-operations per image (every layer at {smallest_bits} bits)"
            ),
            Some(_) if p.budget >= smallest => format!(
                "{INFEASIBLE}: no assignment meets both --budget {} bytes and --bops-budget",
                p.budget
            ),
            _ => format!(
                "{INFEASIBLE}: --budget {} bytes is below the smallest achievable size, {} bytes ({} with every layer at {smallest_bits} bits)",
                p.budget,
                smallest,
                crate::cli::size::human_bytes(smallest),
            ),
        })
    })?;
    let chosen_bops = chosen
        .bits
        .iter()
        .enumerate()
        .map(|(ci, &b)| bops(ci, b))
        .sum();
    Ok(ParetoReport {
        chosen_bops,
        bops_budget: p.bops_budget,
        macs,
        budget: p.budget,
        candidate_bits: p.bits.clone(),
        layers: names,
        sensitivity: sens,
        predicted_bytes: chosen.bytes,
        chosen,
        frontier: front,
        uniform,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

type Built = (Graph, Vec<LayerReport>, usize, usize);

/// A constant integer tensor `qt` dequantized along axis 0 (zero points 0 of its type) by a new
/// DequantizeLinear node appended to `nodes`; returns the float value it produces.
fn dq_const(
    q: &mut Graph,
    nodes: &mut Vec<Node>,
    name: &str,
    qt: Tensor,
    scale_shape: Vec<usize>,
    scales: Vec<f32>,
) -> ValueId {
    let (dt, shape, nz) = (qt.dtype, qt.shape.clone(), scales.len());
    let qid = q.add_const(format!("{name}_quantized"), qt);
    let sid = q.add_const(
        format!("{name}_scale"),
        Tensor::f32(scale_shape.clone(), scales),
    );
    let zid = q.add_const(
        format!("{name}_zero_point"),
        Tensor::f32(scale_shape, vec![0.0; nz]).cast(dt),
    );
    let d = q.add_value(format!("{name}_dequantized"), DType::F32);
    q.values[d].shape = Some(shape);
    nodes.push(Node {
        name: format!("{name}_DequantizeLinear"),
        op: Op::DequantizeLinear { axis: 0 },
        inputs: vec![Some(qid), Some(sid), Some(zid)],
        outputs: vec![d],
    });
    d
}

/// Insert QuantizeLinear/DequantizeLinear: per-tensor uint8 on activations, per-channel (or
/// per-tensor) signed weights, int32 biases with scale = input scale x weight scale.
/// The expected output shift a weight's quantization error causes: for each output channel,
/// sum over its weights of (dequantized - float) x the mean of the input channel it reads.
fn bias_shift(n: &Node, w: &[f32], wd: &[f32], shape: &[usize], mean: &[f32]) -> Option<Vec<f32>> {
    let m = shape[0];
    let per = w.len() / m;
    let (cg, groups, spatial) = match &n.op {
        Op::Conv(_) => {
            let cg = shape[1];
            (cg, (mean.len() / cg.max(1)).max(1), per / cg.max(1))
        }
        Op::Gemm { trans_b: true, .. } => (per, 1, 1),
        _ => return None,
    };
    if cg * groups != mean.len() || !m.is_multiple_of(groups) {
        return None;
    }
    let mg = m / groups;
    Some(
        (0..m)
            .map(|oc| {
                let base = (oc / mg) * cg;
                (0..per)
                    .map(|j| (wd[oc * per + j] - w[oc * per + j]) * mean[base + j / spatial])
                    .sum()
            })
            .collect(),
    )
}

fn build_qdq(
    g: &Graph,
    act: &HashMap<ValueId, (f32, u8)>,
    means: &HashMap<ValueId, Vec<f32>>,
    o: &QuantizeOptions,
) -> Result<Built> {
    let mut q = g.clone();
    if q.opset < 13 {
        q.opset = 13; // per-axis QuantizeLinear/DequantizeLinear
    }
    // Weights of 4 bits or fewer are stored as INT4 initializers, which need opset 21.
    let bits_of = |n: &Node| o.layer_bits.get(&n.name).copied().unwrap_or(o.wbits);
    if g.nodes.iter().any(|n| {
        n.op.is_weighted()
            && bits_of(n) <= 4
            && !o.keep_float.contains(&n.name)
            && n.input(1).and_then(|w| g.konst(w)).is_some()
    }) {
        q.opset = q.opset.max(21);
    }
    let mut new_nodes: Vec<Node> = Vec::with_capacity(g.nodes.len() * 3);
    let mut remap: HashMap<ValueId, ValueId> = HashMap::new();
    let mut layers = Vec::new();
    let (mut fp32_bytes, mut q_bytes) = (0usize, 0usize);

    // Q -> DQ for an activation value; returns the dequantized value.
    let qdq_act = |q: &mut Graph, nodes: &mut Vec<Node>, v: ValueId| -> ValueId {
        let (scale, zp) = act[&v];
        let name = q.values[v].name.clone();
        let s = q.add_const(format!("{name}_scale"), Tensor::f32(vec![], vec![scale]));
        let z = q.add_const(
            format!("{name}_zero_point"),
            Tensor::f32(vec![], vec![f32::from(zp)]).cast(DType::U8),
        );
        let qv = q.add_value(format!("{name}_quantized"), DType::U8);
        q.values[qv].shape = q.values[v].shape.clone();
        let dv = q.add_value(format!("{name}_dequantized"), DType::F32);
        q.values[dv].shape = q.values[v].shape.clone();
        nodes.push(Node {
            name: format!("{name}_QuantizeLinear"),
            op: Op::QuantizeLinear { axis: 1 },
            inputs: vec![Some(v), Some(s), Some(z)],
            outputs: vec![qv],
        });
        nodes.push(Node {
            name: format!("{name}_DequantizeLinear"),
            op: Op::DequantizeLinear { axis: 1 },
            inputs: vec![Some(qv), Some(s), Some(z)],
            outputs: vec![dv],
        });
        dv
    };

    for i in &g.inputs {
        if act.contains_key(&i.value) {
            let d = qdq_act(&mut q, &mut new_nodes, i.value);
            remap.insert(i.value, d);
        }
    }
    for n in &g.nodes {
        let mut n2 = n.clone();
        for inp in n2.inputs.iter_mut().flatten() {
            if let Some(&d) = remap.get(inp) {
                *inp = d;
            }
        }
        let weighted = n.op.is_weighted() && n.input(1).and_then(|w| g.konst(w)).is_some();
        if weighted {
            let w = g.konst(n.input(1).unwrap()).unwrap();
            let params = w.shape.iter().product::<usize>();
            fp32_bytes += params * 4;
            let keep = o.keep_float.contains(&n.name) || !w.is_float();
            let x_scale = n.input(0).and_then(|x| act.get(&x)).map(|p| p.0);
            let bits = o.layer_bits.get(&n.name).copied().unwrap_or(o.wbits);
            // Per-channel along axis 0 when that is the output axis (Conv, Gemm with transB).
            let axis0 = matches!(n.op, Op::Conv(_) | Op::Gemm { trans_b: true, .. });
            match x_scale {
                _ if bits == 16 && !keep => {
                    // float16 storage: a half-precision initializer and a Cast back to float.
                    let wname = format!("{}_weight", n.name);
                    let h: Vec<f32> = w
                        .to_f32_vec()
                        .iter()
                        .map(|&v| half::f16::from_f32(v).to_f32())
                        .collect();
                    let hid = q.add_const(
                        format!("{wname}_float16"),
                        Tensor::f32(w.shape.clone(), h).cast(DType::F16),
                    );
                    let wf = q.add_value(format!("{wname}_float"), DType::F32);
                    q.values[wf].shape = Some(w.shape.clone());
                    new_nodes.push(Node {
                        name: format!("{wname}_Cast"),
                        op: Op::Cast { to: DType::F32 },
                        inputs: vec![Some(hid)],
                        outputs: vec![wf],
                    });
                    n2.inputs[1] = Some(wf);
                    q_bytes += params * 2
                        + n.input(2)
                            .and_then(|b| g.konst(b))
                            .map_or(0, |b| b.len() * 4);
                    layers.push(LayerReport {
                        name: n.name.clone(),
                        op: n.op.name().to_string(),
                        bits: Some(16),
                        params,
                        kernel: "float16 weights, float kernel",
                    });
                }
                Some(xs) if !keep => {
                    let per_channel = axis0 && !o.per_tensor;
                    let m = if per_channel { w.shape[0] } else { 1 };
                    let wq = quantize_weights(&w.to_f32_vec(), m, bits, o.clip);
                    let wdt = if bits <= 4 && q.opset >= 21 {
                        DType::I4
                    } else {
                        DType::I8
                    };
                    let wname = format!("{}_weight", n.name);
                    let qt = Tensor {
                        dtype: wdt,
                        shape: w.shape.clone(),
                        data: crate::ir::Data::I64(wq.q.iter().map(|&v| i64::from(v)).collect()),
                    };
                    let sshape = if per_channel { vec![m] } else { vec![] };
                    let wd = dq_const(
                        &mut q,
                        &mut new_nodes,
                        &wname,
                        qt,
                        sshape,
                        wq.scales.clone(),
                    );
                    n2.inputs[1] = Some(wd);
                    q_bytes += (params * bits as usize).div_ceil(8) + m * 4;
                    // Bias: int32, scale = x_scale * w_scale.
                    if let Some(b) = n.input(2).and_then(|b| g.konst(b)) {
                        let mut bv = b.to_f32_vec();
                        if o.bias_correction {
                            let mean = n.input(0).and_then(|x| means.get(&x));
                            let wf = w.to_f32_vec();
                            if let Some(shift) = mean
                                .and_then(|mu| bias_shift(n, &wf, &wq.dequantize(), &w.shape, mu))
                                .filter(|s| s.len() == bv.len())
                            {
                                for (b, s) in bv.iter_mut().zip(shift) {
                                    *b -= s;
                                }
                            }
                        }
                        let nb = bv.len();
                        let bs: Vec<f32> = (0..nb)
                            .map(|c| xs * wq.scales[if per_channel { c } else { 0 }])
                            .collect();
                        let bq: Vec<i64> = bv
                            .iter()
                            .zip(&bs)
                            .map(|(&v, &s)| {
                                if s > 0.0 {
                                    (v / s)
                                        .round_ties_even()
                                        .clamp(i32::MIN as f32, i32::MAX as f32)
                                        as i64
                                } else {
                                    0
                                }
                            })
                            .collect();
                        let bname = format!("{}_bias", n.name);
                        let bq = Tensor {
                            dtype: DType::I32,
                            shape: b.shape.clone(),
                            data: crate::ir::Data::I64(bq),
                        };
                        let (bsh, bsv) = if per_channel {
                            (b.shape.clone(), bs.clone())
                        } else {
                            (vec![], vec![bs[0]])
                        };
                        let bd = dq_const(&mut q, &mut new_nodes, &bname, bq, bsh, bsv);
                        n2.inputs[2] = Some(bd);
                        q_bytes += nb * 4;
                    }
                    layers.push(LayerReport {
                        name: n.name.clone(),
                        op: n.op.name().to_string(),
                        bits: Some(bits),
                        params,
                        kernel: match (&n.op, bits) {
                            (Op::Conv(_), 8) => "QLinearConv (int8)",
                            (Op::Gemm { .. } | Op::MatMul, 8) => "QGemm/QLinearMatMul (int8)",
                            _ => "dequantized weights, float kernel",
                        },
                    });
                }
                _ => {
                    q_bytes += params * 4;
                    layers.push(LayerReport {
                        name: n.name.clone(),
                        op: n.op.name().to_string(),
                        bits: None,
                        params,
                        kernel: "float",
                    });
                }
            }
        }
        new_nodes.push(n2);
        for &y in &n.outputs {
            if act.contains_key(&y) {
                let d = qdq_act(&mut q, &mut new_nodes, y);
                remap.insert(y, d);
            }
        }
    }
    q.nodes = new_nodes;
    q.check()
        .map_err(|e| Error::Exec(format!("quantized graph is inconsistent: {e}")))?;
    Ok((q, layers, fp32_bytes, q_bytes))
}
