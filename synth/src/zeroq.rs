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

    /// The input term: each image's per-channel mean pulled to 0 and std to 1 (applied to the
    /// standardised pixels).
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
        // Pixels, and a map with a small and a large standard deviation (the gradient must come
        // back in pixel units whatever the model's normalisation).
        let pv = PixelMap::noise(shape.iter().product(), 5);
        let map = PixelMap {
            channels: vec![(0.45, 0.2), (0.0, 1.0 / 255.0)],
            hw: 20,
        };
        for stats in [Stats::PerSample, Stats::Batch] {
            let mut eng = crate::Autograd::new(&toy);
            let (l, per, g) = loss_and_grad(&mut eng, &pv, &map, stats, true)?;
            let p = Var::from_tensor(&Tensor::from_slice(&pv, shape.as_slice(), &dev)?)?;
            let mean = Tensor::from_slice(&[0.45f32, 0.0], (1, 2, 1, 1), &dev)?;
            let std = Tensor::from_slice(&[0.2f32, 1.0 / 255.0], (1, 2, 1, 1), &dev)?;
            let x = p.as_tensor().broadcast_sub(&mean)?.broadcast_div(&std)?;
            let z = ((p.as_tensor() - f64::from(PIXEL_MEAN))? / f64::from(PIXEL_STD))?;
            let taps = crate::TapModel::forward_taps(&toy, &x)?;
            let (total, per_ref) = loss_with(&z, &taps, &toy.targets, stats)?;
            let g_ref: Vec<f32> = total
                .backward()?
                .get(p.as_tensor())
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

/// Settings of a ZeroQ distillation run (reference defaults: lr 0.5 on normalised inputs, 500
/// iterations, plateau patience 100, min lr 1e-4). zq optimises pixels, not model inputs: the
/// learning rate is in pixel units, so it means the same whatever normalisation the model takes.
#[derive(Debug, Clone, PartialEq)]
pub struct ZeroQConfig {
    pub iters: usize,
    pub lr: f32,
    pub seed: u64,
    /// How pixels in `[0, 1]` become the model's input; pixels are kept in the box after every
    /// step.
    pub map: PixelMap,
    /// Which BatchNormalization statistics are matched.
    pub stats: Stats,
    /// How the learning rate falls over the run.
    pub schedule: Schedule,
}

/// How the learning rate falls over a distillation run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Schedule {
    /// ZeroQ's reference: tenfold lower after 100 steps without improvement, down to 1e-4.
    Plateau,
    /// Half a cosine from the initial rate to zero over the run's iterations: every run ends
    /// converged, however short.
    #[default]
    Cosine,
}

impl Schedule {
    pub fn name(self) -> &'static str {
        match self {
            Schedule::Plateau => "plateau",
            Schedule::Cosine => "cosine",
        }
    }
}

/// The cosine schedule's rate at step `it` (0-based) of `iters`.
fn cosine(lr: f32, it: usize, iters: usize) -> f32 {
    let t = it as f64 / iters.max(1) as f64;
    (f64::from(lr) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())) as f32
}

/// The result of one distilled batch.
#[derive(Debug, Clone)]
pub struct Distilled {
    /// `[N, C, H, W]` flattened, in the model's input space (pixels mapped through the
    /// [`PixelMap`]).
    pub images: Vec<f32>,
    pub bn_loss_initial: f32,
    pub bn_loss_final: f32,
    /// Final BatchNormalization loss per layer.
    pub per_layer: Vec<f32>,
}

/// Natural images' per-channel pixel mean and standard deviation, roughly (CIFAR-10 and ImageNet
/// both sit near these): the distribution synthetic pixels start from and whose moments the input
/// term pulls them to. Being defined on pixels, they are the same for every input convention.
pub const PIXEL_MEAN: f32 = 0.5;
pub const PIXEL_STD: f32 = 0.25;

/// How pixels `p` in `[0, 1]` map to the model's input, per channel: `x = (p - mean) / std`.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelMap {
    /// `(mean, std)` per input channel; `std` is non-zero.
    pub channels: Vec<(f32, f32)>,
    /// Positions per channel plane (H * W).
    pub hw: usize,
}

impl PixelMap {
    /// Whether a model input of `shape` (`[N, C, H, W]`) is what this map describes.
    pub fn check(&self, shape: &[usize]) -> Result<()> {
        if shape.len() != 4 || self.channels.len() != shape[1] || self.hw != shape[2] * shape[3] {
            candle_core::bail!(
                "input shape {shape:?} with a pixel map of {} channels of {} positions",
                self.channels.len(),
                self.hw
            );
        }
        Ok(())
    }

