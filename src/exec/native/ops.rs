//! The native engine's u8 and f32 element kernels (safe code): quantize / dequantize, the
//! requantizing add, table lookups, index gathers and NHWC pooling. Loops that carry the bulk of
//! the work run through [`vectorize`] so they are compiled for AVX2 where the CPU has it.
//!
//! Rounding is always `round_half_even` in f32 and saturation to the u8 range, as ONNX
//! QuantizeLinear (and ONNX Runtime's integer kernels) define it.

#[cfg(test)]
use zq_kernels::simd::vectorize;
use zq_kernels::simd::Kernel;

/// `clamp(round_half_even(v) + zp, lo, hi)` in f32, the u8 epilogue of every step. Clamping to
/// `lo - zp - 1 ..= hi - zp + 1` first keeps the magic-number rounding in range and changes
/// nothing (the bounds are integers and both steps are monotone).
#[inline(always)]
pub(super) fn requant(v: f32, zp: f32, lo: f32, hi: f32) -> u8 {
    // Clamping to the integers `lo - zp ..= hi - zp` before rounding equals clamping after it
    // (rounding is monotone and keeps integers). Written as compare-and-select, which compiles to
    // plain `maxps`/`minps` (`f32::max` must also handle NaN); a NaN gives the lower bound.
    let (l, h) = (lo - zp, hi - zp);
    let v = if v > l { v } else { l };
    let v = if v < h { v } else { h };
    // Adding 1.5 * 2^23 rounds to nearest, ties to even (|v| <= 255, and the sum lies where the
    // float spacing is 1), leaving `round(v)` in the low mantissa bits in two's complement: its low
    // byte plus the zero point is the result (in 0..=255 by the clamp). No float-to-int
    // conversion, so the loops around it vectorise. (The zero point must be added after
    // rounding: ties go to the even `round(v)`, not the even `round(v) + zp`.)
    const MAGIC: f32 = 12_582_912.0;
    ((v + MAGIC).to_bits() as u8).wrapping_add(zp as u8)
}

/// ONNX QuantizeLinear of one value: `saturate(round_half_even(x / scale) + zp)`.
#[inline(always)]
pub(super) fn quantize_one(x: f32, scale: f32, zp: f32) -> u8 {
    requant(x / scale, zp, 0.0, 255.0)
}

/// A table `lut[q] = Q(f(DQ(q)))` for every u8 `q`, with `f` applied to all 256 dequantized
/// values at once.
pub(super) fn chain_lut(
    sx: f32,
    zx: u8,
    f: impl FnOnce(Vec<f32>) -> Result<Vec<f32>, String>,
    sy: f32,
    zy: u8,
) -> Result<[u8; 256], String> {
    let xs: Vec<f32> = (0..256).map(|q| (q as f32 - f32::from(zx)) * sx).collect();
    let ys = f(xs)?;
    if ys.len() != 256 {
        return Err(format!(
            "elementwise op gave {} values for 256 inputs",
            ys.len()
        ));
    }
    let mut lut = [0u8; 256];
    for (l, y) in lut.iter_mut().zip(ys) {
        *l = quantize_one(y, sy, f32::from(zy));
    }
    Ok(lut)
}

pub(super) fn is_identity(lut: &[u8; 256]) -> bool {
    lut.iter().enumerate().all(|(i, &v)| usize::from(v) == i)
}

/// `Some((lo, hi))` when `lut[q] == q.clamp(lo, hi)` for every `q`.
pub(super) fn as_clamp(lut: &[u8; 256]) -> Option<(u8, u8)> {
    let (lo, hi) = (lut[0], lut[255]);
    (lo <= hi
        && lut
            .iter()
            .enumerate()
            .all(|(i, &v)| v == (i as u8).clamp(lo, hi)))
    .then_some((lo, hi))
}

/// `clamp(clamp(x, a, b), c, d)` as one clamp.
pub(super) fn compose_clamp((a, b): (u8, u8), (c, d): (u8, u8)) -> (u8, u8) {
    (a.max(c).min(d), b.min(d).max(c))
}

/// NCHW f32 -> u8 NHWC (`c` channels, `hw` pixels per image; `c = 1` or `hw = 1` is a plain
/// copy): `y` receives the NHWC values of the pixels `p0..` (counted over all images) of `x`.
pub(super) struct Quantize<'a> {
    pub x: &'a [f32],
    pub y: &'a mut [u8],
    pub c: usize,
    pub hw: usize,
    pub p0: usize,
    pub scale: f32,
    pub zp: u8,
}

