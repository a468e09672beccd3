//! Winograd F(4x4, 3x3) convolution for one channels-last image (`[h, w, c]`): 3x3 kernels,
//! stride 1, dilation 1, one group.
//!
//! Each 4x4 output tile is computed from a 6x6 input tile with 36 multiplications per channel pair
//! instead of 144, so the GEMMs shrink by 4x (Lavin & Gray 2016; the transforms are theirs). The
//! input gradient of such a convolution is again one (with the kernel flipped and transposed and
//! the padding mirrored), so distillation's backward pass uses the same code. With channels
//! innermost, the transforms of a tile are arithmetic on vectors of 8 channels; the 36 products
//! are GEMMs `[tiles, C] x [C, M]`.

use zq_kernels::gemm::{MatMut, MatRef};
use zq_kernels::simd::{vectorize, Kernel};
use zq_kernels::small::sgemm_small;
use zq_kernels::team::Team;

/// Input tile side, output tile side, transformed points.
const TI: usize = 6;
const TO: usize = 4;
const P: usize = TI * TI;

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
    /// Transformed weights, `[36][c][m]`.
    u: Vec<f32>,
}

/// One band of tile rows of a [`Wino::run`], compiled per instruction set.
struct Band<'a> {
    f: &'a Wino,
    x: &'a [f32],
    y: &'a mut [f32],
    accumulate: bool,
    scratch: &'a mut [f32],
    rows: [usize; 2],
}

