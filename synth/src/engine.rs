//! The interface distillation steps through: a forward pass that reports the per-channel moments of
//! every BatchNormalization input, and a backward pass that takes the loss gradient at those inputs
//! in closed form (it is affine in the activation) and returns the gradient at the model input.
//!
//! The ZeroQ loss depends on a tapped activation only through its per-(image, channel) mean and
//! variance, so `dL/dtap = a + b * (tap - mean)` with one `(a, b)` per image and channel. An engine
//! can therefore add the loss gradient while the activation is still in cache, and never has to
//! materialise a loss graph. [`Autograd`] provides the interface for any [`TapModel`] through
//! candle's autograd; the `zq` crate has a faster engine of its own for common CNN graphs.

use candle_core::{Result, Tensor, Var};
use rayon::prelude::*;

use crate::{BnTarget, TapModel};

/// Per-(image, channel) mean and sum of squared deviations of one `[N, C, HW]` activation.
#[derive(Debug, Clone, PartialEq)]
pub struct Moments {
    pub n: usize,
    pub c: usize,
    pub hw: usize,
    /// `[N * C]`, image-major.
    pub mean: Vec<f64>,
    /// `[N * C]`: sum over the positions of `(x - mean)^2`.
    pub m2: Vec<f64>,
}

impl Moments {
    /// The moments of a contiguous `[n, c, hw]` buffer.
    pub fn of(x: &[f32], n: usize, c: usize, hw: usize) -> Moments {
        assert_eq!(x.len(), n * c * hw, "moments of a buffer of the wrong size");
        let (mean, m2): (Vec<f64>, Vec<f64>) = x
            .par_chunks(hw.max(1))
            .take(n * c)
            .map(|p| plane_moments(&p[..hw]))
            .unzip();
        Moments { n, c, hw, mean, m2 }
    }
}

/// Mean and sum of squared deviations of one channel plane: two passes, eight f32 partial sums
/// per pass (so they vectorise) combined in f64.
#[inline(always)]
pub fn plane_moments(p: &[f32]) -> (f64, f64) {
    if p.is_empty() {
        return (0.0, 0.0);
    }
    let m = sum8(p, |v| v) / p.len() as f64;
    let mf = m as f32;
    let m2 = sum8(p, |v| (v - mf) * (v - mf));
    (m, m2_about_mean(m, m2, p.len()))
}

use zq_kernels::stats::m2_about_mean;

#[inline(always)]
fn sum8(p: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut acc = [0f32; 8];
    let chunks = p.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    acc.iter().map(|&a| f64::from(a)).sum::<f64>()
        + tail.iter().map(|&v| f64::from(f(v))).sum::<f64>()
}

/// The loss gradient at one tap, per (image, channel): `dL/dx = a + b * (x - mean)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Coeffs {
    /// `[N * C]`
    pub a: Vec<f32>,
    /// `[N * C]`
    pub b: Vec<f32>,
}

impl Coeffs {
    /// Apply to a contiguous `[n, c, hw]` activation with its moments: `out += a + b (x - mean)`.
    pub fn add_grad(&self, x: &[f32], m: &Moments, out: &mut [f32]) {
        let hw = m.hw.max(1);
        out.par_chunks_mut(hw)
            .zip(x.par_chunks(hw))
            .enumerate()
            .for_each(|(k, (o, p))| {
                let (a, b, mu) = (self.a[k], self.b[k], m.mean[k] as f32);
                for (o, &v) in o.iter_mut().zip(p) {
                    *o += a + b * (v - mu);
                }
            });
    }
}

