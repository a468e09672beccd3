//! Genie-D (Jeon et al., CVPR 2023): images drawn by a small generator that is trained, jointly
//! with its latent codes, so that the batch's BatchNormalization statistics match the model's.
//!
//! Per batch a fresh generator `z (latent_dim) -> Linear -> BN -> Upsample x2 -> Conv3x3 -> BN ->
//! LeakyReLU(0.2) -> Upsample x2 -> Conv3x3 -> Tanh -> BN(affine=False) -> per-channel gain and
//! shift` draws images (the reference ends at the BN; the learnable gain and shift, starting at 1
//! and 0, let a batch's pixel mean and spread move away from 0.5 and 0.25: on the mostly black
//! 8x8 digits fixture the BN loss fell from 0.40x to 0.10x noise, on ResNet-20 the data was as
//! good as before or better);
//! the Linear produces `C1 x ceil(H/4) x ceil(W/4)` features, so the generator fits the model's
//! input size (32x32 CIFAR to 224/240 ImageNet). Latents and generator are trained with Adam (the
//! reference's effective rates: 0.1 for the latents, lowered on plateaus; 0.01 for the generator,
//! lowered exponentially), against the *batch*-statistics BN loss plus the input term
//! ([`zeroq::loss_and_grad`] with [`Stats::Batch`]), with *swing convolution* on the model's
//! strided convolutions where the engine supports it ([`TapGrad::set_swing`]).
//!
//! The generator's standardised output `z_img` becomes pixels `p = PIXEL_MEAN + PIXEL_STD * z_img`,
//! clamped to `[0, 1]`, which the [`PixelMap`] maps into the model's input: as with ZeroQ, what the
//! optimiser sees is defined on pixels, so the method does not depend on how the model normalises
//! its input. The model's gradient with respect to the pixels comes from the model engine (the
//! tape); candle's autograd carries it back through the generator alone, as the gradient of
//! `sum(z_img * g)` with `g = PIXEL_STD * dL/dp` held constant (and zero where the clamp cuts).

use candle_core::{CpuStorage, DType, Device, Layout, Module, Result, Shape, Tensor, Var};
use candle_nn::{BatchNorm, Linear, Optimizer, ParamsAdamW, VarMap};
use rayon::prelude::*;
use zq_kernels::gemm::{sgemm, MatMut, MatRef};

use crate::adam::{normal, Plateau};
use crate::engine::TapGrad;
use crate::zeroq::{self, Distilled, PixelMap, Stats, PIXEL_MEAN, PIXEL_STD};
use zq_kernels::rng::SplitMix64;

/// The reference's learning rate of the latents (its code calls it `lr_g`, but hands it to the
/// latents' optimiser).
pub const LR_LATENT: f32 = 0.1;
/// The reference's learning rate of the generator.
pub const LR_GENERATOR: f32 = 0.01;
/// The reference's latent dimension.
pub const LATENT_DIM: usize = 256;
/// Feature channels after the Linear and after the first convolution.
const C1: usize = 128;
const C2: usize = 64;
/// The reference's schedules: the generator's rate lowered by 0.95 every 100 steps, the latents'
/// tenfold after 100 steps without improvement (down to 1e-4). (Compressing them into a short
/// run, patience a 40th of it, was tried: swing convolution makes the loss noisy from step to
/// step, and the latents' rate then collapsed within a few steps.)
const EVERY: usize = 100;
const GAMMA: f64 = 0.95;
const MIN_LR_LATENT: f32 = 1e-4;
/// Seed streams of the parts of one batch's run (offsets from its seed).
const SEED_LATENT: u64 = 0x6c61_7465_6e74; // "latent"
const SEED_SWING: u64 = 0x0073_7769_6e67; // "swing"
const SEED_WEIGHT: u64 = 0x7765_6967_6874; // "weight"

