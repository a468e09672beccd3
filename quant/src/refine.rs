//! Block-wise reconstruction: learned rounding (AdaRound) and, for Genie-M, learned weight and
//! activation step sizes with QDrop, fitted one block at a time so that the quantized block's
//! output matches the FP32 block's on calibration images.
//!
//! The quantizers are candle tensors over [`Var`]s trained with candle-nn's Adam; the caller
//! runs its block (any subgraph) through the [`Block`] trait, calling back here for every
//! activation quantizer, so nothing in this module knows about graphs or files.
//!
//! - Soft rounding (Nagel et al. 2020): `w_q = s * clamp(floor(w/s0) + h(V), qmin - z, qmax - z)` with the
//!   rectified sigmoid `h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)`, `V` initialised so
//!   that `h(V)` is the fractional part of `w/s0`, and the regulariser
//!   `sum(1 - |2h(V) - 1|^beta)` with `beta` annealed from 20 to 2 after a warm-up. Hardened at
//!   the end: `q = floor(w/s0) + [V >= 0]`.
//! - Genie-M (Jeon et al. 2023): the same with the integer base frozen at `floor(w/s0)` while the
//!   per-channel step `s` is learnable; activation steps learned as in LSQ (round with a
//!   straight-through gradient); QDrop keeps each activation in float with probability `p`.

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

use crate::range::ActQuant;
use crate::weights::{Grid, QRange, WeightQuant};
use zq_kernels::rng::{mix, SplitMix64, GOLDEN};

/// Rectified sigmoid stretch (AdaRound's gamma and zeta).
const GAMMA: f64 = -0.1;
const ZETA: f64 = 1.1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Learned rounding with fixed step sizes.
    AdaRound,
    /// Learned rounding, learned weight and activation steps, QDrop.
    Genie,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::AdaRound => "adaround",
            Method::Genie => "genie",
        }
    }
}

/// How one block is reconstructed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RefineOptions {
    pub method: Method,
    /// Optimiser steps per block.
    pub iters: usize,
    /// Images per step.
    pub batch: usize,
    /// Adam learning rates: soft-rounding variables, weight steps, activation steps.
    pub lr_round: f64,
    pub lr_weight_scale: f64,
    pub lr_act_scale: f64,
    /// Weight of the rounding regulariser against the reconstruction error.
    pub reg_weight: f64,
    /// Fraction of the steps before the regulariser starts.
    pub warmup: f64,
    /// Regulariser exponent at the start and at the end of its annealing.
    pub beta: (f64, f64),
    /// Probability of keeping an activation in float during reconstruction (Genie-M's QDrop).
    pub qdrop: f64,
    pub seed: u64,
}

impl RefineOptions {
    /// The defaults for a method, scaled for a few minutes on 2 CPU cores (the reference runs 20k
    /// steps per block on a GPU at a tenth of these rounding learning rates).
    pub fn new(method: Method, seed: u64) -> RefineOptions {
        RefineOptions {
            method,
            iters: 500,
            batch: 32,
            lr_round: 1e-2,
            lr_weight_scale: 1e-4,
            lr_act_scale: 4e-4,
            reg_weight: 0.01,
            warmup: 0.2,
            beta: (20.0, 2.0),
            qdrop: if method == Method::Genie { 0.5 } else { 0.0 },
            seed,
        }
    }

    /// The regulariser's exponent at step `t`, `None` during the warm-up.
    pub fn beta_at(&self, t: usize) -> Option<f64> {
        let start = (self.warmup * self.iters as f64) as usize;
        if t < start {
            return None;
        }
        let rel = (t - start) as f64 / (self.iters - start).max(1) as f64;
        Some(self.beta.1 + (self.beta.0 - self.beta.1) * (1.0 - rel).max(0.0))
    }
}