impl Kernel for Quantize<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let (c, hw, s, z) = (self.c, self.hw, self.scale, f32::from(self.zp));
        if c == 0 || hw == 0 {
            return;
        }
        if c == 1 || hw == 1 {
            for (o, &v) in self.y.iter_mut().zip(&self.x[self.p0 * c..]) {
                *o = quantize_one(v, s, z);
            }
            return;
        }
        let (p0, p1) = (self.p0, self.p0 + self.y.len() / c);
        let mut p = p0;
        while p < p1 {
            // The run of pixels of one image.
            let (n, pa) = (p / hw, p % hw);
            let pb = hw.min(pa + (p1 - p));
            for ch in 0..c {
                let plane = &self.x[(n * c + ch) * hw..][pa..pb];
                let out = &mut self.y[(p - p0) * c + ch..];
                for (i, &v) in plane.iter().enumerate() {
                    out[i * c] = quantize_one(v, s, z);
                }
            }
            p += pb - pa;
        }
    }
}

/// u8 (NHWC when `nhwc`) -> NCHW f32: `(q - zp) * scale`.
pub(super) struct Dequantize<'a> {
    pub x: &'a [u8],
    pub y: &'a mut [f32],
    pub c: usize,
    pub hw: usize,
    pub scale: f32,
    pub zp: u8,
}

impl Kernel for Dequantize<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let (c, hw, s, z) = (self.c, self.hw, self.scale, f32::from(self.zp));
        let img = c * hw;
        if img == 0 {
            return;
        }
        if c == 1 || hw == 1 {
            for (o, &q) in self.y.iter_mut().zip(self.x.iter()) {
                *o = (f32::from(q) - z) * s;
            }
            return;
        }
        for (yi, xi) in self.y.chunks_exact_mut(img).zip(self.x.chunks_exact(img)) {
            for (ch, plane) in yi.chunks_exact_mut(hw).enumerate() {
                for (p, o) in plane.iter_mut().enumerate() {
                    *o = (f32::from(xi[p * c + ch]) - z) * s;
                }
            }
        }
    }
}

/// Parameters of the requantizing add, ONNX Runtime's QLinearAdd formula:
/// `y = clamp(round_half_even(ra * (a - za) + rb * (b - zb)) + zy, lo, hi)` with `ra = sa / sy`,
/// `rb = sb / sy` computed once in f32.
#[derive(Debug, Clone, Copy)]
pub(super) struct AddParams {
    pub ra: f32,
    pub za: f32,
    pub rb: f32,
    pub zb: f32,
    pub zy: f32,
    pub lo: f32,
    pub hi: f32,
}

impl AddParams {
    /// QLinearAdd of one pair of u8 values.
    #[inline(always)]
    pub(super) fn add(&self, a: u8, b: u8) -> u8 {
        let v = self.ra * (f32::from(a) - self.za) + self.rb * (f32::from(b) - self.zb);
        requant(v, self.zy, self.lo, self.hi)
    }

    /// The kernels' form of this sum, the conv output being the first operand and `b` (row
    /// stride `stride`) the second. The zero points and bounds are u8 values held in f32.
    pub(super) fn residual<'a>(
        &self,
        b: &'a [u8],
        stride: usize,
    ) -> zq_kernels::int8::Residual<'a> {
        zq_kernels::int8::Residual {
            data: b,
            stride,
            ra: self.ra,
            za: self.za as u8,
            rb: self.rb,
            zb: self.zb as u8,
            zy: self.zy as u8,
            min: self.lo as u8,
            max: self.hi as u8,
        }
    }

    /// The parameters of the same sum with the operands swapped (bit-identical results: each
    /// term is computed alike and f32 addition commutes).
    pub(super) fn swapped(self) -> AddParams {
        AddParams {
            ra: self.rb,
            za: self.zb,
            rb: self.ra,
            zb: self.za,
            ..self
        }
    }

    /// Fold a following table into the sum: a clamp bounds it (when no table is queued yet),
    /// anything else is queued in `post`.
    pub(super) fn fold_table(
        &mut self,
        post: &mut Option<Table>,
        lut: &[u8; 256],
        fast: Option<Affine>,
    ) {
        match as_clamp(lut) {
            Some(r) if post.is_none() => {
                let (lo, hi) = compose_clamp((self.lo as u8, self.hi as u8), r);
                (self.lo, self.hi) = (f32::from(lo), f32::from(hi));
            }
            _ => then_table(post, lut, fast),
        }
    }
}

/// `post` followed by `lut` (a new table when there is none yet).
pub(super) fn then_table(post: &mut Option<Table>, lut: &[u8; 256], fast: Option<Affine>) {
    match post {
        Some(p) => p.then(lut),
        None => *post = Some(Table::new(*lut, fast)),
    }
}

