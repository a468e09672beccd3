//! `zq quantize`: distil (or read) calibration images, fold BN, calibrate activation ranges,
//! plan every layer's quantization (zq-quant), optionally choose per-layer bits on the Pareto
//! frontier, rewrite the graph with QuantizeLinear/DequantizeLinear, serialise, and estimate the
//! result's quality against FP32 on held-out distilled images by running the emitted graph
//! itself (zq executes QuantizeLinear and DequantizeLinear exactly as ONNX defines them, so the
//! estimate is of the model written). This file orchestrates; the rooms beside it calibrate,
//! search and report.

pub mod calibrate;
pub mod refine;
pub mod report;
pub mod search;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use zq_quant::bias::LayerKind;
use zq_quant::{plan_layer, ClipSearch, LayerOptions, LayerQuant, LayerSpec, QuantPlan};

pub use report::{ActReport, LayerReport, ParetoReport, Quality, QuantizeReport};

use crate::data::Preprocess;
use crate::error::{Error, Result};
use crate::exec::Plan;
use crate::ir::passes::{fold_bn, insert_qdq};
use crate::ir::{Graph, Node, Op, ValueId};
use crate::pipeline::distill;
use calibrate::Calibration;

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
    /// Activation bits (2..=8).
    pub abits: u8,
    /// Which activations `abits` applies to.
    pub abits_scope: AbitsScope,
    /// Per-layer activation bits (of the layer's input), by node name.
    pub layer_abits: BTreeMap<String, u8>,
    /// Block-wise reconstruction after planning (`None`: round to nearest).
    pub refine: Option<zq_quant::refine::RefineOptions>,
    pub per_tensor: bool,
    /// Weight scale search.
    pub clip: ClipSearch,
    /// Grid of weights of 2..=4 bits (wider ones are symmetric).
    pub int4_grid: zq_quant::Grid,
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
    /// Bounds on the estimated quality; a miss is reported, and nothing should be written.
    pub gate: Gate,
}

/// Which activations `--abits` sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbitsScope {
    /// Inputs of weighted layers; every other activation stays at 8 bits.
    LayerInputs,
    /// Every quantized activation.
    All,
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
    /// Largest bit-operation count per image (sum over layers of MACs x weight bits x input bits).
    pub bops_budget: Option<u64>,
    /// Candidate weight bit widths.
    pub bits: Vec<u8>,
    /// Candidate activation bits of layer inputs (empty: inputs keep their bits); used with
    /// `bops_budget`.
    pub abits: Vec<u8>,
}

/// The quality gate: `--min-agreement`, `--max-kl` on the held-out estimate.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Gate {
    pub min_agreement: Option<f64>,
    pub max_kl: Option<f64>,
}

impl Gate {
    /// What the estimate misses, one entry per bound (empty: passed).
    pub fn failures(&self, q: &Quality) -> Vec<String> {
        let mut failed = Vec::new();
        if let Some(m) = self.min_agreement.filter(|&m| q.agreement < m) {
            failed.push(format!(
                "estimated agreement with FP32 {:.4} < --min-agreement {m}",
                q.agreement
            ));
        }
        if let Some(k) = self.max_kl.filter(|&k| q.kl > k) {
            failed.push(format!("estimated KL from FP32 {:.5} > --max-kl {k}", q.kl));
        }
        failed
    }
}

/// A weight width zq can store: 2..=8 integer bits, or 16 for float16.
pub fn valid_bits(b: u8) -> bool {
    (2..=8).contains(&b) || b == 16
}

/// The first and the last weighted layer of a graph, by name.
pub(crate) struct EndLayers {
    pub first: Option<String>,
    pub last: Option<String>,
}

pub(crate) fn end_layers(g: &Graph) -> EndLayers {
    let mut w = g.nodes.iter().filter(|n| n.op.is_weighted());
    let first = w.next().map(|n| n.name.clone());
    let last = g
        .nodes
        .iter()
        .rev()
        .find(|n| n.op.is_weighted())
        .map(|n| n.name.clone());
    EndLayers { first, last }
}

impl QuantizeOptions {
    /// Whether the low-bit defaults apply (below 8 activation bits, or with reconstruction):
    /// the first layer's weights and the last layer (weights and input) stay at 8 bits, and the
    /// network input at 8, unless `--layer-bits`/`--layer-abits` say otherwise.
    pub fn low_bit_defaults(&self) -> bool {
        self.abits < 8 || self.refine.is_some()
    }

