//! Winograd F(2x2, 3x3) convolution for one channels-last image (`[h, w, c]`): 3x3 kernels,
//! stride 1, dilation 1, one group.
//!
//! Each 2x2 output tile is computed from a 4x4 input tile with 16 multiplications per channel pair
//! instead of 36, so the GEMMs shrink by 2.25x (Lavin & Gray 2016). The input gradient of such a
//! convolution is again one (with the kernel flipped and transposed and the padding mirrored), so
//! distillation's backward pass uses the same code. With channels innermost, the transforms of a
//! tile are arithmetic on vectors of 8 channels; the 16 products are GEMMs `[tiles, C] x [C, M]`.

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
    /// Transformed weights, `[16][c][m]`.
    u: Vec<f32>,
}

/// Eight channels of one tile position.
type V8 = [f32; 8];

#[inline(always)]
fn add(a: V8, b: V8) -> V8 {
    let mut r = [0f32; 8];
    for i in 0..8 {
        r[i] = a[i] + b[i];
    }
    r
}

#[inline(always)]
fn sub(a: V8, b: V8) -> V8 {
    let mut r = [0f32; 8];
    for i in 0..8 {
        r[i] = a[i] - b[i];
    }
    r
}

/// `n <= 8` floats from `x[at..]`, zero-filled (a full vector is one unaligned load).
#[inline(always)]
fn load(x: &[f32], at: usize, n: usize) -> V8 {
    if n == 8 {
        x[at..at + 8].try_into().unwrap()
    } else {
        let mut r = [0f32; 8];
        for (d, &v) in r.iter_mut().zip(&x[at..at + n]) {
            *d = v;
        }
        r
    }
}

