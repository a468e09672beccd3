//! The one place convolutions are lowered to candle, so a faster kernel can replace it.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use zq_kernels::gemm::{sgemm, MatMut, MatRef};

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

/// 2-D convolution, NCHW input, [M, C/g, kh, kw] weight. A constant weight (distillation,
/// calibration) is frozen into the op and gradients flow to the input only; a weight computed
/// from a `Var` (reconstruction trains rounding and step sizes) gets its gradient too.
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, g: &ConvGeom) -> Result<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let (m, cg, kh, kw) = weight.dims4()?;
    let groups = g.group;
    if groups == 0 || c != cg * groups || m % groups != 0 {
        candle_core::bail!(
            "weight {:?} does not fit input {:?} with group {groups}",
            weight.dims(),
            x.dims()
        );
    }
    let geo = Arc::new(Geo::new(n, c, h, wd, [m, cg, kh, kw], g));
    let y = if weight.track_op() {
        x.contiguous()?
            .apply_op2(&weight.contiguous()?, ConvOpW { geo })?
    } else {
        let wv = weight.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        debug_assert_eq!(wv.len(), m * cg * kh * kw);
        x.contiguous()?.apply_op1(ConvOp {
            geo,
            w: Arc::new(wv),
        })?
    };
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
        None => Ok(y),
    }
}

/// Everything im2col and col2im need, fixed when the op is built.
#[derive(Debug)]
pub(super) struct Geo {
    pub(super) n: usize,
    pub(super) c: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) k: [usize; 2],
    pub(super) s: [usize; 2],
    pub(super) d: [usize; 2],
    pub(super) p: [usize; 2],
    pub(super) o: [usize; 2],
    pub(super) groups: usize,
    pub(super) m: usize,
}

impl Geo {
    /// Input `[n, c, h, w]`, weight `[m, c/groups, kh, kw]` (checked by the caller).
    pub(super) fn new(n: usize, c: usize, h: usize, w: usize, wd: [usize; 4], g: &ConvGeom) -> Geo {
        let win = &g.win;
        Geo {
            n,
            c,
            h,
            w,
            k: [wd[2], wd[3]],
            s: [win.strides[0], win.strides[1]],
            d: [win.dilations[0], win.dilations[1]],
            p: [win.pad_begin[0], win.pad_begin[1]],
            o: [win.out[0], win.out[1]],
            groups: g.group,
            m: wd[0],
        }
    }
    pub(super) fn cg(&self) -> usize {
        self.c / self.groups
    }
    pub(super) fn mg(&self) -> usize {
        self.m / self.groups
    }
    pub(super) fn kg(&self) -> usize {
        self.cg() * self.k[0] * self.k[1]
    }
    pub(super) fn l(&self) -> usize {
        self.o[0] * self.o[1]
    }
    /// Output positions along `axis` whose input index for kernel offset `ki` lies inside the
    /// input: the half-open range [lo, hi), and the input index of output 0 (may be negative).
    fn valid(&self, axis: usize, ki: usize) -> (usize, usize, isize) {
        let len = if axis == 0 { self.h } else { self.w } as isize;
        let (s, o) = (self.s[axis] as isize, self.o[axis] as isize);
        let base = (ki * self.d[axis]) as isize - self.p[axis] as isize;
        // base + o*s in [0, len)  <=>  o >= ceil(-base/s), o < ceil((len-base)/s)
        let lo = if base >= 0 { 0 } else { (-base + s - 1) / s };
        let hi = if len - base <= 0 {
            0
        } else {
            (len - base + s - 1) / s
        };
        let (lo, hi) = (lo.clamp(0, o), hi.clamp(0, o));
        (lo as usize, hi.max(lo) as usize, base)
    }
}

/// im2col for one image and group: `cols` is [Kg, L], row (c, ki, kj), column (oh, ow).
fn im2col(x: &[f32], g: &Geo, group: usize, cols: &mut [f32]) {
    let l = g.l();
    let (kh, kw) = (g.k[0], g.k[1]);
    let sw = g.s[1];
    for (row, out) in cols.chunks_exact_mut(l).enumerate() {
        let ci = group * g.cg() + row / (kh * kw);
        let (ki, kj) = ((row / kw) % kh, row % kw);
        let (h_lo, h_hi, h_base) = g.valid(0, ki);
        let (w_lo, w_hi, w_base) = g.valid(1, kj);
        let plane = &x[ci * g.h * g.w..][..g.h * g.w];
        for oh in 0..g.o[0] {
            let d = &mut out[oh * g.o[1]..][..g.o[1]];
            if oh < h_lo || oh >= h_hi {
                d.fill(0.0);
                continue;
            }
            let ih = (h_base + (oh * g.s[0]) as isize) as usize;
            let src = &plane[ih * g.w..][..g.w];
            d[..w_lo].fill(0.0);
            d[w_hi..].fill(0.0);
            let iw0 = (w_base + (w_lo * sw) as isize) as usize;
            if sw == 1 {
                d[w_lo..w_hi].copy_from_slice(&src[iw0..iw0 + (w_hi - w_lo)]);
            } else {
                for (t, v) in d[w_lo..w_hi].iter_mut().enumerate() {
                    *v = src[iw0 + t * sw];
                }
            }
        }
    }
}