    /// The weight bits of layer `name` (`ends`: the graph's first and last weighted layers).
    pub(crate) fn weight_bits(&self, name: &str, ends: &EndLayers) -> u8 {
        if let Some(&b) = self.layer_bits.get(name) {
            return b;
        }
        let end = ends.first.as_deref() == Some(name) || ends.last.as_deref() == Some(name);
        if self.low_bit_defaults() && end && self.wbits < 8 {
            8
        } else {
            self.wbits
        }
    }

    /// Every check on the options, for the CLI and library callers alike: a caller that skips
    /// the command line gets the same one-line errors, never an assert deep inside.
    pub fn validate(&self, g: &Graph) -> Result<()> {
        let usage = |m: String| Err(Error::Usage(m));
        if !valid_bits(self.wbits) {
            return usage(format!(
                "--wbits must be between 2 and 8, or 16 (float16), got {}",
                self.wbits
            ));
        }
        if !(2..=8).contains(&self.abits) {
            return usage(format!(
                "--abits must be between 2 and 8, got {}",
                self.abits
            ));
        }
        let layers: HashSet<&str> = g
            .nodes
            .iter()
            .filter(|n| n.op.is_weighted())
            .map(|n| n.name.as_str())
            .collect();
        for (name, &b) in &self.layer_bits {
            if !layers.contains(name.as_str()) {
                return usage(format!(
                    "--layer-bits: no quantizable layer named '{name}' (zq inspect lists them)"
                ));
            }
            if !valid_bits(b) {
                return usage(format!(
                    "--layer-bits {name}={b}: bits must be between 2 and 8, or 16 (float16)"
                ));
            }
        }
        for (name, &b) in &self.layer_abits {
            if !layers.contains(name.as_str()) {
                return usage(format!(
                    "--layer-abits: no quantizable layer named '{name}' (zq inspect lists them)"
                ));
            }
            if !(2..=8).contains(&b) {
                return usage(format!(
                    "--layer-abits {name}={b}: activation bits must be between 2 and 8"
                ));
            }
        }
        if let Some(r) = &self.refine {
            if r.iters == 0 || r.batch == 0 {
                return usage("--refine-iters and --refine-batch must be at least 1".into());
            }
            for (flag, lr) in [
                ("--refine-lr", r.lr_round),
                ("--refine-lr-weight-scale", r.lr_weight_scale),
                ("--refine-lr-act-scale", r.lr_act_scale),
            ] {
                if !(lr.is_finite() && lr >= 0.0) {
                    return usage(format!("{flag} must be a non-negative number, got {lr}"));
                }
            }
            if !(0.0..=1.0).contains(&r.qdrop) {
                return usage(format!(
                    "--refine-qdrop must be a probability between 0 and 1, got {}",
                    r.qdrop
                ));
            }
        }
        for name in &self.keep_float {
            if !layers.contains(name.as_str()) {
                return usage(format!(
                    "--keep-float: no quantizable layer named '{name}' (zq inspect lists them)"
                ));
            }
        }
        if let Calib::Distill { num: 0, .. } | Calib::Images { num: 0, .. } = self.calib {
            return usage("--num must be at least 1".into());
        }
        if let Some(m) = self.gate.min_agreement.filter(|m| !(0.0..=1.0).contains(m)) {
            return usage(format!("--min-agreement must be between 0 and 1, got {m}"));
        }
        if let Some(k) = self.gate.max_kl.filter(|k| !(*k >= 0.0 && k.is_finite())) {
            return usage(format!("--max-kl must be a non-negative number, got {k}"));
        }
        if self.gate != Gate::default() && self.holdout == 0 {
            return usage("--min-agreement/--max-kl need held-out images (--holdout > 0)".into());
        }
        if !(self.bn_sigmas.is_finite() && self.bn_sigmas >= 0.0) {
            return usage(format!(
                "--bn-sigmas must be a non-negative number, got {}",
                self.bn_sigmas
            ));
        }
        if !(self.residual_widen.is_finite() && self.residual_widen >= 1.0) {
            return usage(format!(
                "--residual-widen must be at least 1, got {}",
                self.residual_widen
            ));
        }
        if let Some(p) = &self.pareto {
            if let Some(b) = p.bits.iter().find(|b| !valid_bits(**b)) {
                return usage(format!(
                    "--bits: '{b}' is not a bit width (2 to 8, or 16 for float16)"
                ));
            }
            if p.bits.is_empty() {
                return usage("--bits: no candidate bit width".into());
            }
            if p.budget == u64::MAX && p.bops_budget.is_none() {
                return usage("--pareto needs --budget SIZE and/or --bops-budget BOPS".into());
            }
        }
        Ok(())
    }
}