/// What a distillation step needs from a model.
pub trait TapGrad {
    /// Shape of the input batch, `[N, C, H, W]`.
    fn input_shape(&self) -> Vec<usize>;
    /// The BatchNormalization layers, in the order the moments are returned.
    fn bn_targets(&self) -> &[BnTarget];
    /// Run the model on `x` (`[N, C, H, W]`, flattened) and return the moments of every
    /// BatchNormalization input.
    fn forward(&mut self, x: &[f32]) -> Result<Vec<Moments>>;
    /// After [`TapGrad::forward`]: given the loss gradient at every tap, return the gradient at the
    /// input.
    fn backward(&mut self, coeffs: &[Coeffs]) -> Result<Vec<f32>>;
    /// How many strided convolutions [`TapGrad::set_swing`] takes offsets for (0 where the engine
    /// has no swing convolution).
    fn strided_convs(&self) -> usize {
        0
    }
    /// Genie's swing convolution: from the next [`TapGrad::forward`] on, strided convolution `k`
    /// reads its input reflect-padded by 1 and cropped back to its size at offset
    /// `offsets[k] = (dy, dx)`, each in `0..=2` (`(1, 1)` is the plain convolution); `None` turns
    /// it off. Returns `false` where the engine does not support it (nothing changes then).
    fn set_swing(&mut self, offsets: Option<&[(usize, usize)]>) -> bool {
        let _ = offsets;
        false
    }
}

/// [`TapGrad`] for any [`TapModel`], through candle's autograd: the backward pass differentiates
/// `sum(a * tap + b/2 * (tap - mean)^2)` with `mean` held fixed, whose gradient is the given one.
pub struct Autograd<'a> {
    model: &'a dyn TapModel,
    last: Option<(Var, Vec<Tensor>, Vec<Moments>)>,
}

impl<'a> Autograd<'a> {
    pub fn new(model: &'a dyn TapModel) -> Autograd<'a> {
        Autograd { model, last: None }
    }
}

fn dims_nc_hw(t: &Tensor) -> Result<(usize, usize, usize)> {
    let d = t.dims();
    if d.len() < 2 {
        candle_core::bail!("a BatchNormalization input of shape {d:?} has no channel axis");
    }
    Ok((d[0], d[1], d[2..].iter().product()))
}

impl TapGrad for Autograd<'_> {
    fn input_shape(&self) -> Vec<usize> {
        self.model.input_shape()
    }

    fn bn_targets(&self) -> &[BnTarget] {
        self.model.bn_targets()
    }

    fn forward(&mut self, x: &[f32]) -> Result<Vec<Moments>> {
        let shape = self.model.input_shape();
        let v = Var::from_tensor(&Tensor::from_slice(
            x,
            shape.as_slice(),
            &candle_core::Device::Cpu,
        )?)?;
        let taps = self.model.forward_taps(v.as_tensor())?;
        let mut ms = Vec::with_capacity(taps.len());
        for t in &taps {
            let (n, c, hw) = dims_nc_hw(t)?;
            let data: Vec<f32> = t.flatten_all()?.to_vec1()?;
            ms.push(Moments::of(&data, n, c, hw));
        }
        self.last = Some((v, taps, ms.clone()));
        Ok(ms)
    }

    fn backward(&mut self, coeffs: &[Coeffs]) -> Result<Vec<f32>> {
        let Some((v, taps, ms)) = self.last.as_ref() else {
            candle_core::bail!("backward before forward");
        };
        if coeffs.len() != taps.len() {
            candle_core::bail!("{} gradients for {} taps", coeffs.len(), taps.len());
        }
        let dev = v.device();
        let mut total: Option<Tensor> = None;
        for ((t, m), k) in taps.iter().zip(ms).zip(coeffs) {
            let (n, c, hw) = dims_nc_hw(t)?;
            let t = t.reshape((n, c, hw))?;
            let a = Tensor::from_slice(&k.a, (n, c, 1), dev)?;
            let b = Tensor::from_slice(&k.b, (n, c, 1), dev)?;
            let mean: Vec<f32> = m.mean.iter().map(|&v| v as f32).collect();
            let mean = Tensor::from_vec(mean, (n, c, 1), dev)?;
            let centred = t.broadcast_sub(&mean)?;
            let s = (t.broadcast_mul(&a)?.sum_all()?
                + (centred.sqr()?.broadcast_mul(&b)?.sum_all()? * 0.5)?)?;
            total = Some(match total {
                Some(acc) => (acc + s)?,
                None => s,
            });
        }
        let n: usize = self.model.input_shape().iter().product();
        let Some(total) = total else {
            return Ok(vec![0.0; n]);
        };
        let grads = total.backward()?;
        match grads.get(v.as_tensor()) {
            Some(g) => g.flatten_all()?.to_vec1(),
            None => Ok(vec![0.0; n]),
        }
    }
}
