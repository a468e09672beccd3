//! Winograd F(2x2, 3x3) convolution for one image: 3x3 kernels, stride 1, dilation 1, one group.
//!
//! Each 2x2 output tile is computed from a 4x4 input tile with 16 multiplications per channel pair
//! instead of 36, so the GEMMs shrink by 2.25x (Lavin & Gray 2016). The input gradient of such a
//! convolution is again one (with the kernel flipped and transposed and the padding mirrored), so
//! distillation's backward pass uses the same code. The transforms work on whole rows, so they
//! vectorise; the 16 products are GEMMs `[M, C] x [C, tiles]`.

use zq_quant::kernels::gemm::{sgemm, MatMut, MatRef};

/// The geometry of a 3x3 stride-1 convolution of a `[c, h, w]` image into `[m, oh, ow]`, with
/// `pad` rows/columns of zeros before the input (after it, as many as the output size needs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WinoShape {
    pub c: usize,
    pub m: usize,
    pub h: usize,
    pub w: usize,
    pub oh: usize,
    pub ow: usize,
    pub pad: [usize; 2],
}

/// A convolution of shape [`WinoShape`] with its weights transformed.
#[derive(Debug, Clone)]
pub struct Wino {
    c: usize,
    m: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    pad: [usize; 2],
    /// Transformed weights, `[16][m][c]`.
    u: Vec<f32>,
}

impl Wino {
    /// `weight` is `[m, c, 3, 3]` row-major.
    pub fn new(weight: &[f32], shape: WinoShape) -> Wino {
        let WinoShape {
            c,
            m,
            h,
            w,
            oh,
            ow,
            pad,
        } = shape;
        assert_eq!(weight.len(), m * c * 9);
        let mut u = vec![0f32; 16 * m * c];
        for mi in 0..m {
            for ci in 0..c {
                let g = &weight[(mi * c + ci) * 9..][..9];
                // G g G^T with G = [[1,0,0],[.5,.5,.5],[.5,-.5,.5],[0,0,1]].
                let mut t = [[0f32; 3]; 4]; // G g
                for j in 0..3 {
                    let (a, b, d) = (g[j], g[3 + j], g[6 + j]);
                    t[0][j] = a;
                    t[1][j] = 0.5 * (a + b + d);
                    t[2][j] = 0.5 * (a - b + d);
                    t[3][j] = d;
                }
                for (i, row) in t.iter().enumerate() {
                    let (a, b, d) = (row[0], row[1], row[2]);
                    let r = [a, 0.5 * (a + b + d), 0.5 * (a - b + d), d];
                    for (j, v) in r.into_iter().enumerate() {
                        u[((i * 4 + j) * m + mi) * c + ci] = v;
                    }
                }
            }
        }
        Wino {
            c,
            m,
            h,
            w,
            oh,
            ow,
            pad,
            u,
        }
    }

    /// The convolution computing the input gradient of the one of `shape`: kernel flipped and
    /// transposed (`[c, m, 3, 3]`), padding mirrored (`2 - pad`), from the output size to the
    /// input size. `None` when the padding exceeds 2 (the gradient would need cropping).
    pub fn input_grad(weight: &[f32], shape: WinoShape) -> Option<Wino> {
        let WinoShape {
            c,
            m,
            h,
            w,
            oh,
            ow,
            pad,
        } = shape;
        if pad[0] > 2 || pad[1] > 2 {
            return None;
        }
        let mut flipped = vec![0f32; c * m * 9];
        for mi in 0..m {
            for ci in 0..c {
                for k in 0..9 {
                    flipped[(ci * m + mi) * 9 + (8 - k)] = weight[(mi * c + ci) * 9 + k];
                }
            }
        }
        let back = WinoShape {
            c: m,
            m: c,
            h: oh,
            w: ow,
            oh: h,
            ow: w,
            pad: [2 - pad[0], 2 - pad[1]],
        };
        Some(Wino::new(&flipped, back))
    }

    fn tiles(&self) -> (usize, usize) {
        (self.oh.div_ceil(2), self.ow.div_ceil(2))
    }

    /// Scratch floats [`Wino::run`] needs.
    pub fn scratch_len(&self) -> usize {
        let (th, tw) = self.tiles();
        16 * th * tw * (self.c + self.m) + 4 * (2 * tw + 2) + 2 * (tw + 1) + 8 * tw
    }