pub(super) struct AddU8<'a> {
    pub a: &'a [u8],
    pub b: &'a [u8],
    pub y: &'a mut [u8],
    pub p: AddParams,
}

impl Kernel for AddU8<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let p = self.p;
        for ((o, &a), &b) in self.y.iter_mut().zip(self.a).zip(self.b) {
            *o = p.add(a, b);
        }
    }
}

/// `y[i] = lut[x[i]]`.
pub(super) fn lut_apply(x: &[u8], y: &mut [u8], lut: &[u8; 256]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = lut[usize::from(v)];
    }
}

/// In place `y[i] = lut[y[i]]`.
pub(super) fn lut_in_place(y: &mut [u8], lut: &[u8; 256]) {
    for v in y.iter_mut() {
        *v = lut[usize::from(*v)];
    }
}

/// `DQ -> clip -> Q` computed instead of looked up:
/// `Q(min(max((q - z1) * s1, a), b))` with `Q(x) = requant(x * k)` (or `x / k` when `div`), the
/// arithmetic ONNX does, in f32. Used only where it reproduces the table for all 256 inputs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Affine {
    pub z1: f32,
    pub s1: f32,
    pub a: f32,
    pub b: f32,
    pub k: f32,
    pub div: bool,
    pub z2: f32,
}

impl Affine {
    /// The form of `DQ(s1, z1) -> clip(a, b) -> Q(s2, z2)` that equals `lut`, if any: multiplying
    /// by `1 / s2` where that gives the same 256 results, else dividing by `s2`.
    pub(super) fn find(
        (s1, z1): (f32, u8),
        (a, b): (f32, f32),
        (s2, z2): (f32, u8),
        lut: &[u8; 256],
    ) -> Option<Affine> {
        let mul = Affine {
            z1: f32::from(z1),
            s1,
            a,
            b,
            k: 1.0 / s2,
            div: false,
            z2: f32::from(z2),
        };
        let div = Affine {
            k: s2,
            div: true,
            ..mul
        };
        [mul, div]
            .into_iter()
            .find(|p| p.k.is_finite() && (0..=255u8).all(|q| p.one(q) == lut[usize::from(q)]))
    }

    #[inline(always)]
    pub(super) fn one(&self, q: u8) -> u8 {
        let x = (f32::from(q) - self.z1) * self.s1;
        let x = if x > self.a { x } else { self.a };
        let x = if x < self.b { x } else { self.b };
        let v = if self.div { x / self.k } else { x * self.k };
        requant(v, self.z2, 0.0, 255.0)
    }
}

/// In place `y[i] = p(y[i])`.
pub(super) struct AffineU8<'a> {
    pub y: &'a mut [u8],
    pub p: Affine,
}

impl Kernel for AffineU8<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let mut p = self.p;
        // One loop per form, so each is branch-free.
        if p.div {
            p.div = true;
            for o in self.y.iter_mut() {
                *o = p.one(*o);
            }
        } else {
            p.div = false;
            for o in self.y.iter_mut() {
                *o = p.one(*o);
            }
        }
    }
}

/// A table applied in place to u8 results, with its arithmetic form when it has one (faster).
#[derive(Debug, Clone)]
pub(super) struct Table {
    pub lut: Box<[u8; 256]>,
    pub fast: Option<Affine>,
}

impl Table {
    pub(super) fn new(lut: [u8; 256], fast: Option<Affine>) -> Table {
        Table {
            lut: Box::new(lut),
            fast,
        }
    }

    /// `self` followed by `next` (the arithmetic form is dropped).
    pub(super) fn then(&mut self, next: &[u8; 256]) {
        for v in self.lut.iter_mut() {
            *v = next[usize::from(*v)];
        }
        self.fast = None;
    }

    pub(super) fn apply(&self, y: &mut [u8]) {
        match self.fast {
            Some(p) => zq_kernels::simd::vectorize(AffineU8 { y, p }),
            None => lut_in_place(y, &self.lut),
        }
    }
}

/// Marks a gathered position that is padding.
pub(super) const PAD: u32 = u32::MAX;

/// `y[i] = lut[x[map[i]]]`, or `pad` where `map[i] == PAD`.
pub(super) fn gather(x: &[u8], y: &mut [u8], map: &[u32], lut: &[u8; 256], pad: u8) {
    // Maps are mostly runs of consecutive sources (a Pad's rows, a Slice's spans): copy a run
    // at a time, through the table only when it is not the identity.
    let identity = is_identity(lut);
    let n = y.len().min(map.len());
    let mut k = 0;
    while k < n {
        let m = map[k];
        if m == PAD {
            y[k] = pad;
            k += 1;
            continue;
        }
        let mut e = k + 1;
        while e < n && map[e] == m.wrapping_add((e - k) as u32) {
            e += 1;
        }
        let src = &x[m as usize..m as usize + (e - k)];
        if identity {
            y[k..e].copy_from_slice(src);
        } else {
            for (o, &v) in y[k..e].iter_mut().zip(src) {
                *o = lut[usize::from(v)];
            }
        }
        k = e;
    }
}