/// A quantized model: its graph, the report, and the output file's bytes.
pub struct Quantized {
    pub graph: Graph,
    pub report: QuantizeReport,
    /// The output file's bytes, serialised in the requested format.
    pub bytes: Vec<u8>,
}

/// How zq-quant sees a layer's weight layout.
pub(crate) fn layer_kind(op: &Op) -> LayerKind {
    match op {
        Op::Conv(_) => LayerKind::Conv,
        Op::Gemm { trans_b: true, .. } => LayerKind::DenseOutMajor,
        _ => LayerKind::Other,
    }
}

/// The plan of one weighted node with constant weights (`None` for any other node).
pub(crate) fn plan_node(
    g: &Graph,
    n: &Node,
    cal: &Calibration,
    o: &QuantizeOptions,
    ends: &EndLayers,
) -> Option<LayerQuant> {
    if !n.op.is_weighted() {
        return None;
    }
    let w = n.input(1).and_then(|w| g.konst(w))?;
    if o.keep_float.contains(&n.name) || !w.is_float() {
        return Some(LayerQuant::Float);
    }
    let weight = w.to_f32_vec();
    let bias = n.input(2).and_then(|b| g.konst(b)).map(|b| b.to_f32_vec());
    let spec = LayerSpec {
        kind: layer_kind(&n.op),
        shape: &w.shape,
        weight: &weight,
        bias: bias.as_deref(),
    };
    let x = n.input(0);
    Some(plan_layer(
        &spec,
        x.and_then(|x| cal.params.get(&x)).copied(),
        x.and_then(|x| cal.means.get(&x)).map(Vec::as_slice),
        &LayerOptions {
            bits: o.weight_bits(&n.name, ends),
            per_tensor: o.per_tensor,
            clip: o.clip,
            grid: o.int4_grid,
            bias_correction: o.bias_correction,
        },
    ))
}

/// The whole model's plan: calibrated activations, and every layer planned.
pub(crate) fn quantization_plan(
    g: &Graph,
    cal: &Calibration,
    o: &QuantizeOptions,
) -> QuantPlan<ValueId> {
    let ends = end_layers(g);
    QuantPlan {
        activations: cal.params.clone(),
        layers: g
            .nodes
            .iter()
            .filter_map(|n| plan_node(g, n, cal, o, &ends).map(|l| (n.name.clone(), l)))
            .collect(),
    }
}

/// Fix the rewritten graph's declared output shapes (checkers require them): specialise once
/// for batch 1; the writer puts the symbolic batch back.
pub(crate) fn finalize(mut qg: Graph) -> Result<Graph> {
    let one = Plan::new(&qg, 1)?;
    for &v in &qg.outputs.clone() {
        if qg.values[v].shape.is_none() {
            qg.values[v].shape = one.graph.values[v].shape.clone();
        }
    }
    Ok(qg)
}

/// The valid input interval over all channels (pixels in [0,1] through the preprocessing).
fn input_interval(g: &Graph, path: &Path, pre: &Preprocess) -> Result<(f32, f32)> {
    let chw = crate::pipeline::eval::chw_of(g, path)?;
    let bx = distill::input_box(&pre.per_channel(chw[0])?);
    Ok((
        bx.iter().map(|b| b.0).fold(f32::INFINITY, f32::min),
        bx.iter().map(|b| b.1).fold(f32::NEG_INFINITY, f32::max),
    ))
}