    /// `y = conv(x)`, or `y += conv(x)` when `accumulate`.
    #[inline(always)]
    pub fn run(&self, x: &[f32], y: &mut [f32], accumulate: bool, scratch: &mut [f32]) {
        let (th, tw) = self.tiles();
        let t = th * tw;
        let (c, m) = (self.c, self.m);
        assert_eq!(x.len(), c * self.h * self.w);
        assert_eq!(y.len(), m * self.oh * self.ow);
        let (v, rest) = scratch.split_at_mut(16 * c * t);
        let (mx, rows) = rest.split_at_mut(16 * m * t);
        self.transform_input(x, v, rows);
        for xi in 0..16 {
            sgemm(
                MatMut::rows(&mut mx[xi * m * t..][..m * t], m, t),
                MatRef::rows(&self.u[xi * m * c..][..m * c], m, c),
                MatRef::rows(&v[xi * c * t..][..c * t], c, t),
                false,
                1,
            );
        }
        self.transform_output(mx, y, accumulate, rows);
    }

    /// `V[xi][c][tile] = (B^T d B)[xi]` for every channel and 4x4 input tile `d`.
    #[inline(always)]
    fn transform_input(&self, x: &[f32], v: &mut [f32], rows: &mut [f32]) {
        let (th, tw) = self.tiles();
        let t = th * tw;
        let (h, w, pw) = (self.h, self.w, self.pad[1]);
        let span = 2 * tw + 2; // input columns a row of tiles reads
        let (r, eo) = rows.split_at_mut(4 * span);
        let (e, o) = eo.split_at_mut(tw + 1);
        let o = &mut o[..tw + 1];
        // Columns of a padded row that come from the input.
        let (c0, c1) = (pw.min(span), (pw + w).min(span));
        for ci in 0..self.c {
            let plane = &x[ci * h * w..][..h * w];
            for ty in 0..th {
                // The four input rows of this tile row, zero padded: r[i][k] = x[iy][k - pad_w].
                for i in 0..4 {
                    let iy = (2 * ty + i) as isize - self.pad[0] as isize;
                    let dst = &mut r[i * span..][..span];
                    if iy < 0 || iy >= h as isize {
                        dst.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * w..][..w];
                    dst[..c0].fill(0.0);
                    dst[c0..c1].copy_from_slice(&src[..c1 - c0]);
                    dst[c1..].fill(0.0);
                }
                let (r0, rest) = r.split_at(span);
                let (r1, rest) = rest.split_at(span);
                let (r2, r3) = rest.split_at(span);
                // Vertical B^T, then horizontal B on even/odd columns.
                for i in 0..4 {
                    let (p, q, sign) = match i {
                        0 => (r0, r2, -1.0),
                        1 => (r1, r2, 1.0),
                        2 => (r2, r1, -1.0),
                        _ => (r1, r3, -1.0),
                    };
                    for (((ev, od), pp), qq) in e
                        .iter_mut()
                        .zip(o.iter_mut())
                        .zip(p.chunks_exact(2))
                        .zip(q.chunks_exact(2))
                    {
                        *ev = pp[0] + sign * qq[0];
                        *od = pp[1] + sign * qq[1];
                    }
                    let base = ty * tw;
                    let seg = |j: usize| (4 * i + j) * self.c * t + ci * t + base;
                    let (e0, e1, o0, o1) = (&e[..tw], &e[1..], &o[..tw], &o[1..]);
                    let out = &mut v[seg(0)..][..tw];
                    for (d, (a, b)) in out.iter_mut().zip(e0.iter().zip(e1)) {
                        *d = a - b;
                    }
                    let out = &mut v[seg(1)..][..tw];
                    for (d, (a, b)) in out.iter_mut().zip(o0.iter().zip(e1)) {
                        *d = a + b;
                    }
                    let out = &mut v[seg(2)..][..tw];
                    for (d, (a, b)) in out.iter_mut().zip(e1.iter().zip(o0)) {
                        *d = a - b;
                    }
                    let out = &mut v[seg(3)..][..tw];
                    for (d, (a, b)) in out.iter_mut().zip(o0.iter().zip(o1)) {
                        *d = a - b;
                    }
                }
            }
        }
    }