/// One layer's weight quantizer with learned rounding.
pub struct SoftWeight {
    shape: Vec<usize>,
    bits: u8,
    range: QRange,
    /// `floor(w / s0)`, frozen.
    base: Tensor,
    v: Var,
    /// Per-channel step, `[C, 1, ...]` (or `[1, ...]` per tensor); a `Var` when learnable.
    scale: Var,
    learn_scale: bool,
    channels: usize,
    /// The plan's steps, kept where a learned one would not be positive.
    initial: Vec<f32>,
    /// Affine grids: the plan's zero points, and the per-channel bounds `qmin - z`, `qmax - z`
    /// of `floor(w / s0) + h(V)`, `[C, 1, ...]`.
    zero_points: Vec<i8>,
    bounds: Option<(Tensor, Tensor)>,
}

impl SoftWeight {
    /// `w` laid out `[channels, ...]` with the plan's round-to-nearest quantization `plan` (one
    /// step, and on an affine grid one zero point, per channel or for the tensor).
    pub fn new(
        w: &[f32],
        shape: &[usize],
        plan: &WeightQuant,
        learn_scale: bool,
        dev: &Device,
    ) -> Result<SoftWeight> {
        let (scales, bits) = (&plan.scales, plan.bits);
        let channels = scales.len();
        if channels == 0 || !w.len().is_multiple_of(channels) {
            candle_core::bail!("{} weights for {channels} scales", w.len());
        }
        if !plan.zero_points.is_empty() && plan.zero_points.len() != channels {
            candle_core::bail!(
                "{} zero points for {channels} scales",
                plan.zero_points.len()
            );
        }
        let per = w.len() / channels;
        let grid = if plan.zero_points.is_empty() {
            Grid::Symmetric
        } else {
            Grid::Affine
        };
        let range = grid.range(bits);
        let mut base = Vec::with_capacity(w.len());
        let mut v0 = Vec::with_capacity(w.len());
        for (i, &x) in w.iter().enumerate() {
            let s = scales[i / per];
            let u = if s > 0.0 { x / s } else { 0.0 };
            let f = u.floor();
            base.push(f);
            // h(V) = rest  <=>  sigmoid(V) = (rest - gamma) / (zeta - gamma).
            let rest = f64::from(u - f);
            let p = ((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1.0 - 1e-4);
            v0.push((p / (1.0 - p)).ln() as f32);
        }
        let mut sshape = vec![1usize; shape.len().max(1)];
        sshape[0] = channels;
        let bounds = if plan.zero_points.is_empty() {
            None
        } else {
            let z = |off: i32| -> Vec<f32> {
                plan.zero_points
                    .iter()
                    .map(|&z| (off - i32::from(z)) as f32)
                    .collect()
            };
            Some((
                Tensor::from_vec(z(range.min), sshape.clone(), dev)?,
                Tensor::from_vec(z(range.max), sshape.clone(), dev)?,
            ))
        };
        Ok(SoftWeight {
            shape: shape.to_vec(),
            bits,
            range,
            base: Tensor::from_vec(base, shape, dev)?,
            v: Var::from_vec(v0, shape, dev)?,
            scale: Var::from_vec(scales.to_vec(), sshape, dev)?,
            learn_scale,
            channels,
            initial: scales.to_vec(),
            zero_points: plan.zero_points.clone(),
            bounds,
        })
    }

    /// Clamp integer offsets (from the zero point) to the grid.
    fn clamp_q(&self, q: &Tensor) -> Result<Tensor> {
        match &self.bounds {
            None => q.clamp(self.range.min as f32, self.range.max as f32),
            Some((lo, hi)) => q.broadcast_maximum(lo)?.broadcast_minimum(hi),
        }
    }

    fn h(&self) -> Result<Tensor> {
        let s = candle_nn::ops::sigmoid(self.v.as_tensor())?;
        ((s * (ZETA - GAMMA))? + GAMMA)?.clamp(0f32, 1f32)
    }

    fn scale(&self) -> Tensor {
        if self.learn_scale {
            self.scale.as_tensor().clone()
        } else {
            self.scale.as_tensor().detach()
        }
    }

    /// The soft-rounded weight used while training.
    pub fn weight(&self) -> Result<Tensor> {
        let q = self.clamp_q(&(&self.base + self.h()?)?)?;
        q.broadcast_mul(&self.scale())
    }

    /// The hardened integer weight less its zero point, as a tensor of integer values.
    fn hard_q(&self) -> Result<Tensor> {
        let up = self.v.as_tensor().ge(0f32)?.to_dtype(DType::F32)?;
        self.clamp_q(&(&self.base + up)?)
    }

    /// The hardened weight, dequantized (for running later blocks on the quantized model).
    pub fn hard_weight(&self) -> Result<Tensor> {
        self.hard_q()?
            .broadcast_mul(&self.scale.as_tensor().detach())
    }

    /// `sum(1 - |2h(V) - 1|^beta)`: zero once every variable has chosen a side.
    pub fn regulariser(&self, beta: f64) -> Result<Tensor> {
        let d = ((self.h()? * 2.0)? - 1.0)?.abs()?.powf(beta)?;
        (1.0 - d)?.sum_all()
    }

    /// The result: integers and (possibly learned) steps; a learned step that is not positive
    /// falls back to the plan's.
    pub fn harden(&self) -> Result<WeightQuant> {
        let q = self.hard_q()?.flatten_all()?.to_vec1::<f32>()?;
        let scales = self.scale.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let per = q.len() / self.channels;
        let zp = |i: usize| self.zero_points.get(i / per).map_or(0.0, |&z| f32::from(z));
        Ok(WeightQuant {
            bits: self.bits,
            zero_points: self.zero_points.clone(),
            q: q.into_iter()
                .enumerate()
                .map(|(i, v)| (v + zp(i)) as i8)
                .collect(),
            scales: scales
                .into_iter()
                .zip(&self.initial)
                .map(|(s, &s0)| if s > 0.0 { s } else { s0 })
                .collect(),
        })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Output channels (or 1 per tensor).
    pub fn channels(&self) -> usize {
        self.channels
    }
}

/// Fake quantization `s * clamp(round(x/s), lo, hi)` of a tensor by a one-element step `s` as one
/// fused op (elementwise candle ops would allocate and pass over the activation a dozen times):
/// the straight-through gradient for `x` (1 inside the range, 0 where clamped) and LSQ's for `s`
/// (`round(u) - u` inside, the clamped level outside). With `drop = Some((p, seed))` each element
/// is kept in float with probability `p` (QDrop, in steps of 1/256), chosen by a hash of `seed`
/// and its index: one hash gives the bytes of eight elements.
struct FakeQuant {
    lo: f32,
    hi: f32,
    drop: Option<(f64, u64)>,
}

/// Elements per parallel task of the fused elementwise ops (a multiple of 8).
const CHUNK: usize = 1 << 14;

impl FakeQuant {
    /// For the group of eight elements starting at `8 * group`: bit j set when element j stays
    /// in float.
    fn kept_mask(&self, group: usize) -> u8 {
        let Some((p, seed)) = self.drop else {
            return 0;
        };
        let threshold = (p * 256.0).round().clamp(0.0, 256.0) as u32;
        let h = mix(seed ^ (group as u64).wrapping_mul(GOLDEN));
        let mut m = 0u8;
        for j in 0..8 {
            if (((h >> (8 * j)) & 0xFF) as u32) < threshold {
                m |= 1 << j;
            }
        }
        m
    }

    /// `round_half_even(u)` for the decisions of this quantizer: `u` is first clamped to one
    /// level beyond the range (which changes neither the clamped level nor which side of the
    /// range it falls on), so that the branch-free rounding, which vectorizes, is exact.
    fn round(&self, u: f32) -> f32 {
        crate::numeric::round_half_even_small(u.clamp(self.lo - 1.0, self.hi + 1.0))
    }

    /// `y = fq(x)` over one chunk whose first element has index `start` (a multiple of 8).
    fn forward_chunk(&self, s: f32, start: usize, x: &[f32], y: &mut [f32]) {
        for (g, (y, x)) in y.chunks_mut(8).zip(x.chunks(8)).enumerate() {
            let m = self.kept_mask(start / 8 + g);
            for (j, (y, &x)) in y.iter_mut().zip(x).enumerate() {
                let q = self.round(x / s).clamp(self.lo, self.hi) * s;
                *y = if m >> j & 1 == 1 { x } else { q };
            }
        }
    }

    /// `dx` over one chunk, returning its share of `ds`.
    fn backward_chunk(&self, s: f32, start: usize, x: &[f32], dy: &[f32], dx: &mut [f32]) -> f64 {
        let mut acc = 0f64;
        for (g, ((dx, x), dy)) in dx
            .chunks_mut(8)
            .zip(x.chunks(8))
            .zip(dy.chunks(8))
            .enumerate()
        {
            let m = self.kept_mask(start / 8 + g);
            let mut part = 0f32;
            for (j, ((dx, &x), &g)) in dx.iter_mut().zip(x).zip(dy).enumerate() {
                let u = x / s;
                let r = self.round(u);
                let kept = m >> j & 1 == 1;
                let inside = r >= self.lo && r <= self.hi;
                let level = if r < self.lo {
                    self.lo
                } else if r > self.hi {
                    self.hi
                } else {
                    r - u
                };
                *dx = if kept || inside { g } else { 0.0 };
                part += if kept { 0.0 } else { g * level };
            }
            acc += f64::from(part);
        }
        acc
    }
}

fn storage_slice<'a>(s: &'a candle_core::CpuStorage, l: &candle_core::Layout) -> Result<&'a [f32]> {
    let (a, b) = l.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("fake quantization needs contiguous input".into())
    })?;
    Ok(&s.as_slice::<f32>()?[a..b])
}