/// Settings of a Genie-D run on one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct GenieConfig {
    pub iters: usize,
    pub lr_generator: f32,
    pub lr_latent: f32,
    pub latent_dim: usize,
    pub seed: u64,
    /// How pixels in `[0, 1]` become the model's input.
    pub map: PixelMap,
    /// Swing convolution on the model's strided convolutions (when the engine supports it).
    pub swing: bool,
    /// The learnable per-channel gain and shift after the generator's last BatchNormalization
    /// (zq's addition; `false` is the reference's generator).
    pub output_gain: bool,
}

impl GenieConfig {
    /// The reference hyper-parameters and generator for `iters` iterations.
    pub fn reference(iters: usize, seed: u64, map: PixelMap) -> GenieConfig {
        GenieConfig {
            iters,
            lr_generator: LR_GENERATOR,
            lr_latent: LR_LATENT,
            latent_dim: LATENT_DIM,
            seed,
            map,
            swing: true,
            output_gain: false,
        }
    }
}

/// Whether swing convolution was applied, and why not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swing {
    /// On, for this many strided convolutions.
    On(usize),
    /// Asked for, but the model has no strided convolution.
    NoStridedConv,
    /// Asked for, but the engine does not support it.
    Unsupported,
    /// Not asked for.
    Off,
}

/// A Genie run's result: the images and losses, and whether swing convolution ran.
#[derive(Debug, Clone)]
pub struct GenieDistilled {
    pub distilled: Distilled,
    pub swing: Swing,
}

/// The generator of one batch: candle-nn layers over a [`VarMap`] of seeded weights.
pub struct Generator {
    pub varmap: VarMap,
    linear: Linear,
    bn0: BatchNorm,
    conv1: Conv3x3,
    bn1: BatchNorm,
    conv2: Conv3x3,
    bn2: BatchNorm,
    /// A learnable per-channel gain and shift `[1, C, 1, 1]` after `bn2`, if any.
    out_gain: Option<(Tensor, Tensor)>,
    /// Feature map after the Linear, and the image size.
    h0: usize,
    w0: usize,
    h: usize,
    w: usize,
}

/// A 3x3 convolution with padding 1 as im2col and a matrix product, image by image
/// ([`Conv3x3Op`]). Candle's own CPU conv2d differentiates through a direct transposed
/// convolution that is many times slower than its matrix product; and an im2col of the whole
/// batch as one tensor, which autograd keeps for the backward pass, is gigabytes at ImageNet size
/// (a batch of 32 at 120x120 with 128 channels: 2.1 GB, at 240x240 with 64: 4.2 GB).
struct Conv3x3 {
    /// `[M, C * 9]`, columns ordered (input channel, ki, kj) as a `[M, C, 3, 3]` weight flattens.
    w: Tensor,
    /// `[1, M, 1]`
    b: Tensor,
}