impl Kernel for Band<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let [a, b] = self.rows;
        self.f
            .run_band(self.x, self.y, self.accumulate, self.scratch, a, b);
    }
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
        let mut u = vec![0f32; P * m * c];
        // G (6x3) of F(4x4, 3x3).
        const G: [[f32; 3]; TI] = [
            [0.25, 0.0, 0.0],
            [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
            [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
            [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
            [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
            [0.0, 0.0, 1.0],
        ];
        for mi in 0..m {
            for ci in 0..c {
                let g = &weight[(mi * c + ci) * 9..][..9];
                // G g G^T, in f64 so the transformed weights are exact to f32 rounding.
                let mut t = [[0f64; 3]; TI]; // G g
                for (i, gr) in G.iter().enumerate() {
                    for j in 0..3 {
                        t[i][j] = (0..3)
                            .map(|k| f64::from(gr[k]) * f64::from(g[3 * k + j]))
                            .sum();
                    }
                }
                for (i, row) in t.iter().enumerate() {
                    for (j, gr) in G.iter().enumerate() {
                        let v: f64 = (0..3).map(|k| row[k] * f64::from(gr[k])).sum();
                        u[((i * TI + j) * c + ci) * m + mi] = v as f32;
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
        (self.oh.div_ceil(TO), self.ow.div_ceil(TO))
    }

    /// Scratch floats [`Wino::run`] needs.
    pub fn scratch_len(&self) -> usize {
        let (th, tw) = self.tiles();
        P * th * tw * (self.c + self.m)
    }

    /// `y = conv(x)`, or `y += conv(x)` when `accumulate`; both channels-last. On a team of
    /// more than one thread the tile rows are split into one band per thread (each its own
    /// transforms and GEMMs on its share of `scratch`), for a batch too small to give every core
    /// an image of its own.
    #[inline(always)]
    pub fn run(
        &self,
        x: &[f32],
        y: &mut [f32],
        accumulate: bool,
        scratch: &mut [f32],
        team: &Team,
    ) {
        let (th, tw) = self.tiles();
        let (c, m) = (self.c, self.m);
        assert_eq!(x.len(), c * self.h * self.w);
        assert_eq!(y.len(), m * self.oh * self.ow);
        let parts = team.parts_for(self.oh * self.ow * c * m * 9, th);
        if parts == 1 {
            self.run_band(x, y, accumulate, scratch, 0, th);
            return;
        }
        let per = th.div_ceil(parts);
        let mut bands = Vec::with_capacity(parts);
        let (mut yr, mut sr) = (y, scratch);
        for a in (0..th).step_by(per) {
            let b = (a + per).min(th);
            let rows = (TO * b).min(self.oh) - TO * a;
            let (yk, rest) = std::mem::take(&mut yr).split_at_mut(rows * self.ow * m);
            yr = rest;
            let (sk, rest) = std::mem::take(&mut sr).split_at_mut(P * (b - a) * tw * (c + m));
            sr = rest;
            bands.push(Band {
                f: self,
                x,
                y: yk,
                accumulate,
                scratch: sk,
                rows: [a, b],
            });
        }
        team.for_each(bands, &|band| vectorize(band));
    }

    /// [`Wino::run`] for the tile rows `a..b`: `y` holds their output rows only.
    #[inline(always)]
    fn run_band(
        &self,
        x: &[f32],
        y: &mut [f32],
        accumulate: bool,
        scratch: &mut [f32],
        a: usize,
        b: usize,
    ) {
        let (_, tw) = self.tiles();
        let t = (b - a) * tw;
        let (c, m) = (self.c, self.m);
        let (v, rest) = scratch.split_at_mut(P * c * t);
        let mx = &mut rest[..P * m * t];
        self.transform_input(x, v, a, b);
        // `v` is `[tile][xi][c]` and `mx` `[tile][xi][m]`: a tile's transform reads and writes
        // one contiguous run, where `[xi][tile]` would put its 36 points a power-of-two stride
        // apart in one cache set. The GEMM of point `xi` takes every 36th row.
        for xi in 0..P {
            sgemm_small(
                MatMut::strided(&mut mx[xi * m..], t, m, P * m),
                MatRef::strided(&v[xi * c..], t, c, P * c),
                MatRef::rows(&self.u[xi * c * m..][..c * m], c, m),
                false,
            );
        }
        self.transform_output(mx, y, accumulate, a, b);
    }

    /// `V[tile][xi][c] = (B^T d B)[xi]` for every 6x6 input tile `d` (vectors of channels).
    #[inline(always)]
    fn transform_input(&self, x: &[f32], v: &mut [f32], a: usize, b: usize) {
        let (_, tw) = self.tiles();
        let c = self.c;
        let (h, w) = (self.h as isize, self.w as isize);
        let mut at = [None; P];
        for ty in a..b {
            for tx in 0..tw {
                let tile = (ty - a) * tw + tx;
                // Offsets of the tile's inputs; None outside the image (zero padding).
                for (k, a) in at.iter_mut().enumerate() {
                    let iy = (TO * ty + k / TI) as isize - self.pad[0] as isize;
                    let ix = (TO * tx + k % TI) as isize - self.pad[1] as isize;
                    *a = (iy >= 0 && iy < h && ix >= 0 && ix < w)
                        .then(|| (iy * w + ix) as usize * c);
                }
                for cb in (0..c).step_by(8) {
                    let n = (c - cb).min(8);
                    let mut d = [[0f32; 8]; P];
                    for (dk, a) in d.iter_mut().zip(&at) {
                        if let Some(o) = *a {
                            *dk = load(x, o + cb, n);
                        }
                    }
                    // Columns: B^T d, then rows: (B^T d) B.
                    let mut r = [[0f32; 8]; P];
                    for j in 0..TI {
                        let col = bt(six(&d, j, TI));
                        for (i, v) in col.into_iter().enumerate() {
                            r[i * TI + j] = v;
                        }
                    }
                    for i in 0..TI {
                        let row = bt(six(&r, i * TI, 1));
                        for (j, o) in row.into_iter().enumerate() {
                            store(v, (tile * P + i * TI + j) * c + cb, n, o, false);
                        }
                    }
                }
            }
        }
    }

    /// `y[4ty+a][4tx+b] = (A^T M A)[a][b]`, cropped to the output size.
    #[inline(always)]
    fn transform_output(&self, mx: &[f32], y: &mut [f32], accumulate: bool, a0: usize, b0: usize) {
        let (_, tw) = self.tiles();
        let (m, oh, ow) = (self.m, self.oh, self.ow);
        for ty in a0..b0 {
            for tx in 0..tw {
                let tile = (ty - a0) * tw + tx;
                for mb in (0..m).step_by(8) {
                    let n = (m - mb).min(8);
                    let mut g = [[0f32; 8]; P];
                    for (k, gk) in g.iter_mut().enumerate() {
                        *gk = load(mx, (tile * P + k) * m + mb, n);
                    }
                    // Columns: A^T g (4 rows of 6), then rows.
                    let mut r = [[0f32; 8]; TO * TI];
                    for j in 0..TI {
                        let col = a_t(six(&g, j, TI));
                        for (a, v) in col.into_iter().enumerate() {
                            r[a * TI + j] = v;
                        }
                    }
                    for a in 0..TO {
                        let oy = TO * ty + a;
                        if oy >= oh {
                            break;
                        }
                        let row = a_t(six(&r, a * TI, 1));
                        for (b, o) in row.into_iter().enumerate() {
                            let ox = TO * tx + b;
                            if ox >= ow {
                                break;
                            }
                            store(y, ((oy - TO * a0) * ow + ox) * m + mb, n, o, accumulate);
                        }
                    }
                }
            }
        }
    }
}

/// Six vectors `a[first + k * step]`: a row or column of a 6x6 tile.
#[inline(always)]
fn six(a: &[V8], first: usize, step: usize) -> [V8; 6] {
    [
        a[first],
        a[first + step],
        a[first + 2 * step],
        a[first + 3 * step],
        a[first + 4 * step],
        a[first + 5 * step],
    ]
}

#[inline(always)]
fn scale(a: V8, k: f32) -> V8 {
    let mut r = [0f32; 8];
    for i in 0..8 {
        r[i] = a[i] * k;
    }
    r
}

/// `B^T d` for one column of six.
#[inline(always)]
fn bt(d: [V8; 6]) -> [V8; 6] {
    let [d0, d1, d2, d3, d4, d5] = d;
    // Shared terms: 4 d1 and 4 d2 etc.
    let t0 = sub(d4, scale(d2, 4.0)); // d4 - 4 d2
    let t1 = sub(d3, scale(d1, 4.0)); // d3 - 4 d1
    let t2 = sub(d4, d2); // d4 - d2
    let t3 = scale(sub(d3, d1), 2.0); // 2 (d3 - d1)
    [
        add(sub(scale(d0, 4.0), scale(d2, 5.0)), d4),
        add(t0, t1),
        sub(t0, t1),
        add(t2, t3),
        sub(t2, t3),
        add(sub(scale(d1, 4.0), scale(d3, 5.0)), d5),
    ]
}

/// `A^T m` for one column of six: four outputs.
#[inline(always)]
fn a_t(m: [V8; 6]) -> [V8; 4] {
    let [m0, m1, m2, m3, m4, m5] = m;
    let (s12, d12) = (add(m1, m2), sub(m1, m2));
    let (s34, d34) = (add(m3, m4), sub(m3, m4));
    [
        add(add(m0, s12), s34),
        add(d12, scale(d34, 2.0)),
        add(s12, scale(s34, 4.0)),
        add(add(d12, scale(d34, 8.0)), m5),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use zq_kernels::team::with_team;

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

    /// Deterministic values in [-1, 1) (a linear congruential generator; any spread will do).
    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut st = seed.wrapping_add(1);
        (0..n)
            .map(|_| {
                st = st
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((st >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
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
            (9, 17, 21, 13, 1, 1),
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
            let xh = hwc(&x, c, h * w);
            with_team(1, 0, |t| f.run(&xh, &mut y, false, &mut scratch, t));
            // Bands of tile rows run in parallel give the same values, to the bit.
            for threads in [2, 3, 8] {
                let mut yt = vec![-3f32; m * oh * ow];
                with_team(threads, 0, |t| f.run(&xh, &mut yt, false, &mut scratch, t));
                assert_eq!(yt, y, "c{c} m{m} {h}x{w}: {threads} bands");
            }
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
            let gh = hwc(&g, m, oh * ow);
            with_team(2, 0, |t| b.run(&gh, &mut gx, true, &mut scratch, t));
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