/// `f` on the contiguous f32 values of a CPU tensor, without copying them out.
fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cs) => f(storage_slice(cs, layout)?),
        _ => candle_core::bail!("fake quantization runs on the CPU"),
    }
}

impl candle_core::CustomOp2 for FakeQuant {
    fn name(&self) -> &'static str {
        "zq-fake-quant"
    }

    fn cpu_fwd(
        &self,
        xs: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        ss: &candle_core::CpuStorage,
        sl: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let x = storage_slice(xs, xl)?;
        let s = storage_slice(ss, sl)?[0];
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .enumerate()
            .for_each(|(c, (y, x))| self.forward_chunk(s, c * CHUNK, x, y));
        Ok((candle_core::CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        s: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        use rayon::prelude::*;
        let sv = s.flatten_all()?.to_vec1::<f32>()?[0];
        let (dx, ds) = with_values(x, |xv| {
            with_values(dy, |dyv| {
                let mut dx = vec![0f32; xv.len()];
                let ds: f64 = dx
                    .par_chunks_mut(CHUNK)
                    .zip(xv.par_chunks(CHUNK).zip(dyv.par_chunks(CHUNK)))
                    .enumerate()
                    .map(|(c, (dx, (x, dy)))| self.backward_chunk(sv, c * CHUNK, x, dy, dx))
                    .collect::<Vec<f64>>()
                    .iter()
                    .sum();
                Ok((dx, ds))
            })
        })?;
        let dx = Tensor::from_vec(dx, x.shape(), x.device())?;
        let ds = Tensor::from_vec(vec![ds as f32], s.shape(), s.device())?;
        Ok((Some(dx), Some(ds)))
    }
}

/// One activation's quantizer: `s * clamp(round(x/s), -z, qmax - z)` with the integer zero point
/// `z` fixed and the step `s` learnable (LSQ) when asked.
pub struct LsqAct {
    base: ActQuant,
    scale: Var,
    learn: bool,
}

impl LsqAct {
    pub fn new(a: ActQuant, learn: bool, dev: &Device) -> Result<LsqAct> {
        Ok(LsqAct {
            base: a,
            scale: Var::from_vec(vec![a.scale], 1, dev)?,
            learn: learn && a.scale > 0.0,
        })
    }

    /// The fake-quantized activation.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        self.apply_dropping(x, None)
    }

    /// The fake-quantized activation with each element kept in float at probability `p`
    /// (`drop = Some((p, seed))`).
    pub fn apply_dropping(&self, x: &Tensor, drop: Option<(f64, u64)>) -> Result<Tensor> {
        let s = if self.learn {
            self.scale.as_tensor().clone()
        } else {
            self.scale.as_tensor().detach()
        };
        let z = f32::from(self.base.zero_point);
        let op = FakeQuant {
            lo: -z,
            hi: f32::from(self.base.qmax()) - z,
            drop,
        };
        x.contiguous()?.apply_op2(&s, op)
    }

    /// The learned parameters (same zero point and bits, the new step).
    pub fn result(&self) -> Result<ActQuant> {
        let s = self.scale.as_tensor().to_vec1::<f32>()?[0];
        Ok(ActQuant {
            scale: if s > 0.0 { s } else { self.base.scale },
            ..self.base
        })
    }
}