/// Store (or add, when `acc`) the first `n` lanes of `v` at `y[at..]`.
#[inline(always)]
fn store(y: &mut [f32], at: usize, n: usize, v: V8, acc: bool) {
    if n == 8 {
        let d: &mut V8 = (&mut y[at..at + 8]).try_into().unwrap();
        if acc {
            *d = add(*d, v);
        } else {
            *d = v;
        }
    } else {
        for (d, &s) in y[at..at + n].iter_mut().zip(&v) {
            if acc {
                *d += s;
            } else {
                *d = s;
            }
        }
    }
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
                        u[((i * 4 + j) * c + ci) * m + mi] = v;
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
        16 * th * tw * (self.c + self.m)
    }

    /// `y = conv(x)`, or `y += conv(x)` when `accumulate`; both channels-last.
    #[inline(always)]
    pub fn run(&self, x: &[f32], y: &mut [f32], accumulate: bool, scratch: &mut [f32]) {
        let (th, tw) = self.tiles();
        let t = th * tw;
        let (c, m) = (self.c, self.m);
        assert_eq!(x.len(), c * self.h * self.w);
        assert_eq!(y.len(), m * self.oh * self.ow);
        let (v, rest) = scratch.split_at_mut(16 * c * t);
        let mx = &mut rest[..16 * m * t];
        self.transform_input(x, v);
        for xi in 0..16 {
            sgemm(
                MatMut::rows(&mut mx[xi * t * m..][..t * m], t, m),
                MatRef::rows(&v[xi * t * c..][..t * c], t, c),
                MatRef::rows(&self.u[xi * c * m..][..c * m], c, m),
                false,
                1,
            );
        }
        self.transform_output(mx, y, accumulate);
    }

    /// `V[xi][tile][c] = (B^T d B)[xi]` for every 4x4 input tile `d` (vectors of channels).
    #[inline(always)]
    fn transform_input(&self, x: &[f32], v: &mut [f32]) {
        let (th, tw) = self.tiles();
        let t = th * tw;
        let c = self.c;
        let (h, w) = (self.h as isize, self.w as isize);
        for ty in 0..th {
            for tx in 0..tw {
                let tile = ty * tw + tx;
                // Input rows/columns of the tile; None outside the image (zero padding).
                let pos = |i: usize, j: usize| -> Option<usize> {
                    let iy = (2 * ty + i) as isize - self.pad[0] as isize;
                    let ix = (2 * tx + j) as isize - self.pad[1] as isize;
                    (iy >= 0 && iy < h && ix >= 0 && ix < w).then(|| (iy * w + ix) as usize * c)
                };
                let mut at = [None; 16];
                for (k, a) in at.iter_mut().enumerate() {
                    *a = pos(k / 4, k % 4);
                }
                for cb in (0..c).step_by(8) {
                    let n = (c - cb).min(8);
                    let mut d = [[0f32; 8]; 16];
                    for (dk, a) in d.iter_mut().zip(&at) {
                        if let Some(o) = *a {
                            *dk = load(x, o + cb, n);
                        }
                    }
                    // Rows: B^T d.
                    let mut r = [[0f32; 8]; 16];
                    for j in 0..4 {
                        let (d0, d1, d2, d3) = (d[j], d[4 + j], d[8 + j], d[12 + j]);
                        r[j] = sub(d0, d2);
                        r[4 + j] = add(d1, d2);
                        r[8 + j] = sub(d2, d1);
                        r[12 + j] = sub(d1, d3);
                    }
                    // Columns: (B^T d) B.
                    for i in 0..4 {
                        let (a0, a1, a2, a3) = (r[4 * i], r[4 * i + 1], r[4 * i + 2], r[4 * i + 3]);
                        let out = [sub(a0, a2), add(a1, a2), sub(a2, a1), sub(a1, a3)];
                        for (j, o) in out.iter().enumerate() {
                            store(v, ((4 * i + j) * t + tile) * c + cb, n, *o, false);
                        }
                    }
                }
            }
        }
    }

    /// `y[2ty+a][2tx+b] = (A^T M A)[a][b]`, cropped to the output size.
    #[inline(always)]
    fn transform_output(&self, mx: &[f32], y: &mut [f32], accumulate: bool) {
        let (th, tw) = self.tiles();
        let t = th * tw;
        let (m, oh, ow) = (self.m, self.oh, self.ow);
        for ty in 0..th {
            for tx in 0..tw {
                let tile = ty * tw + tx;
                for mb in (0..m).step_by(8) {
                    let n = (m - mb).min(8);
                    let mut g = [[0f32; 8]; 16];
                    for (k, gk) in g.iter_mut().enumerate() {
                        *gk = load(mx, (k * t + tile) * m + mb, n);
                    }
                    // A^T g: two rows of four.
                    let mut r = [[0f32; 8]; 8];
                    for j in 0..4 {
                        let (g0, g1, g2, g3) = (g[j], g[4 + j], g[8 + j], g[12 + j]);
                        r[j] = add(add(g0, g1), g2);
                        r[4 + j] = sub(sub(g1, g2), g3);
                    }
                    for a in 0..2 {
                        let oy = 2 * ty + a;
                        if oy >= oh {
                            continue;
                        }
                        let (r0, r1, r2, r3) = (r[4 * a], r[4 * a + 1], r[4 * a + 2], r[4 * a + 3]);
                        let out = [add(add(r0, r1), r2), sub(sub(r1, r2), r3)];
                        for (b, o) in out.iter().enumerate() {
                            let ox = 2 * tx + b;
                            if ox >= ow {
                                continue;
                            }
                            store(y, (oy * ow + ox) * m + mb, n, *o, accumulate);
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

    fn hwc(x: &[f32], c: usize, hw: usize) -> Vec<f32> {
        (0..c * hw).map(|k| x[(k % c) * hw + k / c]).collect()
    }

    fn chw(x: &[f32], c: usize, hw: usize) -> Vec<f32> {
        (0..c * hw).map(|k| x[(k % hw) * c + k / hw]).collect()
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
            (19, 10, 6, 5, 1, 1),
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
            f.run(&hwc(&x, c, h * w), &mut y, false, &mut scratch);
            let y = chw(&y, m, oh * ow);
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
            b.run(&hwc(&g, m, oh * ow), &mut gx, true, &mut scratch);
            let gx = chw(&gx, c, h * w);
            let lhs: f32 = y.iter().zip(&g).map(|(a, b)| a * b).sum();
            let rhs: f32 = x.iter().zip(&gx).map(|(a, b)| a * (b - 1.0)).sum();
            assert!(
                (lhs - rhs).abs() < 1e-3 * lhs.abs().max(1.0),
                "adjoint c{c} m{m}: {lhs} vs {rhs}"
            );
        }
    }
}
