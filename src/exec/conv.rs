//! The one place convolutions are lowered to candle, so a faster kernel can replace it.

use candle_core::{DType, Device, Result, Tensor};

use crate::ir::infer::Window;

/// Resolved convolution geometry (2-D; 1-D convs are lifted to H = 1).
#[derive(Debug, Clone, PartialEq)]
pub struct ConvGeom {
    pub win: Window,
    pub group: usize,
}

fn idx(v: impl Iterator<Item = usize>, dev: &Device) -> Result<Tensor> {
    let v: Vec<u32> = v.map(|i| i as u32).collect();
    let n = v.len();
    Tensor::from_vec(v, n, dev)
}

/// Pad one axis with `b` leading and `e` trailing copies of `value`.
pub fn pad_axis(x: &Tensor, axis: usize, b: usize, e: usize, value: f32) -> Result<Tensor> {
    if b == 0 && e == 0 {
        return Ok(x.clone());
    }
    if value == 0.0 {
        return x.pad_with_zeros(axis, b, e);
    }
    let mut dims = x.dims().to_vec();
    let mut parts = Vec::with_capacity(3);
    if b > 0 {
        dims[axis] = b;
        parts.push(Tensor::full(value, dims.clone(), x.device())?);
    }
    parts.push(x.clone());
    if e > 0 {
        dims[axis] = e;
        parts.push(Tensor::full(value, dims, x.device())?);
    }
    Tensor::cat(&parts, axis)
}

/// Pad the spatial axes (2, 3) of an NCHW tensor with `value`.
pub fn pad_spatial(x: &Tensor, w: &Window, value: f32) -> Result<Tensor> {
    let mut x = x.clone();
    for a in 0..w.pad_begin.len() {
        x = pad_axis(&x, 2 + a, w.pad_begin[a], w.pad_end[a], value)?;
    }
    Ok(x)
}

/// Views of a padded NCHW input, one per kernel offset: `out[k]` has shape [N, C, oh, ow] and holds
/// the input element each output position sees at kernel offset k (row-major over the kernel).
pub fn windows(xp: &Tensor, w: &Window) -> Result<Vec<Tensor>> {
    let dev = xp.device();
    let (kh, kw) = (w.kernel[0], w.kernel[1]);
    let (sh, sw) = (w.strides[0], w.strides[1]);
    let (dh, dw) = (w.dilations[0], w.dilations[1]);
    let (oh, ow) = (w.out[0], w.out[1]);
    let mut out = Vec::with_capacity(kh * kw);
    for i in 0..kh {
        let rows = if sh == 1 {
            xp.narrow(2, i * dh, oh)?
        } else {
            xp.index_select(&idx((0..oh).map(|o| i * dh + o * sh), dev)?, 2)?
        };
        for j in 0..kw {
            let v = if sw == 1 {
                rows.narrow(3, j * dw, ow)?
            } else {
                rows.index_select(&idx((0..ow).map(|o| j * dw + o * sw), dev)?, 3)?
            };
            out.push(v);
        }
    }
    Ok(out)
}

/// Make sure a padded input is large enough for every window (ceil_mode can read past the end pad).
pub fn extend_for_windows(xp: Tensor, w: &Window, value: f32) -> Result<Tensor> {
    let mut xp = xp;
    for a in 0..2 {
        let need = (w.out[a] - 1) * w.strides[a] + (w.kernel[a] - 1) * w.dilations[a] + 1;
        let have = xp.dim(2 + a)?;
        if need > have {
            let mut dims = xp.dims().to_vec();
            dims[2 + a] = need - have;
            let fill = Tensor::full(value, dims, xp.device())?;
            xp = Tensor::cat(&[&xp, &fill], 2 + a)?;
        }
    }
    Ok(xp)
}