/// col2im for one image and group, the adjoint of `im2col`: adds `cols` [Kg, L] into `dx` [C, H, W].
fn col2im(cols: &[f32], g: &Geo, group: usize, dx: &mut [f32]) {
    let l = g.l();
    let (kh, kw, hw) = (g.k[0], g.k[1], g.h * g.w);
    let sw = g.s[1];
    for cl in 0..g.cg() {
        let plane = &mut dx[(group * g.cg() + cl) * hw..][..hw];
        for ki in 0..kh {
            let (h_lo, h_hi, h_base) = g.valid(0, ki);
            for kj in 0..kw {
                let (w_lo, w_hi, w_base) = g.valid(1, kj);
                let src = &cols[((cl * kh + ki) * kw + kj) * l..][..l];
                let iw0 = (w_base + (w_lo * sw) as isize) as usize;
                for oh in h_lo..h_hi {
                    let ih = (h_base + (oh * g.s[0]) as isize) as usize;
                    let d = &mut plane[ih * g.w..][..g.w];
                    let s = &src[oh * g.o[1]..][..g.o[1]];
                    if sw == 1 {
                        for (dv, sv) in d[iw0..iw0 + (w_hi - w_lo)].iter_mut().zip(&s[w_lo..w_hi]) {
                            *dv += sv;
                        }
                    } else {
                        for (t, v) in s[w_lo..w_hi].iter().enumerate() {
                            d[iw0 + t * sw] += v;
                        }
                    }
                }
            }
        }
    }
}

fn slice_of<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("convolution input must be contiguous".into()))?;
    Ok(&s.as_slice::<f32>()?[a..b])
}

/// Work split: with at least as many images as threads, one image per task and a sequential GEMM
/// (im2col buffers stay in cache); with fewer, the GEMM itself is split.
fn gemm_threads(n: usize) -> usize {
    let t = rayon::current_num_threads();
    if n >= t {
        1
    } else {
        t
    }
}

/// Convolution as per-image im2col + GEMM with a frozen weight; backward gives the input
/// gradient only. 1x1 stride-1 unpadded convolutions skip im2col (the input already is the matrix).
struct ConvOp {
    geo: Arc<Geo>,
    /// [M, Kg] row-major: group g owns rows g*Mg..(g+1)*Mg.
    w: Arc<Vec<f32>>,
}

impl Geo {
    /// A fully connected layer from `k` inputs to `m` outputs: a pointwise convolution over one
    /// position of one image.
    pub(super) fn dense(k: usize, m: usize) -> Geo {
        Geo {
            n: 1,
            c: k,
            h: 1,
            w: 1,
            k: [1, 1],
            s: [1, 1],
            d: [1, 1],
            p: [0, 0],
            o: [1, 1],
            groups: 1,
            m,
        }
    }

    pub(super) fn pointwise(&self) -> bool {
        self.k == [1, 1] && self.s == [1, 1] && self.p == [0, 0] && self.o == [self.h, self.w]
    }
}

