//! ZeroQ's statistic-matching loss (Cai et al. 2020), as its reference code computes it.

use candle_core::Result;

use crate::engine::{Coeffs, Moments, TapGrad};
use crate::BnTarget;

/// Which statistics are matched to a BatchNormalization layer's running mean and variance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stats {
    /// Every image's own per-channel statistics (ZeroQ). Each image is pulled to the population
    /// average, so a set of them has thin tails.
    #[default]
    PerSample,
    /// The batch's per-channel statistics over all images and positions (as DeepInversion and
    /// Genie match them): images may differ from each other as real ones do, as long as the batch
    /// matches, which reproduces the activation tails calibration needs.
    Batch,
}

impl Stats {
    pub fn name(self) -> &'static str {
        match self {
            Stats::PerSample => "per-sample",
            Stats::Batch => "batch",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, Var, D};

    // The reference: ZeroQ's loss written with candle's elementary ops, as the paper's code
    // computes it on tensors. zq distils with the closed-form moment gradients above; these
    // tests check them against autograd of this.

    /// Per-sample, per-channel mean and std (unbiased variance + eps, then sqrt) over the
    /// spatial dims of an `[N, C, ...]` tensor: two `[N, C]` tensors.
    fn channel_stats(x: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
        let (n, c) = (x.dim(0)?, x.dim(1)?);
        let flat = x.reshape((n, c, ()))?;
        let hw = flat.dim(2)?;
        let mean = flat.mean_keepdim(D::Minus1)?;
        let centered = flat.broadcast_sub(&mean)?;
        let denom = (hw.max(2) - 1) as f64;
        let var = (centered.sqr()?.sum_keepdim(D::Minus1)? / denom)?;
        let std = (var + f64::from(eps))?.sqrt()?;
        Ok((mean.squeeze(D::Minus1)?, std.squeeze(D::Minus1)?))
    }

    /// `||stat - target||^2 / N`, the reference's `own_loss`, the target broadcast over the batch.
    fn own_loss(stat: &Tensor, target: &[f32]) -> Result<Tensor> {
        let n = stat.dim(0)?;
        let t = Tensor::from_slice(target, (1, target.len()), stat.device())?;
        stat.broadcast_sub(&t)?.sqr()?.sum_all()? / n as f64
    }

    fn layer_loss(tap: &Tensor, target: &BnTarget) -> Result<Tensor> {
        layer_loss_with(tap, target, Stats::PerSample)
    }

    fn layer_loss_with(tap: &Tensor, target: &BnTarget, stats: Stats) -> Result<Tensor> {
        let (m, s) = match stats {
            Stats::PerSample => channel_stats(tap, target.eps)?,
            Stats::Batch => {
                // [N, C, HW] -> [1, C, N*HW]: one "sample" holding the whole batch.
                let (n, c) = (tap.dim(0)?, tap.dim(1)?);
                let t = tap
                    .reshape((n, c, ()))?
                    .transpose(0, 1)?
                    .contiguous()?
                    .reshape((1, c, ()))?;
                channel_stats(&t, target.eps)?
            }
        };
        own_loss(&m, &target.mean)? + own_loss(&s, &target.std)?
    }

    /// The input term: each image's per-channel mean pulled to 0 and std to 1.
    fn input_loss(x: &Tensor) -> Result<Tensor> {
        let c = x.dim(1)?;
        let (m, s) = channel_stats(x, 0.0)?;
        own_loss(&m, &vec![0.0; c])? + own_loss(&s, &vec![1.0; c])?
    }

    /// Total loss and the per-layer BatchNormalization terms.
    fn loss_with(
        x: &Tensor,
        taps: &[Tensor],
        targets: &[BnTarget],
        stats: Stats,
    ) -> Result<(Tensor, Vec<f32>)> {
        let mut total = input_loss(x)?;
        let mut per_layer = Vec::with_capacity(taps.len());
        for (t, target) in taps.iter().zip(targets) {
            let l = layer_loss_with(t, target, stats)?;
            per_layer.push(l.to_scalar::<f32>()?);
            total = (total + l)?;
        }
        Ok((total, per_layer))
    }

