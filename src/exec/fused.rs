//! Element-wise ops whose candle composition wastes work in backward: candle differentiates
//! both operands of a broadcast multiply or add, so a per-channel affine built from them reduces
//! the whole activation tensor to gradients of constants nobody asked for. These ops carry their
//! constants inside and differentiate with respect to the activation only.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `y[n, c, ...] = x[n, c, ...] * scale[c] + shift[c]` (BatchNormalization in inference form).
pub fn channel_affine(x: &Tensor, scale: Vec<f32>, shift: Vec<f32>) -> Result<Tensor> {
    let c = x.dim(1)?;
    if scale.len() != c || shift.len() != c {
        candle_core::bail!(
            "per-channel parameters of length {}/{} for {c} channels",
            scale.len(),
            shift.len()
        );
    }
    x.contiguous()?.apply_op1(ChannelAffine {
        scale: Arc::new(scale),
        shift: Some(Arc::new(shift)),
    })
}

struct ChannelAffine {
    scale: Arc<Vec<f32>>,
    /// None: the backward form, `dy * scale`.
    shift: Option<Arc<Vec<f32>>>,
}

impl CustomOp1 for ChannelAffine {
    fn name(&self) -> &'static str {
        "zq-channel-affine"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (a, b) = l.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("channel affine needs contiguous input".into())
        })?;
        let x = &s.as_slice::<f32>()?[a..b];
        let dims = l.dims();
        let c = dims[1];
        let plane: usize = dims[2..].iter().product::<usize>().max(1);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(plane)
            .zip(x.par_chunks(plane))
            .enumerate()
            .for_each(|(p, (yo, xi))| {
                let k = self.scale[p % c];
                let sh = self.shift.as_ref().map_or(0.0, |v| v[p % c]);
                for (o, i) in yo.iter_mut().zip(xi) {
                    *o = i * k + sh;
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let back = ChannelAffine {
            scale: self.scale.clone(),
            shift: None,
        };
        Ok(Some(dy.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

/// `max(x, 0)`, whose backward is one pass over `dy` and the output (candle's builds a mask from
/// the input in three passes).
pub fn relu(x: &Tensor) -> Result<Tensor> {
    if x.dtype() != candle_core::DType::F32 || !x.device().is_cpu() {
        return x.relu();
    }
    x.contiguous()?.apply_op1(Relu)
}

struct Relu;

fn flat<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("relu needs a contiguous input".into()))?;
    Ok(&s.as_slice::<f32>()?[a..b])
}

const CHUNK: usize = 1 << 14;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "zq-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = flat(s, l)?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(o, i)| {
                for (o, &v) in o.iter_mut().zip(i) {
                    *o = v.max(0.0);
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            dy.contiguous()?
                .apply_op2_no_bwd(&y.contiguous()?, &ReluGrad)?,
        ))
    }
}

/// `dy * (y > 0)`.
struct ReluGrad;

impl candle_core::CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "zq-relu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (dy, y) = (flat(s1, l1)?, flat(s2, l2)?);
        let mut dx = vec![0f32; dy.len()];
        dx.par_chunks_mut(CHUNK)
            .zip(dy.par_chunks(CHUNK).zip(y.par_chunks(CHUNK)))
            .for_each(|(o, (g, y))| {
                for ((o, &g), &y) in o.iter_mut().zip(g).zip(y) {
                    *o = if y > 0.0 { g } else { 0.0 };
                }
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// QuantizeLinear (`range` = the integer type's) or DequantizeLinear (`range` = None) on a
/// contiguous f32 tensor holding real or integer values; one parallel pass, no gradient.
pub fn qdq(
    x: &Tensor,
    axis: usize,
    per_axis: bool,
    scale: Vec<f32>,
    zp: Vec<f32>,
    range: Option<(f32, f32)>,
) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Qdq {
        axis,
        per_axis,
        scale,
        zp,
        range,
    })
}

struct Qdq {
    axis: usize,
    per_axis: bool,
    scale: Vec<f32>,
    zp: Vec<f32>,
    range: Option<(f32, f32)>,
}

impl CustomOp1 for Qdq {
    fn name(&self) -> &'static str {
        "zq-qdq"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = flat(s, l)?;
        let y = match self.range {
            Some(r) => crate::ir::qdq::quantize(
                x,
                l.dims(),
                self.axis,
                self.per_axis,
                &self.scale,
                &self.zp,
                r,
            ),
            None => crate::ir::qdq::dequantize(
                x,
                l.dims(),
                self.axis,
                self.per_axis,
                &self.scale,
                &self.zp,
            ),
        };
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn affine_and_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 4, 5), &dev)?)?;
        let (k, b) = (vec![0.5f32, -2.0, 3.0], vec![1.0f32, 0.0, -1.0]);
        let y = channel_affine(x.as_tensor(), k.clone(), b.clone())?;
        let kt = Tensor::new(k.as_slice(), &dev)?.reshape((1, 3, 1, 1))?;
        let bt = Tensor::new(b.as_slice(), &dev)?.reshape((1, 3, 1, 1))?;
        let want = x.as_tensor().broadcast_mul(&kt)?.broadcast_add(&bt)?;
        assert!((&y - &want)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
        let r = Tensor::randn(0f32, 1.0, (2, 3, 4, 5), &dev)?;
        let g = (y * &r)?.sum_all()?.backward()?;
        let gx = g.get(x.as_tensor()).unwrap();
        let want = r.broadcast_mul(&kt)?;
        assert!((gx - want)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
        Ok(())
    }

    #[test]
    fn relu_and_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 4, 5), &dev)?)?;
        let r = Tensor::randn(0f32, 1.0, (3, 4, 5), &dev)?;
        let a = relu(x.as_tensor())?;
        let b = x.as_tensor().relu()?;
        assert_eq!(
            a.flatten_all()?.to_vec1::<f32>()?,
            b.flatten_all()?.to_vec1::<f32>()?
        );
        let ga = crate::exec::grad_along(&x, &a, &r)?;
        let gb = crate::exec::grad_along(&x, &b, &r)?;
        assert!((ga - gb)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
        Ok(())
    }
}