impl Conv3x3 {
    fn new(w: &Tensor, b: &Tensor) -> Result<Conv3x3> {
        let m = w.dim(0)?;
        Ok(Conv3x3 {
            w: w.flatten_from(1)?,
            b: b.reshape((1, m, 1))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, _, h, w) = x.dims4()?;
        let y = x
            .contiguous()?
            .apply_op2(&self.w, Conv3x3Op)?
            .broadcast_add(&self.b)?;
        y.reshape((n, (), h, w))
    }
}

/// Images per task of the convolution ops: each task reuses one column buffer, and the weight
/// gradient adds the tasks' partial sums in task order, so results do not depend on the number of
/// threads.
const CONV_GROUP: usize = 2;

/// `(x [N, C, H, W], w [M, C * 9]) -> y [N, M, H * W]`, `y[n] = w · im2col(x[n])` (3x3,
/// padding 1); the backward pass is [`ConvDx`] and [`ConvDw`], image by image as well.
#[derive(Clone, Copy)]
struct Conv3x3Op;

/// `(dy [N, M, H * W], w [M, C * 9]) -> dx [N, C, H, W]`: col2im of `wᵀ · dy[n]`.
struct ConvDx {
    h: usize,
    w: usize,
}

/// `(x [N, C, H, W], dy [N, M, H * W]) -> dw [M, C * 9]`: `Σₙ dy[n] · im2col(x[n])ᵀ`.
struct ConvDw;

/// Input position of output `o` at kernel offset `k` (0..3) along an axis of length `n`.
#[inline(always)]
fn tap(o: usize, k: usize, n: usize) -> Option<usize> {
    (o + k).checked_sub(1).filter(|&v| v < n)
}

/// One image's columns `[C * 9, H * W]` (zero in the padding) into `cols`: row `y` of tap
/// `(ki, kj)` is input row `y + ki - 1` shifted by `kj - 1`, copied as a slice.
fn im2col(x: &[f32], h: usize, w: usize, cols: &mut [f32]) {
    let hw = h * w;
    for (plane, o) in x.chunks_exact(hw).zip(cols.chunks_exact_mut(9 * hw)) {
        for k in 0..9 {
            let (ki, kj) = (k / 3, k % 3);
            for y in 0..h {
                let dst = &mut o[k * hw + y * w..][..w];
                let Some(sy) = tap(y, ki, h) else {
                    dst.fill(0.0);
                    continue;
                };
                let src = &plane[sy * w..][..w];
                match kj {
                    0 => {
                        dst[0] = 0.0;
                        dst[1..].copy_from_slice(&src[..w - 1]);
                    }
                    1 => dst.copy_from_slice(src),
                    _ => {
                        dst[..w - 1].copy_from_slice(&src[1..]);
                        dst[w - 1] = 0.0;
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: `dx += col2im(cols)`.
fn col2im(cols: &[f32], h: usize, w: usize, dx: &mut [f32]) {
    let hw = h * w;
    let add = |d: &mut [f32], s: &[f32]| d.iter_mut().zip(s).for_each(|(d, s)| *d += s);
    for (plane, g) in dx.chunks_exact_mut(hw).zip(cols.chunks_exact(9 * hw)) {
        for k in 0..9 {
            let (ki, kj) = (k / 3, k % 3);
            for y in 0..h {
                let Some(sy) = tap(y, ki, h) else { continue };
                let src = &g[k * hw + y * w..][..w];
                let dst = &mut plane[sy * w..][..w];
                match kj {
                    0 => add(&mut dst[..w - 1], &src[1..]),
                    1 => add(dst, src),
                    _ => add(&mut dst[1..], &src[..w - 1]),
                }
            }
        }
    }
}

/// A contiguous f32 operand of a custom op.
fn operand<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("conv3x3: a non-contiguous operand {:?}", l.shape());
    };
    Ok(&s.as_slice::<f32>()?[a..b])
}

/// `(n, c, h, w)` of an `[N, C, H, W]` operand with `C * 9` columns of the weight, and `m`.
fn conv_dims(x: &Layout, wt: &Layout) -> Result<(usize, usize, usize, usize, usize)> {
    let (d, e) = (x.shape().dims(), wt.shape().dims());
    match (d, e) {
        (&[n, c, h, w], &[m, k]) if k == c * 9 && h * w > 0 => Ok((n, c, h, w, m)),
        _ => candle_core::bail!("conv3x3 of {d:?} with weights {e:?}"),
    }
}

/// `f(out_image, in_image, cols)` for each image (`out_per` and `in_per` floats of `out` and
/// `inp`), in groups of [`CONV_GROUP`] images spread over rayon's pool, each group with one
/// scratch buffer of `cols_len` floats. `out_per` and `in_per` must not be 0.
fn per_image(
    out: &mut [f32],
    out_per: usize,
    inp: &[f32],
    in_per: usize,
    cols_len: usize,
    f: impl Fn(&mut [f32], &[f32], &mut [f32]) + Sync,
) {
    out.par_chunks_mut(CONV_GROUP * out_per)
        .zip(inp.par_chunks(CONV_GROUP * in_per))
        .for_each(|(og, ig)| {
            let mut cols = vec![0f32; cols_len];
            for (o, i) in og.chunks_exact_mut(out_per).zip(ig.chunks_exact(in_per)) {
                f(o, i, &mut cols);
            }
        });
}

impl candle_core::CustomOp2 for Conv3x3Op {
    fn name(&self) -> &'static str {
        "conv3x3"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w, m) = conv_dims(l1, l2)?;
        let (x, wt) = (operand(s1, l1)?, operand(s2, l2)?);
        let hw = h * w;
        let mut y = vec![0f32; n * m * hw];
        if m > 0 && c > 0 {
            per_image(&mut y, m * hw, x, c * hw, c * 9 * hw, |yi, xi, cols| {
                im2col(xi, h, w, cols);
                sgemm(
                    MatMut::rows(yi, m, hw),
                    MatRef::rows(wt, m, c * 9),
                    MatRef::rows(cols, c * 9, hw),
                    false,
                    1,
                );
            });
        }
        Ok((CpuStorage::F32(y), Shape::from((n, m, hw))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        wt: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, _, h, w) = x.dims4()?;
        let grad = grad.contiguous()?;
        let dx = grad.apply_op2_no_bwd(wt, &ConvDx { h, w })?;
        let dw = x.apply_op2_no_bwd(&grad, &ConvDw)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl candle_core::CustomOp2 for ConvDx {
    fn name(&self) -> &'static str {
        "conv3x3-dx"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (hw, d, e) = (self.h * self.w, l1.shape().dims(), l2.shape().dims());
        let (n, m, c) = match (d, e) {
            (&[n, m, p], &[m2, k]) if m == m2 && p == hw && hw > 0 && k % 9 == 0 => (n, m, k / 9),
            _ => candle_core::bail!("conv3x3 gradient {d:?} with weights {e:?}"),
        };
        let (dy, wt) = (operand(s1, l1)?, operand(s2, l2)?);
        let mut dx = vec![0f32; n * c * hw];
        if m > 0 && c > 0 {
            per_image(&mut dx, c * hw, dy, m * hw, c * 9 * hw, |dxi, dyi, cols| {
                sgemm(
                    MatMut::rows(cols, c * 9, hw),
                    MatRef::transposed(wt, m, c * 9),
                    MatRef::rows(dyi, m, hw),
                    false,
                    1,
                );
                col2im(cols, self.h, self.w, dxi);
            });
        }
        Ok((CpuStorage::F32(dx), Shape::from((n, c, self.h, self.w))))
    }
}

impl candle_core::CustomOp2 for ConvDw {
    fn name(&self) -> &'static str {
        "conv3x3-dw"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (d, e) = (l1.shape().dims(), l2.shape().dims());
        let (n, c, h, w, m) = match (d, e) {
            (&[n, c, h, w], &[n2, m, p]) if n == n2 && p == h * w && p > 0 => (n, c, h, w, m),
            _ => candle_core::bail!("conv3x3 weight gradient of {d:?} with {e:?}"),
        };
        let (x, dy) = (operand(s1, l1)?, operand(s2, l2)?);
        let (hw, k) = (h * w, c * 9);
        let mut dw = vec![0f32; m * k];
        if m > 0 && c > 0 && n > 0 {
            let parts: Vec<Vec<f32>> = x
                .par_chunks(CONV_GROUP * c * hw)
                .zip(dy.par_chunks(CONV_GROUP * m * hw))
                .map(|(xg, dyg)| {
                    let mut cols = vec![0f32; k * hw];
                    let mut part = vec![0f32; m * k];
                    for (i, (xi, dyi)) in xg
                        .chunks_exact(c * hw)
                        .zip(dyg.chunks_exact(m * hw))
                        .enumerate()
                    {
                        im2col(xi, h, w, &mut cols);
                        sgemm(
                            MatMut::rows(&mut part, m, k),
                            MatRef::rows(dyi, m, hw),
                            MatRef::transposed(&cols, k, hw),
                            i > 0,
                            1,
                        );
                    }
                    part
                })
                .collect();
            for part in parts {
                for (a, b) in dw.iter_mut().zip(part) {
                    *a += b;
                }
            }
        }
        Ok((CpuStorage::F32(dw), Shape::from((m, k))))
    }
}

/// Nearest-neighbour upsampling by 2 as a broadcast (its gradient a sum).
fn upsample2(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    x.reshape((n, c, h, 1, w, 1))?
        .broadcast_as((n, c, h, 2, w, 2))?
        .reshape((n, c, 2 * h, 2 * w))
}

/// A named parameter in `vm` with the given values.
fn param(vm: &VarMap, name: &str, shape: &[usize], values: Vec<f32>) -> Result<Tensor> {
    let v = Var::from_vec(values, shape, &Device::Cpu)?;
    let t = v.as_tensor().clone();
    vm.data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("generator parameters poisoned".into()))?
        .insert(name.to_string(), v);
    Ok(t)
}

/// PyTorch's default initialisation of a Linear or Conv layer (uniform in +-1/sqrt(fan_in) for
/// weight and bias), as seeded normals of the same variance.
fn kaiming(n: usize, fan_in: usize, seed: u64) -> Vec<f32> {
    let sd = 1.0 / (3.0 * fan_in as f32).sqrt();
    normal(n, seed).into_iter().map(|v| v * sd).collect()
}

impl Generator {
    /// A fresh generator for images of `c x h x w` from `latent_dim` latents; weights from `seed`;
    /// with `output_gain`, a learnable per-channel gain (from 1) and shift (from 0) at the end.
    pub fn new(
        latent_dim: usize,
        c: usize,
        h: usize,
        w: usize,
        seed: u64,
        output_gain: bool,
    ) -> Result<Generator> {
        if latent_dim == 0 || c == 0 || h == 0 || w == 0 {
            candle_core::bail!("a generator for [{c}, {h}, {w}] from {latent_dim} latents");
        }
        let vm = VarMap::new();
        let (h0, w0) = (h.div_ceil(4), w.div_ceil(4));
        let f0 = C1 * h0 * w0;
        let s = |k: u64| seed ^ SEED_WEIGHT.wrapping_add(k.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let lw = param(
            &vm,
            "linear.weight",
            &[f0, latent_dim],
            kaiming(f0 * latent_dim, latent_dim, s(0)),
        )?;
        let lb = param(&vm, "linear.bias", &[f0], kaiming(f0, latent_dim, s(1)))?;
        let bn = |name: &str, ch: usize| -> Result<BatchNorm> {
            let g = param(&vm, &format!("{name}.weight"), &[ch], vec![1.0; ch])?;
            let b = param(&vm, &format!("{name}.bias"), &[ch], vec![0.0; ch])?;
            let zeros = Tensor::zeros(ch, DType::F32, &Device::Cpu)?;
            let ones = Tensor::ones(ch, DType::F32, &Device::Cpu)?;
            BatchNorm::new(ch, zeros, ones, g, b, 1e-5)
        };
        let bn0 = bn("bn0", C1)?;
        let conv = |name: &str, cin: usize, cout: usize, k: u64| -> Result<Conv3x3> {
            let fan = cin * 9;
            let wt = param(
                &vm,
                &format!("{name}.weight"),
                &[cout, cin, 3, 3],
                kaiming(cout * fan, fan, s(k)),
            )?;
            let b = param(
                &vm,
                &format!("{name}.bias"),
                &[cout],
                kaiming(cout, fan, s(k + 1)),
            )?;
            Conv3x3::new(&wt, &b)
        };
        let conv1 = conv("conv1", C1, C2, 2)?;
        let bn1 = bn("bn1", C2)?;
        let conv2 = conv("conv2", C2, c, 4)?;
        let bn2 = BatchNorm::new_no_bias(
            c,
            Tensor::zeros(c, DType::F32, &Device::Cpu)?,
            Tensor::ones(c, DType::F32, &Device::Cpu)?,
            1e-5,
        )?;
        let out_gain = if output_gain {
            Some((
                param(&vm, "out.weight", &[1, c, 1, 1], vec![1.0; c])?,
                param(&vm, "out.bias", &[1, c, 1, 1], vec![0.0; c])?,
            ))
        } else {
            None
        };
        Ok(Generator {
            varmap: vm,
            out_gain,
            linear: Linear::new(lw, Some(lb)),
            bn0,
            conv1,
            bn1,
            conv2,
            bn2,
            h0,
            w0,
            h,
            w,
        })
    }

    /// Standardised images `[N, C, H, W]` for latents `[N, latent_dim]` (batch statistics in every
    /// BatchNormalization, as in training).
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let n = z.dim(0)?;
        let x = self.linear.forward(z)?.reshape((n, C1, self.h0, self.w0))?;
        let x = self.bn0.forward_train(&x)?;
        let x = upsample2(&x)?;
        let x = self.bn1.forward_train(&self.conv1.forward(&x)?)?;
        let x = candle_nn::ops::leaky_relu(&x, 0.2)?;
        let x = upsample2(&x)?;
        let x = self.conv2.forward(&x)?.tanh()?;
        // Sizes that are not multiples of 4: the top-left crop.
        let x = x.narrow(2, 0, self.h)?.narrow(3, 0, self.w)?;
        let x = self.bn2.forward_train(&x.contiguous()?)?;
        match &self.out_gain {
            Some((g, b)) => x.broadcast_mul(g)?.broadcast_add(b),
            None => Ok(x),
        }
    }
}

/// Standardised images to pixels, `PIXEL_MEAN + PIXEL_STD * z` clamped to `[0, 1]`, and the
/// clamp's derivative (1 inside, 0 where it cuts).
fn to_pixels(z: &[f32]) -> (Vec<f32>, Vec<f32>) {
    z.iter()
        .map(|&v| {
            let p = PIXEL_MEAN + PIXEL_STD * v;
            if (0.0..=1.0).contains(&p) {
                (p, 1.0)
            } else {
                (p.clamp(0.0, 1.0), 0.0)
            }
        })
        .unzip()
}

/// Distil one batch for `model` with Genie-D. `progress(iter, loss)` is called after every step.
pub fn distill(
    model: &mut dyn TapGrad,
    cfg: &GenieConfig,
    progress: &mut dyn FnMut(usize, f32),
) -> Result<GenieDistilled> {
    let shape = model.input_shape();
    cfg.map.check(&shape)?;
    let (n, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
    let dev = Device::Cpu;
    let gen = Generator::new(cfg.latent_dim, c, h, w, cfg.seed, cfg.output_gain)?;
    let z = Var::from_vec(
        normal(n * cfg.latent_dim, cfg.seed ^ SEED_LATENT),
        (n, cfg.latent_dim),
        &dev,
    )?;
    let adam = |lr: f32| ParamsAdamW {
        lr: f64::from(lr),
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt_z = candle_nn::AdamW::new(vec![z.clone()], adam(cfg.lr_latent))?;
    let mut opt_g = candle_nn::AdamW::new(gen.varmap.all_vars(), adam(cfg.lr_generator))?;
    let every = EVERY;
    let mut plateau = Plateau::new(every, MIN_LR_LATENT);
    let k = model.strided_convs();
    // Turning swing off tells whether the engine has it at all.
    let swing = match (cfg.swing, model.set_swing(None), k) {
        (false, _, _) => Swing::Off,
        (true, false, _) => Swing::Unsupported,
        (true, true, 0) => Swing::NoStridedConv,
        (true, true, k) => Swing::On(k),
    };
    let mut rng = SplitMix64::new(cfg.seed ^ SEED_SWING);
    let images = |x: &Tensor| -> Result<Vec<f32>> { x.flatten_all()?.to_vec1::<f32>() };
    let (p0, _) = to_pixels(&images(&gen.forward(z.as_tensor())?)?);
    let (_, per0, _) = zeroq::loss_and_grad(model, &p0, &cfg.map, Stats::Batch, false)?;
    for it in 0..cfg.iters {
        if let Swing::On(k) = swing {
            let offsets: Vec<(usize, usize)> =
                (0..k).map(|_| (rng.below(3), rng.below(3))).collect();
            model.set_swing(Some(&offsets));
        }
        let x = gen.forward(z.as_tensor())?;
        let (p, inside) = to_pixels(&images(&x)?);
        let (loss, _, g) = zeroq::loss_and_grad(model, &p, &cfg.map, Stats::Batch, true)?;

        let g: Vec<f32> = g
            .iter()
            .zip(&inside)
            .map(|(g, m)| g * m * PIXEL_STD)
            .collect();
        let g = Tensor::from_vec(g, x.shape(), &dev)?;
        let grads = (x * g)?.sum_all()?.backward()?;
        opt_z.step(&grads)?;
        opt_g.step(&grads)?;
        let lr = plateau.observe(loss, opt_z.learning_rate() as f32);
        opt_z.set_learning_rate(f64::from(lr));
        if (it + 1) % every == 0 {
            opt_g.set_learning_rate(opt_g.learning_rate() * GAMMA);
        }
        progress(it + 1, loss);
    }
    model.set_swing(None);
    let (p, _) = to_pixels(&images(&gen.forward(z.as_tensor())?)?);
    Ok(GenieDistilled {
        distilled: zeroq::finish(model, &p, &cfg.map, Stats::Batch, per0.iter().sum())?,
        swing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Autograd, BnTarget, TapModel};

    #[test]
    fn the_convolution_and_both_its_gradients_are_candles() -> Result<()> {
        // Five images: groups of two and a ragged last group.
        let dev = Device::Cpu;
        let n = 5;
        let x = Var::from_vec(normal(n * 3 * 5 * 4, 1), (n, 3, 5, 4), &dev)?;
        let w = Var::from_vec(normal(4 * 3 * 9, 2), (4, 3, 3, 3), &dev)?;
        let b = Tensor::from_vec(normal(4, 3), 4, &dev)?;
        let ours = Conv3x3::new(w.as_tensor(), &b)?.forward(x.as_tensor())?;
        let theirs = x
            .as_tensor()
            .conv2d(w.as_tensor(), 1, 1, 1, 1)?
            .broadcast_add(&b.reshape((1, 4, 1, 1))?)?;
        let e = (ours.clone() - &theirs)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(e < 1e-5, "{e}");
        // The gradients of <conv(x), y> with respect to x and w, through candle's autograd.
        let y = Tensor::from_vec(normal(n * 4 * 20, 4), (n, 4, 5, 4), &dev)?;
        let gref = (theirs * &y)?.sum_all()?.backward()?;
        let gours = (ours * &y)?.sum_all()?.backward()?;
        for (what, v) in [("input", x.as_tensor()), ("weight", w.as_tensor())] {
            let r: Vec<f32> = gref.get(v).unwrap().flatten_all()?.to_vec1()?;
            let o: Vec<f32> = gours.get(v).unwrap().flatten_all()?.to_vec1()?;
            assert_eq!(r.len(), o.len());
            let e = o
                .iter()
                .zip(&r)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(e < 1e-4, "{what} gradient differs by {e}");
        }
        Ok(())
    }

    #[test]
    fn generator_draws_standardised_images_of_the_input_size_from_its_seed() -> Result<()> {
        for ((c, h, w), gain) in [((3, 32, 32), true), ((1, 8, 8), false), ((3, 10, 6), true)] {
            let g = Generator::new(16, c, h, w, 3, gain)?;
            let z = Tensor::from_vec(normal(4 * 16, 1), (4, 16), &Device::Cpu)?;
            let x = g.forward(&z)?;
            assert_eq!(x.dims(), &[4, c, h, w]);
            // The final BatchNormalization (no affine) standardises every channel over the batch.
            let v: Vec<f32> = x.flatten_all()?.to_vec1()?;
            let hw = h * w;
            for ch in 0..c {
                let vals: Vec<f32> = (0..4)
                    .flat_map(|i| v[(i * c + ch) * hw..][..hw].to_vec())
                    .collect();
                let m = vals.iter().sum::<f32>() / vals.len() as f32;
                let var = vals.iter().map(|a| (a - m) * (a - m)).sum::<f32>() / vals.len() as f32;
                assert!(m.abs() < 1e-4 && (var - 1.0).abs() < 1e-3, "{m} {var}");
            }
            let same: Vec<f32> = Generator::new(16, c, h, w, 3, gain)?
                .forward(&z)?
                .flatten_all()?
                .to_vec1()?;
            assert!(v == same, "the same seed must give the same generator");
            let other: Vec<f32> = Generator::new(16, c, h, w, 4, gain)?
                .forward(&z)?
                .flatten_all()?
                .to_vec1()?;
            assert!(v != other, "another seed must give another generator");
        }
        Ok(())
    }

    /// Taps: the input and a nonlinear function of it.
    struct Toy {
        targets: Vec<BnTarget>,
    }

    impl TapModel for Toy {
        fn input_shape(&self) -> Vec<usize> {
            vec![6, 2, 8, 8]
        }
        fn bn_targets(&self) -> &[BnTarget] {
            &self.targets
        }
        fn forward_taps(&self, x: &Tensor) -> Result<Vec<Tensor>> {
            Ok(vec![x.clone(), ((x.relu()? * 1.5)? + x.sqr()?)?])
        }
    }

    #[test]
    fn the_batch_loss_falls_and_runs_repeat() -> Result<()> {
        let t = |m: Vec<f32>, s: Vec<f32>| BnTarget {
            name: "bn".into(),
            mean: m,
            std: s,
            eps: 1e-5,
        };
        let toy = Toy {
            targets: vec![
                // The last BatchNormalization fixes each channel's pixel mean and std over the
                // batch (0.5 and 0.25: inputs 0 and 0.5), as it does in the reference.
                t(vec![0.0, 0.0], vec![0.5, 0.5]),
                t(vec![0.6, 0.3], vec![0.9, 0.4]),
            ],
        };
        let map = PixelMap {
            channels: vec![(0.5, 0.5); 2],
            hw: 64,
        };
        let run = || -> Result<GenieDistilled> {
            let mut eng = Autograd::new(&toy);
            let cfg = GenieConfig {
                latent_dim: 32,
                output_gain: true,
                ..GenieConfig::reference(150, 7, map.clone())
            };
            distill(&mut eng, &cfg, &mut |_, _| {})
        };
        let r = run()?;
        let d = &r.distilled;
        eprintln!("toy BN loss {} -> {}", d.bn_loss_initial, d.bn_loss_final);
        assert!(
            d.bn_loss_final < 0.3 * d.bn_loss_initial, // measured: 0.17
            "{} -> {}",
            d.bn_loss_initial,
            d.bn_loss_final
        );
        // Autograd has no swing convolution: the run says so.
        assert_eq!(r.swing, Swing::Unsupported);
        // Pixels inside [0, 1]: inputs inside [-1, 1] for mean 0.5, std 0.5.
        assert!(d.images.iter().all(|v| (-1.0..=1.0).contains(v)));
        let again = run()?;
        assert!(again.distilled.images == d.images, "same seed, same images");
        Ok(())
    }
}