/// A 2-D pooling window over NHWC images: output `(oy, ox)` covers input rows
/// `oy * stride - pad_top + ky * dilation` (and the same for columns); positions outside the
/// image are skipped.
#[derive(Debug, Clone)]
pub(super) struct PoolGeom {
    pub c: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub out_h: usize,
    pub out_w: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub dilation: [usize; 2],
    pub pad: [usize; 2],
}

impl PoolGeom {
    /// Input pixel indices of the window of output pixel `(oy, ox)`.
    fn window(&self, oy: usize, ox: usize, out: &mut Vec<usize>) {
        out.clear();
        for ky in 0..self.kernel[0] {
            let Some(iy) = (oy * self.stride[0] + ky * self.dilation[0]).checked_sub(self.pad[0])
            else {
                continue;
            };
            if iy >= self.in_h {
                continue;
            }
            for kx in 0..self.kernel[1] {
                let Some(ix) =
                    (ox * self.stride[1] + kx * self.dilation[1]).checked_sub(self.pad[1])
                else {
                    continue;
                };
                if ix < self.in_w {
                    out.push(iy * self.in_w + ix);
                }
            }
        }
    }
}

/// Max pooling of one NHWC u8 image, then `lut` (the requantization to the output's parameters;
/// max commutes with the monotone dequantization). A window entirely in the padding gives
/// `lut[0]`... it cannot happen for valid ONNX pools, whose windows always overlap the image.
pub(super) fn max_pool(g: &PoolGeom, x: &[u8], y: &mut [u8], lut: &[u8; 256]) {
    let c = g.c;
    let mut win = Vec::with_capacity(g.kernel[0] * g.kernel[1]);
    let mut acc = vec![0u8; c];
    for oy in 0..g.out_h {
        for ox in 0..g.out_w {
            g.window(oy, ox, &mut win);
            acc.fill(0);
            for &p in &win {
                for (a, &v) in acc.iter_mut().zip(&x[p * c..(p + 1) * c]) {
                    *a = (*a).max(v);
                }
            }
            let o = (oy * g.out_w + ox) * c;
            for (dst, &a) in y[o..o + c].iter_mut().zip(&acc) {
                *dst = lut[usize::from(a)];
            }
        }
    }
}