    #[test]
    fn stats_and_loss() -> Result<()> {
        let dev = Device::Cpu;
        // Two samples, one channel, four pixels.
        let x = Tensor::from_vec(vec![1f32, 2., 3., 4., 0., 0., 0., 0.], (2, 1, 2, 2), &dev)?;
        let (m, s) = channel_stats(&x, 0.0)?;
        assert_eq!(m.to_vec2::<f32>()?, vec![vec![2.5], vec![0.0]]);
        let sd = s.to_vec2::<f32>()?;
        assert!((sd[0][0] - (5f32 / 3.0).sqrt()).abs() < 1e-6 && sd[1][0] == 0.0);
        let target = BnTarget {
            name: "bn".into(),
            mean: vec![2.5],
            std: vec![(5f32 / 3.0).sqrt()],
            eps: 0.0,
        };
        let l = layer_loss(&x.narrow(0, 0, 1)?, &target)?.to_scalar::<f32>()?;
        assert!(
            l.abs() < 1e-10,
            "matching statistics give zero loss, got {l}"
        );
        // Second sample: (0-2.5)^2 + (0-sqrt(5/3))^2, divided by the batch of 2.
        let l2 = layer_loss(&x, &target)?.to_scalar::<f32>()?;
        assert!((l2 - (6.25 + 5.0 / 3.0) / 2.0).abs() < 1e-5, "{l2}");
        Ok(())
    }

    #[test]
    fn batch_statistics_pool_the_images() -> Result<()> {
        let dev = Device::Cpu;
        // Two images, one channel: [1,1,1,1] and [3,3,3,3]. Each is constant (std 0), the batch
        // has mean 2 and unbiased std sqrt(8/7).
        let x = Tensor::from_vec(vec![1f32, 1., 1., 1., 3., 3., 3., 3.], (2, 1, 2, 2), &dev)?;
        let target = BnTarget {
            name: "bn".into(),
            mean: vec![2.0],
            std: vec![(8f32 / 7.0).sqrt()],
            eps: 0.0,
        };
        let b = layer_loss_with(&x, &target, Stats::Batch)?.to_scalar::<f32>()?;
        assert!(b.abs() < 1e-6, "the batch matches: {b}");
        let p = layer_loss_with(&x, &target, Stats::PerSample)?.to_scalar::<f32>()?;
        assert!(p > 1.0, "no single image matches: {p}");
        Ok(())
    }

    /// Taps: the input itself and a nonlinear function of it.
    struct Toy {
        shape: Vec<usize>,
        targets: Vec<BnTarget>,
    }

    impl crate::TapModel for Toy {
        fn input_shape(&self) -> Vec<usize> {
            self.shape.clone()
        }
        fn bn_targets(&self) -> &[BnTarget] {
            &self.targets
        }
        fn forward_taps(&self, x: &Tensor) -> Result<Vec<Tensor>> {
            Ok(vec![x.clone(), ((x.relu()? * 1.5)? + x.sqr()?)?])
        }
    }

    #[test]
    fn moment_gradients_match_autograd_of_the_loss() -> Result<()> {
        let dev = Device::Cpu;
        let shape = vec![3usize, 2, 4, 5];
        let target = |m: Vec<f32>, s: Vec<f32>| BnTarget {
            name: "bn".into(),
            mean: m,
            std: s,
            eps: 1e-3,
        };
        let toy = Toy {
            shape: shape.clone(),
            targets: vec![
                target(vec![0.3, -0.2], vec![0.8, 1.4]),
                target(vec![1.0, 0.5], vec![2.0, 0.7]),
            ],
        };
        let xv: Vec<f32> = crate::adam::normal(shape.iter().product(), 5);
        for stats in [Stats::PerSample, Stats::Batch] {
            let mut eng = crate::Autograd::new(&toy);
            let (l, per, g) = loss_and_grad(&mut eng, &xv, stats, true)?;
            let x = Var::from_tensor(&Tensor::from_slice(&xv, shape.as_slice(), &dev)?)?;
            let taps = crate::TapModel::forward_taps(&toy, x.as_tensor())?;
            let (total, per_ref) = loss_with(x.as_tensor(), &taps, &toy.targets, stats)?;
            let g_ref: Vec<f32> = total
                .backward()?
                .get(x.as_tensor())
                .unwrap()
                .flatten_all()?
                .to_vec1()?;
            let lr = total.to_scalar::<f32>()?;
            assert!(
                (l - lr).abs() < 1e-4 * lr.abs().max(1.0),
                "{stats:?}: {l} vs {lr}"
            );
            for (a, b) in per.iter().zip(&per_ref) {
                assert!(
                    (a - b).abs() < 1e-4 * b.abs().max(1.0),
                    "{stats:?}: {a} vs {b}"
                );
            }
            let e = g
                .iter()
                .zip(&g_ref)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let scale = g_ref.iter().map(|v| v.abs()).fold(0f32, f32::max);
            assert!(
                e < 1e-4 * scale.max(1.0),
                "{stats:?}: gradient differs by {e}"
            );
        }
        Ok(())
    }