    /// The model input for pixels `p` (`[N, C, hw]` flattened).
    pub fn to_input(&self, p: &[f32]) -> Vec<f32> {
        let c = self.channels.len();
        p.chunks(self.hw.max(1))
            .enumerate()
            .flat_map(|(k, plane)| {
                let (m, s) = self.channels[k % c];
                plane.iter().map(move |&v| (v - m) / s)
            })
            .collect()
    }

    /// Turn a gradient with respect to the model input into one with respect to the pixels, in
    /// place.
    pub fn grad_to_pixels(&self, g: &mut [f32]) {
        let c = self.channels.len();
        for (k, plane) in g.chunks_mut(self.hw.max(1)).enumerate() {
            let s = self.channels[k % c].1;
            plane.iter_mut().for_each(|v| *v /= s);
        }
    }

    /// Gaussian pixels `N(PIXEL_MEAN, PIXEL_STD)` for a batch of `n` values (not clipped): the
    /// noise yardstick, the same for every input convention.
    pub fn noise(n: usize, seed: u64) -> Vec<f32> {
        crate::adam::normal(n, seed)
            .into_iter()
            .map(|z| PIXEL_MEAN + PIXEL_STD * z)
            .collect()
    }
}

/// Keep pixels in `[0, 1]`.
fn project(p: &mut [f32]) {
    p.iter_mut().for_each(|v| *v = v.clamp(0.0, 1.0));
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

/// The input term on standardised pixels `z = (p - PIXEL_MEAN) / PIXEL_STD`: each image's
/// per-channel mean pulled to 0, std to 1 (ZeroQ's term, defined on pixels so that it is the same
/// for every input convention).
pub fn input_loss_moments(m: &Moments) -> (f64, Coeffs) {
    let target = BnTarget {
        name: String::new(),
        mean: vec![0.0; m.c],
        std: vec![1.0; m.c],
        eps: 0.0,
    };
    layer_loss_moments(m, &target, Stats::PerSample)
}

/// One evaluation of the ZeroQ loss at pixels `p` and, when `grad`, its gradient with respect to
/// the pixels: (total, per-layer BN terms, gradient).
pub fn loss_and_grad(
    model: &mut dyn TapGrad,
    p: &[f32],
    map: &PixelMap,
    stats: Stats,
    grad: bool,
) -> Result<(f32, Vec<f32>, Vec<f32>)> {
    let shape = model.input_shape();
    let x = map.to_input(p);
    let moments = model.forward(&x)?;
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
    let z: Vec<f32> = p.iter().map(|&v| (v - PIXEL_MEAN) / PIXEL_STD).collect();
    let zm = Moments::of(&z, n, c, hw);
    let (li, ki) = input_loss_moments(&zm);
    total += li;
    if !grad {
        return Ok((total as f32, per_layer, Vec::new()));
    }
    let mut g = model.backward(&coeffs)?;
    map.grad_to_pixels(&mut g);
    // dz/dp = 1 / PIXEL_STD.
    let mut gz = vec![0f32; z.len()];
    ki.add_grad(&z, &zm, &mut gz);
    for (g, d) in g.iter_mut().zip(&gz) {
        *g += d / PIXEL_STD;
    }
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
    cfg.map.check(&shape)?;
    let n: usize = shape.iter().product();
    // Natural-image-like noise on the pixels, kept in the box: the reference starts from randn
    // on normalised inputs, which is this for a model normalised with (0.5, 0.25).
    let mut p = PixelMap::noise(n, cfg.seed);
    project(&mut p);
    let mut opt = crate::adam::Adam::new(n, cfg.lr);
    let mut sched = crate::adam::Plateau::new(PLATEAU_PATIENCE, MIN_LR);
    let (_, per0, _) = loss_and_grad(model, &p, &cfg.map, cfg.stats, false)?;
    let bn_loss_initial: f32 = per0.iter().sum();
    for it in 0..cfg.iters {
        if cfg.schedule == Schedule::Cosine {
            opt.lr = cosine(cfg.lr, it, cfg.iters);
        }
        let (l, _, g) = loss_and_grad(model, &p, &cfg.map, cfg.stats, true)?;
        opt.step(&mut p, &g);
        project(&mut p);
        if cfg.schedule == Schedule::Plateau {
            opt.lr = sched.observe(l, opt.lr);
        }
        progress(it + 1, l);
    }
    finish(model, &p, &cfg.map, cfg.stats, bn_loss_initial)
}

/// A distilled batch from its final pixels: the final per-layer loss, the images in the model's
/// input space.
pub(crate) fn finish(
    model: &mut dyn TapGrad,
    p: &[f32],
    map: &PixelMap,
    stats: Stats,
    bn_loss_initial: f32,
) -> Result<Distilled> {
    let (_, per_layer, _) = loss_and_grad(model, p, map, stats, false)?;
    Ok(Distilled {
        images: map.to_input(p),
        bn_loss_initial,
        bn_loss_final: per_layer.iter().sum(),
        per_layer,
    })
}