/// A block of the caller's model, run forward on a batch.
pub trait Block {
    /// The block's output for input `x`, with `weights[i]` as its layer `i`'s weight and
    /// `act(k, t)` applied to its activation `k` wherever the quantized model quantizes it
    /// (`k` indexes the activation quantizers given to [`reconstruct`]).
    fn forward(
        &self,
        x: &Tensor,
        weights: &[Tensor],
        act: &mut dyn FnMut(usize, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor>;
}

/// Squared error summed over channels (axis 1), averaged over the rest, as BRECQ measures it.
fn reconstruction_error(y: &Tensor, t: &Tensor) -> Result<Tensor> {
    let c = if y.rank() >= 2 { y.dim(1)? } else { 1 };
    let per = (y.elem_count() / c).max(1) as f64;
    (y - t)?.sqr()?.sum_all()? / per
}

/// What reconstruction did to one block.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct BlockResult {
    /// Reconstruction error on all calibration images, before and after (hardened).
    pub error_before: f64,
    pub error_after: f64,
}

/// The seeded stream for batches and QDrop masks.
struct Rng(SplitMix64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(SplitMix64::new(seed))
    }
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Run `block` over all images of `x` in chunks of `batch` with `weights` and the activation
/// quantizers `act` (no gradient is kept).
pub fn run_batched(
    block: &dyn Block,
    x: &Tensor,
    weights: &[Tensor],
    batch: usize,
    act: &mut dyn FnMut(usize, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let n = x.dim(0)?;
    let mut out = Vec::new();
    for s in (0..n).step_by(batch.max(1)) {
        let m = batch.min(n - s);
        let xb = x.narrow(0, s, m)?;
        out.push(block.forward(&xb, weights, act)?.detach());
    }
    Tensor::cat(&out, 0)
}

/// Run `block` over all images of `x` in chunks of `batch`, with the hardened weights and
/// plain (no QDrop) quantizers.
pub fn run_quantized(
    block: &dyn Block,
    x: &Tensor,
    weights: &[SoftWeight],
    acts: &[LsqAct],
    batch: usize,
) -> Result<Tensor> {
    let w: Vec<Tensor> = weights
        .iter()
        .map(SoftWeight::hard_weight)
        .collect::<Result<_>>()?;
    run_batched(block, x, &w, batch, &mut |k, t| acts[k].apply(t))
}

fn error_on_all(
    block: &dyn Block,
    x: &Tensor,
    target: &Tensor,
    weights: &[SoftWeight],
    acts: &[LsqAct],
    batch: usize,
) -> Result<f64> {
    let y = run_quantized(block, x, weights, acts, batch)?;
    reconstruction_error(&y, target)?
        .to_scalar::<f32>()
        .map(f64::from)
}

/// Fit `weights` and `acts` of `block` so that its output on the quantized model's inputs `x`
/// ([N, ...]) matches the FP32 block's `target` ([N, ...]); hardens nothing (call
/// [`SoftWeight::harden`] and [`LsqAct::result`] after). `progress(step)` once per step.
pub fn reconstruct(
    block: &dyn Block,
    x: &Tensor,
    target: &Tensor,
    weights: &[SoftWeight],
    acts: &[LsqAct],
    o: &RefineOptions,
    progress: &mut dyn FnMut(usize),
) -> Result<BlockResult> {
    let n = x.dim(0)?;
    let batch = o.batch.min(n).max(1);
    let error_before = error_on_all(block, x, target, weights, acts, batch)?;
    let adam = |lr: f64| ParamsAdamW {
        lr,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt_round = AdamW::new(
        weights.iter().map(|w| w.v.clone()).collect(),
        adam(o.lr_round),
    )?;
    let learn_w = o.method == Method::Genie;
    let mut opt_wscale = learn_w
        .then(|| {
            AdamW::new(
                weights.iter().map(|w| w.scale.clone()).collect(),
                adam(o.lr_weight_scale),
            )
        })
        .transpose()?;
    let act_vars: Vec<Var> = acts
        .iter()
        .filter(|a| a.learn)
        .map(|a| a.scale.clone())
        .collect();
    let mut opt_act = (!act_vars.is_empty())
        .then(|| AdamW::new(act_vars, adam(o.lr_act_scale)))
        .transpose()?;
    let mut rng = Rng::new(o.seed);
    let dev = x.device().clone();
    for t in 0..o.iters {
        let idx: Vec<u32> = (0..batch).map(|_| rng.below(n) as u32).collect();
        let idx = Tensor::from_vec(idx, batch, &dev)?;
        let xb = x.index_select(&idx, 0)?;
        let tb = target.index_select(&idx, 0)?;
        let w: Vec<Tensor> = weights
            .iter()
            .map(SoftWeight::weight)
            .collect::<Result<_>>()?;
        let y = block.forward(&xb, &w, &mut |k, v| {
            let drop = (o.qdrop > 0.0).then(|| (o.qdrop, rng.next()));
            acts[k].apply_dropping(v, drop)
        })?;
        let mut loss = reconstruction_error(&y, &tb)?;
        if let Some(beta) = o.beta_at(t) {
            for w in weights {
                loss = (loss + (w.regulariser(beta)? * o.reg_weight)?)?;
            }
        }
        let grads = loss.backward()?;
        opt_round.step(&grads)?;
        if let Some(opt) = opt_wscale.as_mut() {
            opt.step(&grads)?;
        }
        if let Some(opt) = opt_act.as_mut() {
            opt.step(&grads)?;
        }
        progress(t + 1);
    }
    let error_after = error_on_all(block, x, target, weights, acts, batch)?;
    Ok(BlockResult {
        error_before,
        error_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_soft_weight_hardens_to_the_plan_on_either_grid() -> Result<()> {
        let dev = Device::Cpu;
        let (c, k) = (6, 20);
        // Rows leaning to one side, so the affine zero points are not 0.
        let wv: Vec<f32> = data(c * k, 9)
            .iter()
            .enumerate()
            .map(|(i, v)| v + 0.3 * (i / k) as f32 - 0.8)
            .collect();
        for (bits, grid) in [(4, Grid::Symmetric), (4, Grid::Affine), (2, Grid::Affine)] {
            let plan =
                crate::weights::quantize_weights(&wv, c, bits, crate::ClipSearch::MinMax, grid);
            let sw = SoftWeight::new(&wv, &[c, k], &plan, true, &dev)?;
            assert_eq!(sw.harden()?, plan, "{bits} bits {grid:?}");
            let hard = sw.hard_weight()?.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(hard, plan.dequantize());
        }
        Ok(())
    }

    /// y = act0(x) * w (one weight of shape [C, K] applied as a matmul), per-tensor.
    struct Dense;

    impl Block for Dense {
        fn forward(
            &self,
            x: &Tensor,
            weights: &[Tensor],
            act: &mut dyn FnMut(usize, &Tensor) -> Result<Tensor>,
        ) -> Result<Tensor> {
            act(0, x)?.matmul(&weights[0].t()?)
        }
    }

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut r = Rng::new(seed);
        (0..n)
            .map(|_| (r.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            .collect()
    }

    #[test]
    fn initial_soft_weights_are_the_float_weights_and_harden_to_a_grid() -> Result<()> {
        let dev = Device::Cpu;
        let w = [0.26f32, -0.64, 0.43, 0.0, 0.94, -0.14];
        let plan = WeightQuant {
            bits: 4,
            q: vec![0; 6],
            scales: vec![0.1, 0.2],
            zero_points: Vec::new(),
        };
        let sw = SoftWeight::new(&w, &[2, 3], &plan, false, &dev)?;
        let soft = sw.weight()?.flatten_all()?.to_vec1::<f32>()?;
        for (a, b) in soft.iter().zip(&w) {
            assert!((a - b).abs() < 1e-3, "{soft:?}");
        }
        // Hardening rounds to nearest at the start (h(V) = rest, V >= 0 iff rest >= 0.5).
        let h = sw.harden()?;
        assert_eq!(h.q, vec![3, -6, 4, 0, 5, -1]);
        assert_eq!(h.scales, vec![0.1, 0.2]);
        // The regulariser is positive until every variable is at 0 or 1.
        assert!(sw.regulariser(2.0)?.to_scalar::<f32>()? > 0.0);
        Ok(())
    }

    #[test]
    fn the_annealing_waits_for_the_warmup_then_goes_from_20_to_2() {
        let o = RefineOptions {
            iters: 100,
            ..RefineOptions::new(Method::AdaRound, 0)
        };
        assert_eq!(o.beta_at(0), None);
        assert_eq!(o.beta_at(19), None);
        assert_eq!(o.beta_at(20), Some(20.0));
        assert!((o.beta_at(60).unwrap() - 11.0).abs() < 1e-9);
        assert!((o.beta_at(100).unwrap() - 2.0).abs() < 1e-9);
    }

    #[test]
    fn learned_steps_follow_lsq_and_quantize_on_the_grid() -> Result<()> {
        let dev = Device::Cpu;
        let a = LsqAct::new(
            ActQuant {
                scale: 0.5,
                zero_point: 2,
                bits: 4,
            },
            true,
            &dev,
        )?;
        let x = Tensor::new(&[-3.0f32, -0.6, 0.2, 0.8, 7.0], &dev)?;
        let y = a.apply(&x)?.to_vec1::<f32>()?;
        // Grid (q - 2) * 0.5 for q in 0..=15: -1.0 .. 6.5.
        assert_eq!(y, vec![-1.0, -0.5, 0.0, 1.0, 6.5]);
        // d/ds sum(fq(x)): clipped values give (qmin-z)=-2 and (qmax-z)=13, inside round(u)-u.
        let g = a.apply(&x)?.sum_all()?.backward()?;
        let gs = g.get(a.scale.as_tensor()).unwrap().to_vec1::<f32>()?[0];
        let want = -2.0 + (-1.0 - -1.2) + (0.0 - 0.4) + (2.0 - 1.6) + 13.0;
        assert!((gs - want).abs() < 1e-5, "{gs} vs {want}");
        Ok(())
    }

    #[test]
    fn reconstruction_lowers_the_output_error_of_a_4bit_layer() -> Result<()> {
        let dev = Device::Cpu;
        let (n, k, c) = (256, 24, 8);
        // Correlated inputs (a shared component per image): with isotropic inputs nearest
        // rounding is already optimal and there would be nothing to learn.
        let common = data(n, 5);
        let x: Vec<f32> = data(n * k, 1)
            .iter()
            .enumerate()
            .map(|(i, v)| common[i / k] + 0.3 * v)
            .collect();
        let x = Tensor::from_vec(x, (n, k), &dev)?;
        let wv = data(c * k, 2);
        let w = Tensor::from_vec(wv.clone(), (c, k), &dev)?;
        let target = x.matmul(&w.t()?)?;
        let act = ActQuant::uint8(-0.5, 0.5);
        for (method, grid) in [
            (Method::AdaRound, Grid::Symmetric),
            (Method::Genie, Grid::Symmetric),
            (Method::Genie, Grid::Affine),
        ] {
            let plan = crate::weights::quantize_weights(&wv, c, 3, crate::ClipSearch::MinMax, grid);
            let sw = SoftWeight::new(&wv, &[c, k], &plan, method == Method::Genie, &dev)?;
            let acts = [LsqAct::new(act, method == Method::Genie, &dev)?];
            let o = RefineOptions {
                iters: 300,
                ..RefineOptions::new(method, 7)
            };
            let r = reconstruct(&Dense, &x, &target, &[sw], &acts, &o, &mut |_| {})?;
            assert!(
                r.error_after < 0.8 * r.error_before,
                "{method:?}: {} -> {}",
                r.error_before,
                r.error_after
            );
        }
        Ok(())
    }

    #[test]
    fn the_same_seed_gives_the_same_rounding() -> Result<()> {
        let dev = Device::Cpu;
        let (n, k, c) = (64, 16, 4);
        let x = Tensor::from_vec(data(n * k, 3), (n, k), &dev)?;
        let wv = data(c * k, 4);
        let target = x.matmul(&Tensor::from_vec(wv.clone(), (c, k), &dev)?.t()?)?;
        let plan =
            crate::weights::quantize_weights(&wv, c, 2, crate::ClipSearch::MinMax, Grid::Affine);
        let run = || -> Result<WeightQuant> {
            let sw = SoftWeight::new(&wv, &[c, k], &plan, true, &dev)?;
            let acts = [LsqAct::new(ActQuant::uint8(-0.5, 0.5), true, &dev)?];
            let o = RefineOptions {
                iters: 50,
                ..RefineOptions::new(Method::Genie, 11)
            };
            reconstruct(
                &Dense,
                &x,
                &target,
                std::slice::from_ref(&sw),
                &acts,
                &o,
                &mut |_| {},
            )?;
            sw.harden()
        };
        assert_eq!(run()?, run()?);
        Ok(())
    }

    #[test]
    fn qdrop_keeps_the_asked_share_of_elements_in_float() -> Result<()> {
        let dev = Device::Cpu;
        let n = 40_000;
        // Values halfway between levels: every quantized element differs from its float.
        let x: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * 0.1 + 0.05).collect();
        let xt = Tensor::from_vec(x.clone(), n, &dev)?;
        let a = LsqAct::new(ActQuant::uint8(0.0, 25.5), true, &dev)?;
        for (p, lo, hi) in [(0.0, 0.0, 0.0), (0.5, 0.48, 0.52), (1.0, 1.0, 1.0)] {
            let y = a.apply_dropping(&xt, Some((p, 3)))?.to_vec1::<f32>()?;
            let kept = y.iter().zip(&x).filter(|(y, x)| y == x).count() as f64 / n as f64;
            assert!((lo..=hi).contains(&kept), "p {p}: {kept} kept");
        }
        Ok(())
    }

    #[test]
    fn the_fused_op_quantizes_exactly_as_the_plan_does() -> Result<()> {
        let dev = Device::Cpu;
        let a = ActQuant {
            scale: 0.25,
            zero_point: 3,
            bits: 4,
        };
        // Ties (k + 0.5 steps), values on and beyond both ends, huge ones.
        let mut x: Vec<f32> = (-80..80).map(|k| k as f32 * 0.125).collect();
        x.extend([1e9, -1e9, 3e7, -3e7, 0.3755, -0.875, f32::MIN_POSITIVE]);
        let y = LsqAct::new(a, false, &dev)?
            .apply(&Tensor::from_vec(x.clone(), x.len(), &dev)?)?
            .to_vec1::<f32>()?;
        for (x, y) in x.iter().zip(&y) {
            assert_eq!(*y, a.fake(*x), "x = {x}");
        }
        Ok(())
    }
}