    #[test]
    fn gradient_descends() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 3.0, (4, 3, 5, 5), &dev)?)?;
        let first = input_loss(x.as_tensor())?.to_scalar::<f32>()?;
        for _ in 0..100 {
            let l = input_loss(x.as_tensor())?;
            let g = l.backward()?;
            let gx = g.get(x.as_tensor()).unwrap();
            x.set(&(x.as_tensor() - (gx * 5.0)?)?)?;
        }
        let last = input_loss(x.as_tensor())?.to_scalar::<f32>()?;
        assert!(last < 0.1 * first, "{first} -> {last}");
        Ok(())
    }
}

/// ZeroQ's reference schedule: the rate drops tenfold after this many steps without improvement.
const PLATEAU_PATIENCE: usize = 100;
/// ... and never below this.
const MIN_LR: f32 = 1e-4;

/// Settings of a ZeroQ distillation run (reference defaults: lr 0.5, 500 iterations, plateau
/// patience 100, min lr 1e-4).
#[derive(Debug, Clone, PartialEq)]
pub struct ZeroQConfig {
    pub iters: usize,
    pub lr: f32,
    pub seed: u64,
    /// Per-channel valid input box `[lo, hi]` (pixels in `[0, 1]` mapped through the preprocessing);
    /// iterates are projected into it after every step.
    pub bounds: Vec<(f32, f32)>,
    /// Which BatchNormalization statistics are matched.
    pub stats: Stats,
}

/// The result of one distilled batch.
#[derive(Debug, Clone)]
pub struct Distilled {
    /// `[N, C, H, W]` flattened, inside the box.
    pub images: Vec<f32>,
    pub bn_loss_initial: f32,
    pub bn_loss_final: f32,
    /// Final BatchNormalization loss per layer.
    pub per_layer: Vec<f32>,
}

fn project(x: &mut [f32], bounds: &[(f32, f32)], hw: usize) {
    let c = bounds.len();
    for (i, v) in x.iter_mut().enumerate() {
        let (lo, hi) = bounds[(i / hw) % c];
        *v = v.clamp(lo, hi);
    }
}

/// The BatchNormalization loss of one layer from its tap's moments, and the gradient at the tap.
/// Same definition as [`layer_loss_with`] (unbiased variance plus eps, then sqrt; squared errors
/// summed over channels and divided by the batch size).
pub fn layer_loss_moments(m: &Moments, target: &BnTarget, stats: Stats) -> (f64, Coeffs) {
    let (n, c, hw) = (m.n, m.c, m.hw);
    let eps = f64::from(target.eps);
    let mut a = vec![0f32; n * c];
    let mut b = vec![0f32; n * c];
    let mut loss = 0f64;
    match stats {
        Stats::PerSample => {
            let denom = (hw.max(2) - 1) as f64;
            let nn = n as f64;
            for k in 0..n * c {
                let ch = k % c;
                let mean = m.mean[k];
                let s = (m.m2[k] / denom + eps).sqrt();
                let dm = mean - f64::from(target.mean[ch]);
                let ds = s - f64::from(target.std[ch]);
                loss += (dm * dm + ds * ds) / nn;
                a[k] = (2.0 * dm / (nn * hw.max(1) as f64)) as f32;
                b[k] = if s > 0.0 {
                    (2.0 * ds / (nn * denom * s)) as f32
                } else {
                    0.0
                };
            }
        }
        Stats::Batch => {
            // Chan et al.'s pairwise combination of the per-image moments.
            let total = (n * hw) as f64;
            let denom = ((n * hw).max(2) - 1) as f64;
            for ch in 0..c {
                let mean = (0..n).map(|i| m.mean[i * c + ch]).sum::<f64>() / n as f64;
                let m2 = (0..n)
                    .map(|i| m.m2[i * c + ch] + hw as f64 * (m.mean[i * c + ch] - mean).powi(2))
                    .sum::<f64>();
                let s = (m2 / denom + eps).sqrt();
                let dm = mean - f64::from(target.mean[ch]);
                let ds = s - f64::from(target.std[ch]);
                loss += dm * dm + ds * ds;
                let bb = if s > 0.0 { 2.0 * ds / (denom * s) } else { 0.0 };
                for i in 0..n {
                    let k = i * c + ch;
                    b[k] = bb as f32;
                    a[k] = (2.0 * dm / total + bb * (m.mean[k] - mean)) as f32;
                }
            }
        }
    }
    (loss, Coeffs { a, b })
}