/// Average pooling of one NHWC u8 image as ONNX defines it on the dequantized values:
/// `Q(sum_window (s_x (q - z_x)) / divisor)`, the sum taken exactly in integers.
#[allow(clippy::too_many_arguments)]
pub(super) fn avg_pool(
    g: &PoolGeom,
    x: &[u8],
    y: &mut [u8],
    divisor: &[f32],
    (sx, zx): (f32, u8),
    (sy, zy): (f32, u8),
    (lo, hi): (u8, u8),
) {
    let c = g.c;
    let mut win = Vec::with_capacity(g.kernel[0] * g.kernel[1]);
    let mut acc = vec![0i32; c];
    let (zy, lo, hi) = (f32::from(zy), f32::from(lo), f32::from(hi));
    for oy in 0..g.out_h {
        for ox in 0..g.out_w {
            g.window(oy, ox, &mut win);
            acc.fill(-(win.len() as i32) * i32::from(zx));
            for &p in &win {
                for (a, &v) in acc.iter_mut().zip(&x[p * c..(p + 1) * c]) {
                    *a += i32::from(v);
                }
            }
            let d = divisor[oy * g.out_w + ox];
            let o = (oy * g.out_w + ox) * c;
            for (dst, &a) in y[o..o + c].iter_mut().zip(&acc) {
                let mean = (a as f32 * sx) / d;
                *dst = requant(mean / sy, zy, lo, hi);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_by_runs_is_the_element_by_element_gather() {
        let x: Vec<u8> = (0..200u32).map(|v| (v * 7 % 256) as u8).collect();
        let mut seed = 1u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as u32
        };
        for case in 0..50 {
            // Runs of random length from random sources, padding and lone elements between.
            let mut map = Vec::new();
            while map.len() < 300 {
                match next() % 3 {
                    0 => map.push(PAD),
                    1 => map.push(next() % 200),
                    _ => {
                        let (s, l) = (next() % 150, next() % 50);
                        map.extend(s..s + l);
                    }
                }
            }
            let mut lut = [0u8; 256];
            for (i, v) in lut.iter_mut().enumerate() {
                *v = if case % 2 == 0 {
                    i as u8
                } else {
                    (255 - i) as u8
                };
            }
            let mut want = vec![0u8; map.len()];
            for (o, &m) in want.iter_mut().zip(&map) {
                *o = if m == PAD {
                    9
                } else {
                    lut[usize::from(x[m as usize])]
                };
            }
            let mut got = vec![0u8; map.len()];
            gather(&x, &mut got, &map, &lut, 9);
            assert_eq!(got, want, "case {case}");
        }
    }

    #[test]
    fn requant_matches_onnx_quantize_linear() {
        let q = crate::ir::qdq::quantize(
            &[-3.0, -0.25, 0.25, 0.75, 1.25, 100.0, 1e30, -1e30],
            &[8],
            0,
            false,
            &[0.5],
            &[10.0],
            (0.0, 255.0),
        );
        let ours: Vec<f32> = [-3.0f32, -0.25, 0.25, 0.75, 1.25, 100.0, 1e30, -1e30]
            .iter()
            .map(|&x| f32::from(quantize_one(x, 0.5, 10.0)))
            .collect();
        assert_eq!(ours, q);
    }

    #[test]
    fn requant_rounds_half_to_even_before_the_zero_point() {
        for zp in [0u8, 1, 7, 128, 255] {
            for i in -600..=600 {
                let v = i as f32 / 2.0;
                let want = (v.round_ties_even() + f32::from(zp)).clamp(3.0, 250.0) as u8;
                assert_eq!(requant(v, f32::from(zp), 3.0, 250.0), want, "{v} {zp}");
            }
        }
        assert_eq!(requant(f32::NAN, 5.0, 0.0, 255.0), 0);
        assert_eq!(requant(f32::INFINITY, 5.0, 0.0, 255.0), 255);
    }

    #[test]
    fn relu_requantization_is_found_in_arithmetic_form() {
        let (s1, z1, s2, z2) = (0.0371f32, 113u8, 0.0213f32, 0u8);
        let relu = |v: Vec<f32>| Ok(v.into_iter().map(|x| x.max(0.0)).collect());
        let lut = chain_lut(s1, z1, relu, s2, z2).unwrap();
        let p = Affine::find((s1, z1), (0.0, f32::INFINITY), (s2, z2), &lut).unwrap();
        let mut y: Vec<u8> = (0..=255).collect();
        Table::new(lut, Some(p)).apply(&mut y);
        assert_eq!(y, lut.to_vec());
        // A table that is no clip has no such form.
        let mut other = lut;
        other[200] = other[200].wrapping_add(1);
        assert!(Affine::find((s1, z1), (0.0, f32::INFINITY), (s2, z2), &other).is_none());
    }

    #[test]
    fn clamp_tables_are_recognised_and_composed() {
        let mut lut = [0u8; 256];
        for (i, l) in lut.iter_mut().enumerate() {
            *l = (i as u8).clamp(7, 200);
        }
        assert_eq!(as_clamp(&lut), Some((7, 200)));
        lut[100] = 101;
        assert_eq!(as_clamp(&lut), None);
        assert_eq!(compose_clamp((0, 255), (7, 200)), (7, 200));
        assert_eq!(compose_clamp((0, 5), (7, 200)), (7, 7));
        assert_eq!(compose_clamp((210, 255), (7, 200)), (200, 200));
    }

    #[test]
    fn quantize_and_dequantize_transpose_nchw_and_nhwc() {
        // 1 image, 2 channels, 3 pixels.
        let x = [0.0f32, 1.0, 2.0, 10.0, 11.0, 12.0];
        let mut q = [0u8; 6];
        vectorize(Quantize {
            x: &x,
            y: &mut q,
            c: 2,
            hw: 3,
            p0: 0,
            scale: 1.0,
            zp: 0,
        });
        assert_eq!(q, [0, 10, 1, 11, 2, 12]);
        // Pixels 1.. only.
        let mut part = [0u8; 4];
        vectorize(Quantize {
            x: &x,
            y: &mut part,
            c: 2,
            hw: 3,
            p0: 1,
            scale: 1.0,
            zp: 0,
        });
        assert_eq!(part, [1, 11, 2, 12]);
        let mut back = [0f32; 6];
        vectorize(Dequantize {
            x: &q,
            y: &mut back,
            c: 2,
            hw: 3,
            scale: 1.0,
            zp: 0,
        });
        assert_eq!(back, x);
    }
}