/// 2-D convolution, NCHW input, [M, C/g, kh, kw] weight.
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, g: &ConvGeom) -> Result<Tensor> {
    let w = &g.win;
    let uniform = w.strides[0] == w.strides[1] && w.dilations[0] == w.dilations[1];
    let y = if g.group == 1 && uniform {
        let sym = w.pad_begin[0] == w.pad_end[0]
            && w.pad_begin[1] == w.pad_end[1]
            && w.pad_begin[0] == w.pad_begin[1];
        let (xp, p) = if sym {
            (x.clone(), w.pad_begin[0])
        } else {
            (pad_spatial(x, w, 0.0)?, 0)
        };
        xp.conv2d(&weight.contiguous()?, p, w.strides[0], w.dilations[0], 1)?
    } else {
        conv2d_im2col(x, weight, g)?
    };
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
        None => Ok(y),
    }
}

/// General convolution by explicit im2col and a batched matmul (any groups, strides, dilations).
pub fn conv2d_im2col(x: &Tensor, weight: &Tensor, g: &ConvGeom) -> Result<Tensor> {
    let w = &g.win;
    let (n, c, _, _) = x.dims4()?;
    let (m, cg, kh, kw) = weight.dims4()?;
    let groups = g.group;
    let (oh, ow) = (w.out[0], w.out[1]);
    let xp = pad_spatial(x, w, 0.0)?;
    let views = windows(&xp, w)?;
    // [N, C, K, oh*ow] with K = kh*kw, then [N, G, Cg*K, L]
    let k = kh * kw;
    let cols = Tensor::stack(&views, 2)?.reshape((n, groups, cg * k, oh * ow))?;
    debug_assert_eq!(c, cg * groups);
    let wm = weight
        .reshape((1, groups, m / groups, cg * k))?
        .broadcast_as((n, groups, m / groups, cg * k))?;
    let y = wm.contiguous()?.matmul(&cols.contiguous()?)?; // [N, G, Mg, L]
    y.reshape((n, m, oh, ow))
}

/// A constant of ones, used for average-pool divisors.
pub fn ones(dims: &[usize], dev: &Device) -> Result<Tensor> {
    Tensor::ones(dims, DType::F32, dev)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::infer::conv_geometry;
    use crate::ir::AutoPad;

    #[test]
    fn im2col_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 4, 9, 7), &dev)?;
        let wt = Tensor::randn(0f32, 1.0, (6, 4, 3, 3), &dev)?;
        for (stride, pad) in [(1, 1), (2, 1), (2, 0), (1, 2)] {
            let win = conv_geometry(
                &[9, 7],
                &[3, 3],
                &[stride, stride],
                &[],
                &[pad; 4],
                AutoPad::NotSet,
                false,
            )
            .unwrap();
            let g = ConvGeom { win, group: 1 };
            let a = conv2d(&x, &wt, None, &g)?;
            let b = conv2d_im2col(&x, &wt, &g)?;
            let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-4, "stride {stride} pad {pad}: {d}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod grad_tests {
    use super::*;
    use crate::ir::infer::conv_geometry;
    use crate::ir::AutoPad;

    #[test]
    fn conv_grads_agree() -> Result<()> {
        let dev = Device::Cpu;
        let x0 = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &dev)?;
        let wt = Tensor::randn(0f32, 1.0, (6, 4, 3, 3), &dev)?;
        for (stride, pad) in [(1, 1), (2, 1)] {
            let win = conv_geometry(
                &[8, 8],
                &[3, 3],
                &[stride, stride],
                &[],
                &[pad; 4],
                AutoPad::NotSet,
                false,
            )
            .unwrap();
            let g = ConvGeom { win, group: 1 };
            let x = candle_core::Var::from_tensor(&x0)?;
            let a = conv2d(x.as_tensor(), &wt, None, &g)?;
            let r = Tensor::randn(0f32, 1.0, a.dims(), &dev)?;
            let ga = (a * &r)?
                .sum_all()?
                .backward()?
                .get(x.as_tensor())
                .unwrap()
                .clone();
            let b = conv2d_im2col(x.as_tensor(), &wt, &g)?;
            let gb = (b * &r)?
                .sum_all()?
                .backward()?
                .get(x.as_tensor())
                .unwrap()
                .clone();
            let d = (ga - gb)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-3, "stride {stride} pad {pad}: {d}");
        }
        Ok(())
    }
}