/// The input term from the input's moments: each image's per-channel mean pulled to 0, std to 1.
pub fn input_loss_moments(m: &Moments) -> (f64, Coeffs) {
    let target = BnTarget {
        name: String::new(),
        mean: vec![0.0; m.c],
        std: vec![1.0; m.c],
        eps: 0.0,
    };
    layer_loss_moments(m, &target, Stats::PerSample)
}

/// One evaluation of the ZeroQ loss at `x` and, when `grad`, its gradient: (total, per-layer BN
/// terms, gradient).
pub fn loss_and_grad(
    model: &mut dyn TapGrad,
    x: &[f32],
    stats: Stats,
    grad: bool,
) -> Result<(f32, Vec<f32>, Vec<f32>)> {
    let shape = model.input_shape();
    let moments = model.forward(x)?;
    let targets = model.bn_targets();
    if moments.len() != targets.len() {
        candle_core::bail!(
            "{} taps for {} BatchNormalization targets",
            moments.len(),
            targets.len()
        );
    }
    let mut per_layer = Vec::with_capacity(moments.len());
    let mut coeffs = Vec::with_capacity(moments.len());
    let mut total = 0f64;
    for (m, t) in moments.iter().zip(targets) {
        if m.c != t.mean.len() {
            candle_core::bail!(
                "{}: {} channels at the input, {} running statistics",
                t.name,
                m.c,
                t.mean.len()
            );
        }
        let (l, k) = layer_loss_moments(m, t, stats);
        total += l;
        per_layer.push(l as f32);
        coeffs.push(k);
    }
    let (n, c, hw) = (shape[0], shape[1], shape[2..].iter().product::<usize>());
    let xm = Moments::of(x, n, c, hw);
    let (li, ki) = input_loss_moments(&xm);
    total += li;
    if !grad {
        return Ok((total as f32, per_layer, Vec::new()));
    }
    let mut g = model.backward(&coeffs)?;
    ki.add_grad(x, &xm, &mut g);
    Ok((total as f32, per_layer, g))
}

/// Distil one batch for `model` with projected Adam on the pixels. `progress(iter, loss)` is
/// called after every step.
pub fn distill(
    model: &mut dyn TapGrad,
    cfg: &ZeroQConfig,
    progress: &mut dyn FnMut(usize, f32),
) -> Result<Distilled> {
    let shape = model.input_shape();
    if shape.len() != 4 || cfg.bounds.len() != shape[1] {
        candle_core::bail!(
            "input shape {shape:?} with {} channel bounds",
            cfg.bounds.len()
        );
    }
    let hw = shape[2] * shape[3];
    let n: usize = shape.iter().product();
    // Standard normal, then projected: the reference starts from randn in the input space.
    let mut x = crate::adam::normal(n, cfg.seed);
    project(&mut x, &cfg.bounds, hw);
    let mut opt = crate::adam::Adam::new(n, cfg.lr);
    let mut sched = crate::adam::Plateau::new(PLATEAU_PATIENCE, MIN_LR);
    let (_, per0, _) = loss_and_grad(model, &x, cfg.stats, false)?;
    let bn_loss_initial: f32 = per0.iter().sum();
    for it in 0..cfg.iters {
        let (l, _, g) = loss_and_grad(model, &x, cfg.stats, true)?;
        opt.step(&mut x, &g);
        project(&mut x, &cfg.bounds, hw);
        opt.lr = sched.observe(l, opt.lr);
        progress(it + 1, l);
    }
    let (_, per_layer, _) = loss_and_grad(model, &x, cfg.stats, false)?;
    Ok(Distilled {
        images: x,
        bn_loss_initial,
        bn_loss_final: per_layer.iter().sum(),
        per_layer,
    })
}