    /// `y[2ty+a][2tx+b] = (A^T M A)[a][b]`, cropped to the output size.
    #[inline(always)]
    fn transform_output(&self, mx: &[f32], y: &mut [f32], accumulate: bool, rows: &mut [f32]) {
        let (th, tw) = self.tiles();
        let t = th * tw;
        let (oh, ow) = (self.oh, self.ow);
        let (t0, rest) = rows.split_at_mut(4 * tw);
        let t1 = &mut rest[..4 * tw];
        for mi in 0..self.m {
            let plane = &mut y[mi * oh * ow..][..oh * ow];
            for ty in 0..th {
                let seg = |xi: usize| &mx[xi * self.m * t + mi * t + ty * tw..][..tw];
                // Vertical A^T: t0[j] = m0j + m1j + m2j, t1[j] = m1j - m2j - m3j.
                for j in 0..4 {
                    let (a, b, c, d) = (seg(j), seg(4 + j), seg(8 + j), seg(12 + j));
                    let p = &mut t0[j * tw..][..tw];
                    for (p, ((a, b), c)) in p.iter_mut().zip(a.iter().zip(b).zip(c)) {
                        *p = a + b + c;
                    }
                    let q = &mut t1[j * tw..][..tw];
                    for (q, ((b, c), d)) in q.iter_mut().zip(b.iter().zip(c).zip(d)) {
                        *q = b - c - d;
                    }
                }
                for (a, tt) in [&*t0, &*t1].into_iter().enumerate() {
                    let oy = 2 * ty + a;
                    if oy >= oh {
                        continue;
                    }
                    let row = &mut plane[oy * ow..][..ow];
                    let (c0, rest) = tt.split_at(tw);
                    let (c1, rest) = rest.split_at(tw);
                    let (c2, c3) = rest.split_at(tw);
                    let pairs = ow / 2;
                    let it = c0.iter().zip(c1).zip(c2).zip(c3);
                    if accumulate {
                        for (d, (((a, b), c), e)) in row.chunks_exact_mut(2).zip(it) {
                            d[0] += a + b + c;
                            d[1] += b - c - e;
                        }
                    } else {
                        for (d, (((a, b), c), e)) in row.chunks_exact_mut(2).zip(it) {
                            d[0] = a + b + c;
                            d[1] = b - c - e;
                        }
                    }
                    if ow % 2 == 1 {
                        let k = pairs;
                        let v = c0[k] + c1[k] + c2[k];
                        if accumulate {
                            row[ow - 1] += v;
                        } else {
                            row[ow - 1] = v;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn direct(x: &[f32], wt: &[f32], sh: WinoShape) -> Vec<f32> {
        let WinoShape {
            c,
            m,
            h,
            w,
            oh,
            ow,
            pad,
        } = sh;
        let mut y = vec![0f32; m * oh * ow];
        for mi in 0..m {
            for i in 0..oh {
                for j in 0..ow {
                    let mut acc = 0f32;
                    for ci in 0..c {
                        for ki in 0..3 {
                            for kj in 0..3 {
                                let iy = (i + ki) as isize - pad[0] as isize;
                                let ix = (j + kj) as isize - pad[1] as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                acc += x[(ci * h + iy as usize) * w + ix as usize]
                                    * wt[((mi * c + ci) * 3 + ki) * 3 + kj];
                            }
                        }
                    }
                    y[(mi * oh + i) * ow + j] = acc;
                }
            }
        }
        y
    }

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        zq_synth::adam::normal(n, seed)
    }

    #[test]
    fn matches_direct_convolution_and_its_adjoint() {
        // (c, m, h, w, pad_h, pad_w, extra output rows/cols trimmed)
        for (c, m, h, w, ph, pw) in [
            (3, 5, 8, 8, 1, 1),
            (4, 2, 7, 5, 1, 1),
            (2, 3, 6, 9, 0, 0),
            (2, 2, 5, 4, 2, 1),
            (1, 1, 3, 3, 1, 0),
        ] {
            let oh = h + 2 * ph - 2;
            let ow = w + 2 * pw - 2;
            let x = rand(c * h * w, 1);
            let wt = rand(m * c * 9, 2);
            let sh = WinoShape {
                c,
                m,
                h,
                w,
                oh,
                ow,
                pad: [ph, pw],
            };
            let f = Wino::new(&wt, sh);
            let mut scratch = vec![0f32; f.scratch_len()];
            let mut y = vec![7f32; m * oh * ow];
            f.run(&x, &mut y, false, &mut scratch);
            let r = direct(&x, &wt, sh);
            let e = y
                .iter()
                .zip(&r)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(e < 1e-4, "c{c} m{m} {h}x{w} pad {ph},{pw}: {e}");
            // Adjoint: <conv(x), g> == <x, conv_grad(g)>, and accumulate adds.
            let g = rand(m * oh * ow, 3);
            let b = Wino::input_grad(&wt, sh).unwrap();
            let mut scratch = vec![0f32; b.scratch_len()];
            let mut gx = vec![1f32; c * h * w];
            b.run(&g, &mut gx, true, &mut scratch);
            let lhs: f32 = y.iter().zip(&g).map(|(a, b)| a * b).sum();
            let rhs: f32 = x.iter().zip(&gx).map(|(a, b)| a * (b - 1.0)).sum();
            assert!(
                (lhs - rhs).abs() < 1e-3 * lhs.abs().max(1.0),
                "adjoint c{c} m{m}: {lhs} vs {rhs}"
            );
        }
    }
}