impl CustomOp1 for ConvOp {
    fn name(&self) -> &'static str {
        "zq-conv2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &*self.geo;
        let x = slice_of(s, l)?;
        let (mg, kg, ll, chw) = (g.mg(), g.kg(), g.l(), g.c * g.h * g.w);
        let threads = gemm_threads(g.n);
        let mut y = vec![0f32; g.n * g.m * ll];
        y.par_chunks_mut(g.m * ll).enumerate().for_each_init(
            || vec![0f32; if g.pointwise() { 0 } else { kg * ll }],
            |cols, (b, yb)| {
                let xb = &x[b * chw..][..chw];
                for grp in 0..g.groups {
                    let rhs = if g.pointwise() {
                        MatRef::rows(&xb[grp * kg * ll..][..kg * ll], kg, ll)
                    } else {
                        im2col(xb, g, grp, cols);
                        MatRef::rows(cols, kg, ll)
                    };
                    sgemm(
                        MatMut::rows(&mut yb[grp * mg * ll..][..mg * ll], mg, ll),
                        MatRef::rows(&self.w[grp * mg * kg..][..mg * kg], mg, kg),
                        rhs,
                        false,
                        threads,
                    );
                }
            },
        );
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.m, g.o[0], g.o[1]))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let op = ConvInputGrad {
            geo: self.geo.clone(),
            w: self.w.clone(),
        };
        Ok(Some(dy.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

/// Convolution of an input by a trainable weight: the same forward as [`ConvOp`]; backward gives
/// the input gradient and the weight gradient, per group dW = Σ_images dy · colsᵀ (summed in image
/// order, so the result does not depend on the thread count).
struct ConvOpW {
    geo: Arc<Geo>,
}

impl CustomOp2 for ConvOpW {
    fn name(&self) -> &'static str {
        "zq-conv2d-trainable"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let w = slice_of(ws, wl)?.to_vec();
        let op = ConvOp {
            geo: self.geo.clone(),
            w: Arc::new(w),
        };
        op.cpu_fwd(xs, xl)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = &*self.geo;
        let wv = Arc::new(w.contiguous()?.flatten_all()?.to_vec1::<f32>()?);
        let dy = dy.contiguous()?;
        // A block's input is data: no input gradient is needed there.
        let dx = if x.track_op() {
            Some(dy.apply_op1_no_bwd(&ConvInputGrad {
                geo: self.geo.clone(),
                w: wv,
            })?)
        } else {
            None
        };
        let xv = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let dyv = dy.flatten_all()?.to_vec1::<f32>()?;
        let (mg, kg, ll, chw) = (g.mg(), g.kg(), g.l(), g.c * g.h * g.w);
        // One partial dW per image (in parallel), then summed in image order.
        let parts: Vec<Vec<f32>> = (0..g.n)
            .into_par_iter()
            .map(|b| {
                let mut dw = vec![0f32; g.m * kg];
                let mut cols = vec![0f32; if g.pointwise() { 0 } else { kg * ll }];
                let xb = &xv[b * chw..][..chw];
                let dyb = &dyv[b * g.m * ll..][..g.m * ll];
                for grp in 0..g.groups {
                    let colsv = if g.pointwise() {
                        MatRef::transposed(&xb[grp * kg * ll..][..kg * ll], kg, ll)
                    } else {
                        im2col(xb, g, grp, &mut cols);
                        MatRef::transposed(&cols, kg, ll)
                    };
                    sgemm(
                        MatMut::rows(&mut dw[grp * mg * kg..][..mg * kg], mg, kg),
                        MatRef::rows(&dyb[grp * mg * ll..][..mg * ll], mg, ll),
                        colsv,
                        false,
                        1,
                    );
                }
                dw
            })
            .collect();
        let mut dw = vec![0f32; g.m * kg];
        for p in &parts {
            for (d, v) in dw.iter_mut().zip(p) {
                *d += v;
            }
        }
        let dw = Tensor::from_vec(dw, w.dims(), w.device())?;
        Ok((dx, Some(dw)))
    }
}

/// The input gradient of `ConvOp`: per image and group dcols = Wᵀ · dy, then col2im.
struct ConvInputGrad {
    geo: Arc<Geo>,
    w: Arc<Vec<f32>>,
}

impl CustomOp1 for ConvInputGrad {
    fn name(&self) -> &'static str {
        "zq-conv2d-input-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &*self.geo;
        let dy = slice_of(s, l)?;
        let (mg, kg, ll, chw) = (g.mg(), g.kg(), g.l(), g.c * g.h * g.w);
        let threads = gemm_threads(g.n);
        let mut dx = vec![0f32; g.n * chw];
        dx.par_chunks_mut(chw).enumerate().for_each_init(
            || vec![0f32; if g.pointwise() { 0 } else { kg * ll }],
            |dcols, (b, dxb)| {
                let dyb = &dy[b * g.m * ll..][..g.m * ll];
                for grp in 0..g.groups {
                    let wt = MatRef::transposed(&self.w[grp * mg * kg..][..mg * kg], mg, kg);
                    let rhs = MatRef::rows(&dyb[grp * mg * ll..][..mg * ll], mg, ll);
                    if g.pointwise() {
                        let out = &mut dxb[grp * kg * ll..][..kg * ll];
                        sgemm(MatMut::rows(out, kg, ll), wt, rhs, false, threads);
                    } else {
                        sgemm(MatMut::rows(dcols, kg, ll), wt, rhs, false, threads);
                        col2im(dcols, g, grp, dxb);
                    }
                }
            },
        );
        Ok((CpuStorage::F32(dx), Shape::from((g.n, g.c, g.h, g.w))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::infer::conv_geometry;
    use crate::ir::AutoPad;

    /// Direct convolution, the definition, for checking.
    fn naive(x: &Tensor, wt: &Tensor, g: &ConvGeom) -> Vec<f32> {
        let (n, c, h, w) = x.dims4().unwrap();
        let (m, cg, kh, kw) = wt.dims4().unwrap();
        let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let wv = wt.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let win = &g.win;
        let (oh, ow) = (win.out[0], win.out[1]);
        let mg = m / g.group;
        let mut y = vec![0f32; n * m * oh * ow];
        for b in 0..n {
            for o in 0..m {
                let grp = o / mg;
                for i in 0..oh {
                    for j in 0..ow {
                        let mut acc = 0f32;
                        for cl in 0..cg {
                            let ci = grp * cg + cl;
                            for ki in 0..kh {
                                for kj in 0..kw {
                                    let ih = (i * win.strides[0] + ki * win.dilations[0]) as isize
                                        - win.pad_begin[0] as isize;
                                    let iw = (j * win.strides[1] + kj * win.dilations[1]) as isize
                                        - win.pad_begin[1] as isize;
                                    if ih < 0 || iw < 0 || ih >= h as isize || iw >= w as isize {
                                        continue;
                                    }
                                    acc += xv[((b * c + ci) * h + ih as usize) * w + iw as usize]
                                        * wv[((o * cg + cl) * kh + ki) * kw + kj];
                                }
                            }
                        }
                        y[((b * m + o) * oh + i) * ow + j] = acc;
                    }
                }
            }
        }
        y
    }

    fn geom(
        hw: [usize; 2],
        k: [usize; 2],
        s: [usize; 2],
        d: [usize; 2],
        p: [usize; 4],
        group: usize,
    ) -> ConvGeom {
        let win = conv_geometry(&hw, &k, &s, &d, &p, AutoPad::NotSet, false).unwrap();
        ConvGeom { win, group }
    }

    #[test]
    fn conv_matches_the_definition() -> Result<()> {
        let dev = Device::Cpu;
        // (input C, output M, group, kernel, stride, dilation, pads t/l/b/r)
        let cases = [
            (4, 6, 1, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1]),
            (4, 6, 1, [3, 3], [2, 2], [1, 1], [1, 1, 1, 1]),
            (4, 6, 2, [3, 2], [2, 1], [1, 2], [0, 2, 1, 0]),
            (6, 6, 6, [3, 3], [1, 2], [1, 1], [1, 1, 1, 1]),
            (3, 5, 1, [1, 1], [1, 1], [1, 1], [0, 0, 0, 0]),
            (4, 6, 2, [1, 1], [1, 1], [1, 1], [0, 0, 0, 0]),
            (3, 4, 1, [5, 5], [3, 3], [2, 2], [3, 0, 0, 3]),
        ];
        for (c, m, group, k, s, d, p) in cases {
            let x = Tensor::randn(0f32, 1.0, (2, c, 9, 7), &dev)?;
            let wt = Tensor::randn(0f32, 1.0, (m, c / group, k[0], k[1]), &dev)?;
            let g = geom([9, 7], k, s, d, p, group);
            let a = conv2d(&x, &wt, None, &g)?.flatten_all()?.to_vec1::<f32>()?;
            let b = naive(&x, &wt, &g);
            let e = a
                .iter()
                .zip(&b)
                .map(|(u, v)| (u - v).abs())
                .fold(0f32, f32::max);
            assert!(
                e < 1e-4,
                "case c{c} m{m} g{group} k{k:?} s{s:?} d{d:?} p{p:?}: {e}"
            );
        }
        Ok(())
    }

    #[test]
    fn input_gradient_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        let x0 = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &dev)?;
        let wt = Tensor::randn(0f32, 1.0, (6, 4, 3, 3), &dev)?;
        for (stride, pad) in [(1, 1), (2, 1), (2, 0), (1, 2)] {
            let g = geom([8, 8], [3, 3], [stride; 2], [1, 1], [pad; 4], 1);
            let x = candle_core::Var::from_tensor(&x0)?;
            let a = conv2d(x.as_tensor(), &wt, None, &g)?;
            let r = Tensor::randn(0f32, 1.0, a.dims(), &dev)?;
            let ga = crate::exec::grad_along(&x, &a, &r)?;
            let b = x.as_tensor().conv2d(&wt, pad, stride, 1, 1)?;
            let d = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-4, "forward, stride {stride} pad {pad}: {d}");
            let gb = crate::exec::grad_along(&x, &b, &r)?;
            let d = (ga - gb)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-3, "gradient, stride {stride} pad {pad}: {d}");
        }
        Ok(())
    }

    #[test]
    fn weight_gradient_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        // Square and even: candle's own conv backward mis-sizes odd strided inputs.
        let x = Tensor::randn(0f32, 1.0, (3, 4, 8, 8), &dev)?;
        let w0 = Tensor::randn(0f32, 1.0, (6, 4, 3, 3), &dev)?;
        for (stride, pad) in [(1, 1), (2, 1), (2, 0)] {
            let g = geom([8, 8], [3, 3], [stride; 2], [1, 1], [pad; 4], 1);
            let w = candle_core::Var::from_tensor(&w0)?;
            let a = conv2d(&x, w.as_tensor(), None, &g)?;
            let b = x.conv2d(w.as_tensor(), pad, stride, 1, 1)?;
            let r = Tensor::randn(0f32, 1.0, a.dims(), &dev)?;
            let ga = crate::exec::grad_along(&w, &a, &r)?;
            let gb = crate::exec::grad_along(&w, &b, &r)?;
            let d = (&ga - &gb)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = gb.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-4 * scale.max(1.0), "stride {stride} pad {pad}: {d}");
        }
        // Grouped and pointwise: dW is the adjoint of w -> conv(x, w).
        for (c, m, group, k) in [(4, 6, 2, [3, 2]), (4, 6, 2, [1, 1]), (6, 6, 6, [3, 3])] {
            let x = Tensor::randn(0f32, 1.0, (2, c, 9, 7), &dev)?;
            let pads = if k == [1, 1] { [0; 4] } else { [1; 4] };
            let g = geom([9, 7], k, [1, 1], [1, 1], pads, group);
            let w = candle_core::Var::from_tensor(&Tensor::randn(
                0f32,
                1.0,
                (m, c / group, k[0], k[1]),
                &dev,
            )?)?;
            let y = conv2d(&x, w.as_tensor(), None, &g)?;
            let r = Tensor::randn(0f32, 1.0, y.dims(), &dev)?;
            let lhs = (&y * &r)?.sum_all()?;
            let gw = lhs.backward()?.get(w.as_tensor()).unwrap().clone();
            let rhs = (w.as_tensor() * gw)?.sum_all()?.to_scalar::<f32>()?;
            let lhs = lhs.to_scalar::<f32>()?;
            assert!(
                (lhs - rhs).abs() < 1e-3 * lhs.abs().max(1.0),
                "c{c} m{m} g{group} k{k:?}: {lhs} vs {rhs}"
            );
        }
        Ok(())
    }

    #[test]
    fn input_gradient_is_the_adjoint() -> Result<()> {
        // <conv(x), r> = <x, conv_grad(r)> for grouped, strided, dilated, asymmetric cases.
        let dev = Device::Cpu;
        for (c, m, group, k, s, d, p) in [
            (4, 6, 2, [3, 2], [2, 1], [1, 2], [0, 2, 1, 0]),
            (6, 6, 6, [3, 3], [2, 2], [1, 1], [1, 0, 0, 1]),
            (4, 6, 2, [1, 1], [1, 1], [1, 1], [0, 0, 0, 0]),
        ] {
            let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, c, 9, 7), &dev)?)?;
            let wt = Tensor::randn(0f32, 1.0, (m, c / group, k[0], k[1]), &dev)?;
            let g = geom([9, 7], k, s, d, p, group);
            let y = conv2d(x.as_tensor(), &wt, None, &g)?;
            let r = Tensor::randn(0f32, 1.0, y.dims(), &dev)?;
            let lhs = (&y * &r)?.sum_all()?;
            let gx = lhs.backward()?.get(x.as_tensor()).unwrap().clone();
            let rhs = (x.as_tensor() * gx)?.sum_all()?.to_scalar::<f32>()?;
            let lhs = lhs.to_scalar::<f32>()?;
            assert!(
                (lhs - rhs).abs() < 1e-3 * lhs.abs().max(1.0),
                "{lhs} vs {rhs}"
            );
        }
        Ok(())
    }
}