/// The whole pipeline. `progress(stage, done, total)` reports long stages.
pub fn quantize(
    g0: &Graph,
    path: &Path,
    o: &QuantizeOptions,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<Quantized> {
    o.validate(g0)?;
    let input_box = input_interval(g0, path, &o.pre)?;
    let set = calibrate::images(g0, path, o, progress)?;
    let (g, prior, folded) = fold_bn(g0);
    let mut cal = calibrate::calibrate(&g, &prior, &set, input_box, o, progress)?;
    let model_name = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut o = o.clone();
    let pareto = match o.pareto.clone() {
        Some(p) => {
            let batch = set.n.min(calibrate::BATCH);
            let per = set.images.len() / set.n.max(1);
            let x = &set.images[..batch * per];
            let r = search::search(&g, x, batch, &cal, &o, &p, &model_name, progress)?;
            for (name, &b) in r.layers.iter().zip(&r.chosen.bits) {
                o.layer_bits.insert(name.clone(), b);
            }
            if !r.act_sensitivity.is_empty() {
                // Input bits chosen by the search: calibrate their ranges at those widths.
                let before = calibrate::activation_bits(&g, &o);
                for (name, &a) in r.layers.iter().zip(&r.abits) {
                    o.layer_abits.insert(name.clone(), a);
                }
                if calibrate::activation_bits(&g, &o) != before {
                    cal = calibrate::calibrate(&g, &prior, &set, input_box, &o, progress)?;
                }
            }
            Some(r)
        }
        None => None,
    };
    let mut plan = quantization_plan(&g, &cal, &o);
    let mut refined = None;
    let mut qg = None;
    if let Some(r) = &o.refine {
        let rtn = plan.clone();
        let mut rep = refine::refine(&g, &mut plan, &set.images, set.n, r, progress)?;
        // Refinement fits the calibration images; where held-out images exist, the refined
        // model is kept only if it is no further from FP32 on them than round to nearest.
        if let Some((hx, hn)) = &set.holdout {
            progress("checking refinement on held-out images", 0, 1);
            let q_ref = finalize(insert_qdq(&g, &plan)?)?;
            let q_rtn = finalize(insert_qdq(&g, &rtn)?)?;
            let kl_ref = estimate(g0, &q_ref, path, hx, *hn)?.kl;
            let kl_rtn = estimate(g0, &q_rtn, path, hx, *hn)?.kl;
            let keep_rtn = kl_ref > kl_rtn;
            rep.holdout = Some(refine::HoldoutCheck {
                kl_round_to_nearest: kl_rtn,
                kl_refined: kl_ref,
                kept_round_to_nearest: keep_rtn,
            });
            if keep_rtn {
                plan = rtn;
                qg = Some(q_rtn);
            } else {
                qg = Some(q_ref);
            }
        }
        refined = Some(rep);
    }
    let qg = match qg {
        Some(q) => q,
        None => finalize(insert_qdq(&g, &plan)?)?,
    };
    let (layers, fp32_bytes, q_bytes) = report::layers(&g, &plan);
    let bytes = report::serialize(&qg, o.format, &model_name, &layers)?;
    if let Some(p) = pareto.as_ref().filter(|p| bytes.len() as u64 > p.budget) {
        return Err(Error::Infeasible(format!(
            "the chosen assignment serialises to {} bytes, over the budget of {} (predicted {})",
            bytes.len(),
            p.budget,
            p.predicted_bytes
        )));
    }
    let quality = match &set.holdout {
        Some((hx, hn)) => {
            progress("estimating quality", 0, 1);
            Some(estimate(g0, &qg, path, hx, *hn)?)
        }
        None => None,
    };
    Ok(Quantized {
        graph: qg,
        bytes,
        report: QuantizeReport {
            model: path.display().to_string(),
            bn_folded: folded,
            calibration: set.label,
            calibration_images: set.n,
            layers,
            activations: cal.reports,
            fp32_weight_bytes: fp32_bytes,
            quantized_weight_bytes: q_bytes,
            quality,
            pareto,
            refine: refined,
        },
    })
}

/// Agreement and KL of the quantized graph against FP32 on `n` held-out images.
fn estimate(fp32: &Graph, quantized: &Graph, path: &Path, x: &[f32], n: usize) -> Result<Quality> {
    let (a, k) = logits(fp32, path, x, n)?;
    let (b, _) = logits(quantized, path, x, n)?;
    Ok(report::compare(&a, &b, k))
}

/// Images run together when scoring.
const SCORE_BATCH: usize = 64;

/// Run `g` on `n` images `x` in batches; returns [n, K] scores flattened and K.
fn logits(g: &Graph, path: &Path, x: &[f32], n: usize) -> Result<(Vec<f32>, usize)> {
    let mut clf = crate::pipeline::eval::ZqClassifier::new(g.clone(), path)?;
    let per = x.len() / n.max(1);
    let (mut out, mut k) = (Vec::with_capacity(x.len()), 0);
    for s in (0..n).step_by(SCORE_BATCH) {
        let m = SCORE_BATCH.min(n - s);
        let (y, kk) = clf.scores(&x[s * per..(s + m) * per], m)?;
        out.extend(y);
        k = kk;
    }
    Ok((out, k))
}
