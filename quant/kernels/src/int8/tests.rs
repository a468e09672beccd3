//! Every available variant against the scalar reference (bit for bit), and the scalar reference
//! against a naive i64 statement of the arithmetic, over random ragged shapes and extreme values.

use super::table::select;
use super::*;
use proptest::prelude::*;
use proptest::test_runner::Config;

fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Activations: mode 0 uniform, 1 only 0 / 255, 2 a mix.
    fn acts(&mut self, len: usize, mode: u8) -> Vec<u8> {
        (0..len)
            .map(|_| match (mode, self.below(3)) {
                (0, _) | (2, 0) => self.next() as u8,
                _ => {
                    if self.next() & 1 == 0 {
                        0
                    } else {
                        255
                    }
                }
            })
            .collect()
    }
    /// Logical weights in the format's range, with the same modes (extremes -128/127, -8/7).
    fn weights(&mut self, len: usize, format: WeightFormat, mode: u8) -> Vec<i8> {
        let (lo, hi) = match format {
            WeightFormat::I8 => (-128i16, 127i16),
            WeightFormat::I4 => (-8, 7),
        };
        (0..len)
            .map(|_| {
                let v = match (mode, self.below(3)) {
                    (0, _) | (2, 0) => lo + self.below((hi - lo + 1) as u64) as i16,
                    _ => {
                        if self.next() & 1 == 0 {
                            lo
                        } else {
                            hi
                        }
                    }
                };
                v as i8
            })
            .collect()
    }
    fn bias(&mut self, n: usize) -> Vec<i32> {
        (0..n)
            .map(|_| (self.below(1 << 21) as i32) - (1 << 20))
            .collect()
    }
    /// Output scales: one, or one per column; sometimes large enough to saturate.
    fn scales(&mut self, n: usize) -> Vec<f32> {
        let len = if self.next() & 1 == 0 { 1 } else { n };
        let big = self.below(4) == 0;
        (0..len)
            .map(|_| {
                let s = (1 + self.below(10_000)) as f32 * 2e-6;
                if big {
                    s * 1e4
                } else {
                    s
                }
            })
            .collect()
    }
}

/// Logical weights to ONNX INT4 bytes (element 2i low nibble, 2i + 1 high nibble).
fn to_onnx_i4(w: &[i8]) -> Vec<u8> {
    let mut out = vec![0u8; w.len().div_ceil(2)];
    for (e, &v) in w.iter().enumerate() {
        out[e / 2] |= ((v as u8) & 0x0F) << (4 * (e & 1));
    }
    out
}

fn pack(w: &[i8], n: usize, k: usize, format: WeightFormat) -> PackedWeights {
    match format {
        WeightFormat::I8 => PackedWeights::pack_i8(w, n, k).unwrap(),
        WeightFormat::I4 => PackedWeights::pack_i4(&to_onnx_i4(w), n, k).unwrap(),
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    U8 {
        zp: u8,
        lo: u8,
        hi: u8,
    },
    /// U8, then added to the residual `residual_at(i)` (element `i` of a buffer with the
    /// output's layout) with the sum's parameters `(ra, za, rb, zb, zy, lo, hi)`.
    U8Add {
        zp: u8,
        lo: u8,
        hi: u8,
        add: (f32, u8, f32, u8, u8, u8, u8),
    },
    F32,
    I32,
}

/// The residual operand of `Kind::U8Add`, element `i`.
fn residual_at(i: usize) -> u8 {
    (i.wrapping_mul(151) ^ (i >> 3)) as u8
}

fn kind_strategy() -> impl Strategy<Value = Kind> {
    prop_oneof![
        (any::<u8>(), any::<u8>(), any::<u8>()).prop_map(|(zp, a, b)| Kind::U8 {
            zp,
            lo: a.min(b),
            hi: a.max(b)
        }),
        any::<u8>().prop_map(|zp| Kind::U8 {
            zp: zp % 16,
            lo: 0,
            hi: 15
        }),
        (any::<u8>(), any::<u8>(), any::<u8>()).prop_flat_map(|(zp, a, b)| {
            (
                prop_oneof![0.001f32..2.0, -2.0f32..-0.001],
                any::<u8>(),
                prop_oneof![0.001f32..2.0, -2.0f32..-0.001],
                any::<u8>(),
                any::<u8>(),
                any::<u8>(),
                any::<u8>(),
            )
                .prop_map(move |(ra, za, rb, zb, zy, c, d)| Kind::U8Add {
                    zp,
                    lo: a.min(b),
                    hi: a.max(b),
                    add: (ra, za, rb, zb, zy, c.min(d), c.max(d)),
                })
        }),
        Just(Kind::F32),
        Just(Kind::I32),
    ]
}

const CANARY: u32 = 0xA5;

/// Run `f` on a fresh `rows x n` output with row stride `ldc` (filled with a canary, 3 spare
/// elements at the end) and return every element's bits, written or not.
fn run_out(
    kind: Kind,
    rows: usize,
    n: usize,
    ldc: usize,
    scale: &[f32],
    f: impl FnOnce(Output<'_>) -> Result<(), KernelError>,
) -> Vec<u32> {
    let len = if rows == 0 { 0 } else { (rows - 1) * ldc + n } + 3;
    match kind {
        Kind::U8 { zp, lo, hi } => {
            let mut d = vec![CANARY as u8; len];
            f(Output::U8 {
                data: &mut d,
                stride: ldc,
                scale,
                zero_point: zp,
                min: lo,
                max: hi,
            })
            .unwrap();
            d.into_iter().map(u32::from).collect()
        }
        Kind::U8Add { zp, lo, hi, add } => {
            let mut d = vec![CANARY as u8; len];
            let r: Vec<u8> = (0..len).map(residual_at).collect();
            let (ra, za, rb, zb, zy, min, max) = add;
            f(Output::U8Add {
                data: &mut d,
                stride: ldc,
                scale,
                zero_point: zp,
                min: lo,
                max: hi,
                residual: Residual {
                    data: &r,
                    stride: ldc,
                    ra,
                    za,
                    rb,
                    zb,
                    zy,
                    min,
                    max,
                },
            })
            .unwrap();
            d.into_iter().map(u32::from).collect()
        }
        Kind::F32 => {
            let mut d = vec![f32::from_bits(CANARY); len];
            f(Output::f32(&mut d, ldc, scale)).unwrap();
            d.into_iter().map(f32::to_bits).collect()
        }
        Kind::I32 => {
            let mut d = vec![CANARY as i32; len];
            f(Output::i32(&mut d, ldc)).unwrap();
            d.into_iter().map(|v| v as u32).collect()
        }
    }
}

/// What `run_out` should return for exact accumulators `acc` (`rows x n`), written independently
/// of the kernels (the U8 case rounds in f32 and clamps in integers).
fn expected(kind: Kind, acc: &[i64], n: usize, ldc: usize, scale: &[f32]) -> Vec<u32> {
    let rows = acc.len() / n.max(1);
    let len = if rows == 0 { 0 } else { (rows - 1) * ldc + n } + 3;
    let mut out = vec![CANARY; len];
    for i in 0..rows {
        for j in 0..n {
            let a = acc[i * n + j];
            assert!(a >= i64::from(i32::MIN) && a <= i64::from(i32::MAX));
            let s = scale[if scale.len() == 1 { 0 } else { j }];
            out[i * ldc + j] = match kind {
                Kind::I32 => a as i32 as u32,
                Kind::F32 => (a as i32 as f32 * s).to_bits(),
                Kind::U8 { zp, lo, hi } => {
                    let y = (a as i32 as f32 * s).round_ties_even() as i64 + i64::from(zp);
                    y.clamp(i64::from(lo), i64::from(hi)) as u32
                }
                Kind::U8Add { zp, lo, hi, add } => {
                    let y = (a as i32 as f32 * s).round_ties_even() as i64 + i64::from(zp);
                    let q = y.clamp(i64::from(lo), i64::from(hi)) as f32;
                    let (ra, za, rb, zb, zy, min, max) = add;
                    let b = f32::from(residual_at(i * ldc + j));
                    let v = ra * (q - f32::from(za)) + rb * (b - f32::from(zb));
                    let y = v.round_ties_even() as i64 + i64::from(zy);
                    y.clamp(i64::from(min), i64::from(max)) as u32
                }
            };
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn naive_gemm(
    a: &[u8],
    m: usize,
    lda: usize,
    k: usize,
    za: u8,
    w: &[i8],
    n: usize,
    bias: &[i32],
) -> Vec<i64> {
    let mut out = vec![0i64; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = i64::from(bias[j]);
            for p in 0..k {
                s += (i64::from(a[i * lda + p]) - i64::from(za)) * i64::from(w[j * k + p]);
            }
            out[i * n + j] = s;
        }
    }
    out
}

fn scalar() -> &'static Kernels {
    Kernels::get(Variant::Scalar).unwrap()
}

fn format_strategy() -> impl Strategy<Value = WeightFormat> {
    prop_oneof![Just(WeightFormat::I8), Just(WeightFormat::I4)]
}

/// Dimensions that favour the edges: 1, just around multiples of 4 / 8 / 16, and random.
fn dim(max: usize) -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(1usize),
        (1usize..=max),
        (1usize..=max / 16 + 1).prop_flat_map(move |q| {
            (0usize..3).prop_map(move |d| (q * 16 + d).saturating_sub(1).clamp(1, max))
        }),
    ]
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn gemm_variants_match_scalar_and_scalar_matches_naive(
        m in dim(64), n in dim(100), k in dim(600), extra in 0usize..3, ldc_extra in 0usize..3,
        za in any::<u8>(), format in format_strategy(), mode in 0u8..3, kind in kind_strategy(),
        with_bias in any::<bool>(), seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let lda = k + extra;
        let a = rng.acts((m - 1) * lda + k, mode);
        let w = rng.weights(n * k, format, mode);
        let packed = pack(&w, n, k, format);
        let bias = if with_bias { rng.bias(n) } else { vec![0; n] };
        let scale = rng.scales(n);
        let ldc = n + ldc_extra;
        let want = expected(kind, &naive_gemm(&a, m, lda, k, za, &w, n, &bias), n, ldc, &scale);
        let bias_arg = with_bias.then_some(&bias[..]);
        let reference = run_out(kind, m, n, ldc, &scale, |o| {
            scalar().gemm(&a, m, lda, za, &packed, bias_arg, o)
        });
        prop_assert_eq!(&reference, &want, "scalar vs naive");
        for kern in Kernels::available() {
            let got = run_out(kind, m, n, ldc, &scale, |o| {
                kern.gemm(&a, m, lda, za, &packed, bias_arg, o)
            });
            prop_assert_eq!(&got, &reference, "{} vs scalar", kern.name());
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn naive_conv(
    input: &[u8],
    g: &ConvGeometry,
    za: u8,
    w: &[i8],
    cout: usize,
    bias: &[i32],
    pixels: std::ops::Range<usize>,
) -> Vec<i64> {
    let (cin, kh, kw) = (g.channels, g.kernel_h, g.kernel_w);
    let ow = g.out_w();
    let mut out = Vec::new();
    for p in pixels {
        let (oy, ox) = ((p / ow) as i64, (p % ow) as i64);
        for o in 0..cout {
            let mut s = i64::from(bias[o]);
            for ci in 0..cin {
                for ky in 0..kh {
                    for kx in 0..kw {
                        let iy =
                            oy * g.stride_h as i64 + (ky * g.dilation_h) as i64 - g.pad_top as i64;
                        let ix =
                            ox * g.stride_w as i64 + (kx * g.dilation_w) as i64 - g.pad_left as i64;
                        let inside = iy >= 0 && ix >= 0 && iy < g.in_h as i64 && ix < g.in_w as i64;
                        let x = if inside {
                            input[(iy as usize * g.in_w + ix as usize) * g.pixel_stride + ci]
                        } else {
                            za
                        };
                        let wv = w[((o * cin + ci) * kh + ky) * kw + kx];
                        s += (i64::from(x) - i64::from(za)) * i64::from(wv);
                    }
                }
            }
            out.push(s);
        }
    }
    out
}

fn naive_depthwise(
    input: &[u8],
    g: &ConvGeometry,
    za: u8,
    w: &[i8],
    bias: &[i32],
    pixels: std::ops::Range<usize>,
) -> Vec<i64> {
    let (c, kh, kw) = (g.channels, g.kernel_h, g.kernel_w);
    let ow = g.out_w();
    let mut out = Vec::new();
    for p in pixels {
        let (oy, ox) = ((p / ow) as i64, (p % ow) as i64);
        for ch in 0..c {
            let mut s = i64::from(bias[ch]);
            for ky in 0..kh {
                for kx in 0..kw {
                    let iy = oy * g.stride_h as i64 + (ky * g.dilation_h) as i64 - g.pad_top as i64;
                    let ix =
                        ox * g.stride_w as i64 + (kx * g.dilation_w) as i64 - g.pad_left as i64;
                    let inside = iy >= 0 && ix >= 0 && iy < g.in_h as i64 && ix < g.in_w as i64;
                    let x = if inside {
                        input[(iy as usize * g.in_w + ix as usize) * g.pixel_stride + ch]
                    } else {
                        za
                    };
                    s += (i64::from(x) - i64::from(za)) * i64::from(w[(ch * kh + ky) * kw + kx]);
                }
            }
            out.push(s);
        }
    }
    out
}

/// A pixel sub-range from two random fractions (sometimes the whole image).
fn sub_range(total: usize, a: u16, b: u16, whole: bool) -> std::ops::Range<usize> {
    if whole {
        return 0..total;
    }
    let x = a as usize * total / 65536;
    let y = b as usize * total / 65536;
    x.min(y)..x.max(y) + 1
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn conv_variants_match_scalar_and_scalar_matches_naive(
        h in 1usize..=9, wd in 1usize..=9, n in dim(40),
        // Multiples of 4 / 8 take the implicit-GEMM path, the others im2col.
        c in prop_oneof![dim(12), (1usize..=6).prop_map(|q| 4 * q), (1usize..=3).prop_map(|q| 8 * q)],
        kh in 1usize..=4, kw in 1usize..=4, sh in 1usize..=3, sw in 1usize..=3,
        dh in 1usize..=2, dw in 1usize..=2, pads in [0usize..=2, 0usize..=2, 0usize..=2, 0usize..=2],
        stride_extra in prop_oneof![Just(0usize), 0usize..3],
        za in any::<u8>(), format in format_strategy(), mode in 0u8..3, kind in kind_strategy(),
        range in (any::<u16>(), any::<u16>(), any::<bool>()), seed in any::<u64>(),
    ) {
        let g = ConvGeometry::new(h, wd, c, kh, kw)
            .with_stride(sh, sw)
            .with_dilation(dh, dw)
            .with_padding(pads[0], pads[1], pads[2], pads[3])
            .with_pixel_stride(c + stride_extra);
        prop_assume!(g.out_pixels() > 0);
        let mut rng = Rng::new(seed);
        let input = rng.acts(h * wd * g.pixel_stride, mode);
        let w = rng.weights(n * c * kh * kw, format, mode);
        let packed = match format {
            WeightFormat::I8 => PackedWeights::pack_conv_i8(&w, n, c, kh, kw).unwrap(),
            WeightFormat::I4 => PackedWeights::pack_conv_i4(&to_onnx_i4(&w), n, c, kh, kw).unwrap(),
        };
        let bias = rng.bias(n);
        let scale = rng.scales(n);
        let pixels = sub_range(g.out_pixels(), range.0, range.1, range.2);
        let rows = pixels.len();
        let ldc = n + 1;
        let want = expected(kind, &naive_conv(&input, &g, za, &w, n, &bias, pixels.clone()), n, ldc, &scale);
        let reference = run_out(kind, rows, n, ldc, &scale, |o| {
            scalar().conv(&input, &g, za, &packed, Some(&bias), o, pixels.clone())
        });
        prop_assert_eq!(&reference, &want, "scalar vs naive");
        for kern in Kernels::available() {
            let got = run_out(kind, rows, n, ldc, &scale, |o| {
                kern.conv(&input, &g, za, &packed, Some(&bias), o, pixels.clone())
            });
            prop_assert_eq!(&got, &reference, "{} vs scalar", kern.name());
        }
    }

    #[test]
    fn depthwise_variants_match_scalar_and_scalar_matches_naive(
        h in 1usize..=12, wd in 1usize..=12, c in dim(40),
        ks in prop_oneof![Just((3usize, 3usize)), Just((5, 5)), (1usize..=5, 1usize..=5)],
        s in 1usize..=2, dil in prop_oneof![3 => Just(1usize), 1 => Just(2usize)],
        pads in [0usize..=2, 0usize..=2, 0usize..=2, 0usize..=2],
        stride_extra in prop_oneof![Just(0usize), 0usize..3],
        za in any::<u8>(), format in format_strategy(), mode in 0u8..3, kind in kind_strategy(),
        range in (any::<u16>(), any::<u16>(), any::<bool>()), seed in any::<u64>(),
    ) {
        let (kh, kw) = ks;
        let g = ConvGeometry::new(h, wd, c, kh, kw)
            .with_stride(s, s)
            .with_dilation(dil, dil)
            .with_padding(pads[0], pads[1], pads[2], pads[3])
            .with_pixel_stride(c + stride_extra);
        prop_assume!(g.out_pixels() > 0);
        let mut rng = Rng::new(seed);
        let input = rng.acts(h * wd * g.pixel_stride, mode);
        let w = rng.weights(c * kh * kw, format, mode);
        let packed = match format {
            WeightFormat::I8 => DepthwiseWeights::pack_i8(&w, c, kh, kw).unwrap(),
            WeightFormat::I4 => DepthwiseWeights::pack_i4(&to_onnx_i4(&w), c, kh, kw).unwrap(),
        };
        let bias = rng.bias(c);
        let scale = rng.scales(c);
        let pixels = sub_range(g.out_pixels(), range.0, range.1, range.2);
        let rows = pixels.len();
        let ldc = c + 2;
        let want = expected(kind, &naive_depthwise(&input, &g, za, &w, &bias, pixels.clone()), c, ldc, &scale);
        let reference = run_out(kind, rows, c, ldc, &scale, |o| {
            scalar().depthwise(&input, &g, za, &packed, Some(&bias), o, pixels.clone())
        });
        prop_assert_eq!(&reference, &want, "scalar vs naive");
        for kern in Kernels::available() {
            let got = run_out(kind, rows, c, ldc, &scale, |o| {
                kern.depthwise(&input, &g, za, &packed, Some(&bias), o, pixels.clone())
            });
            prop_assert_eq!(&got, &reference, "{} vs scalar", kern.name());
        }
    }
}

#[test]
fn int4_nibble_order_is_onnx() {
    // [1, -2, 7] -> byte 0 = 0xE1 (1 low, -2 high), byte 1 = 0x07 (7 low, padding high).
    let w = PackedWeights::pack_i4(&[0xE1, 0x07], 1, 3).unwrap();
    assert_eq!((w.get(0, 0), w.get(0, 1), w.get(0, 2)), (1, -2, 7));
    assert_eq!(w.col_sums(), &[6]);
    assert_eq!(onnx_i4_get(&[0x8F], 0), -1);
    assert_eq!(onnx_i4_get(&[0x8F], 1), -8);
    // The odd total needs its padding nibble.
    assert!(matches!(
        PackedWeights::pack_i4(&[0xE1], 1, 3),
        Err(KernelError::Length {
            need: 2,
            got: 1,
            ..
        })
    ));
    let d = DepthwiseWeights::pack_i4(&to_onnx_i4(&[-8, 7, 3, -1, 0, 5]), 3, 1, 2).unwrap();
    assert_eq!(
        (0..3)
            .flat_map(|c| (0..2).map(move |t| (c, t)))
            .map(|(c, t)| d.get(c, t))
            .collect::<Vec<_>>(),
        vec![-8, 7, 3, -1, 0, 5]
    );
    assert_eq!(d.weight_sums(), &[-1, 2, 5]);
}

#[test]
fn packing_round_trips_and_reorders_conv_weights() {
    let mut rng = Rng::new(7);
    for format in [WeightFormat::I8, WeightFormat::I4] {
        let (n, k) = (37, 23);
        let w = rng.weights(n * k, format, 0);
        let p = pack(&w, n, k, format);
        for j in 0..n {
            for q in 0..k {
                assert_eq!(p.get(j, q), w[j * k + q]);
            }
        }
        let sums: Vec<i32> = (0..n)
            .map(|j| w[j * k..(j + 1) * k].iter().map(|&v| i32::from(v)).sum())
            .collect();
        assert_eq!(p.col_sums(), &sums[..]);
        assert_eq!(p.k_padded() % 4, 0);
        // int4 stays at half a byte per (padded) weight.
        let per = if format == WeightFormat::I4 { 8 } else { 16 };
        assert_eq!(p.packed_bytes(), n.div_ceil(16) * p.k_padded() * per);
    }
    let (cout, cin, kh, kw) = (3, 5, 2, 3);
    let w = rng.weights(cout * cin * kh * kw, WeightFormat::I8, 0);
    let p = PackedWeights::pack_conv_i8(&w, cout, cin, kh, kw).unwrap();
    for o in 0..cout {
        for ci in 0..cin {
            for ky in 0..kh {
                for kx in 0..kw {
                    assert_eq!(
                        p.get(o, (ky * kw + kx) * cin + ci),
                        w[((o * cin + ci) * kh + ky) * kw + kx]
                    );
                }
            }
        }
    }
}

#[test]
fn wrapping_accumulation_is_identical_in_every_variant() {
    // 70_000 products of 255 * -128 overflow i32: all variants must still agree bit for bit.
    let (m, n, k) = (3, 17, 70_001);
    let a = vec![255u8; m * k];
    let w = vec![-128i8; n * k];
    for format in [WeightFormat::I8, WeightFormat::I4] {
        let w: Vec<i8> = if format == WeightFormat::I4 {
            vec![-8; n * k]
        } else {
            w.clone()
        };
        let p = pack(&w, n, k, format);
        let reference = run_out(Kind::I32, m, n, n, &[1.0], |o| {
            scalar().gemm(&a, m, k, 0, &p, None, o)
        });
        let per = if format == WeightFormat::I4 {
            -8i64
        } else {
            -128
        };
        let exact = 255 * per * k as i64;
        assert_eq!(reference[0] as i32, exact as i32, "wraps like i32");
        for kern in Kernels::available() {
            let got = run_out(Kind::I32, m, n, n, &[1.0], |o| {
                kern.gemm(&a, m, k, 0, &p, None, o)
            });
            assert_eq!(got, reference, "{}", kern.name());
        }
    }
}

#[test]
fn gemm_splits_by_rows_and_writes_a_channel_slice() {
    let mut rng = Rng::new(11);
    let (m, n, k) = (29, 21, 45);
    let a = rng.acts(m * k, 0);
    let w = pack(
        &rng.weights(n * k, WeightFormat::I8, 0),
        n,
        k,
        WeightFormat::I8,
    );
    let scale = rng.scales(n);
    for kern in Kernels::available() {
        // Whole call into channels 5..26 of a 32-channel NHWC buffer.
        let mut whole = vec![7u8; m * 32];
        kern.gemm(
            &a,
            m,
            k,
            9,
            &w,
            None,
            Output::u8(&mut whole[5..], 32, &scale, 3),
        )
        .unwrap();
        for (i, px) in whole.chunks(32).enumerate() {
            assert!(px[..5].iter().chain(&px[26..]).all(|&b| b == 7), "row {i}");
        }
        // The same in two row ranges, as two threads would.
        let mut split = vec![7u8; m * 32];
        let (top, bottom) = split.split_at_mut(13 * 32);
        kern.gemm(
            &a[..13 * k],
            13,
            k,
            9,
            &w,
            None,
            Output::u8(&mut top[5..], 32, &scale, 3),
        )
        .unwrap();
        kern.gemm(
            &a[13 * k..],
            m - 13,
            k,
            9,
            &w,
            None,
            Output::u8(&mut bottom[5..], 32, &scale, 3),
        )
        .unwrap();
        assert_eq!(whole, split, "{}", kern.name());
    }
}

#[test]
fn pointwise_convolutions_match_gemm() {
    let mut rng = Rng::new(5);
    let (h, wd, c, n) = (7, 5, 19, 33);
    let input = rng.acts(h * wd * c, 0);
    let wv = rng.weights(n * c, WeightFormat::I8, 0);
    let w = PackedWeights::pack_conv_i8(&wv, n, c, 1, 1).unwrap();
    let g = ConvGeometry::new(h, wd, c, 1, 1);
    for kern in Kernels::available() {
        let mut by_conv = vec![0i32; h * wd * n];
        kern.conv(
            &input,
            &g,
            4,
            &w,
            None,
            Output::i32(&mut by_conv, n),
            0..h * wd,
        )
        .unwrap();
        let mut by_gemm = vec![0i32; h * wd * n];
        kern.gemm(&input, h * wd, c, 4, &w, None, Output::i32(&mut by_gemm, n))
            .unwrap();
        assert_eq!(by_conv, by_gemm, "{}", kern.name());
        // Stride 2 takes the im2col path; it must pick every other pixel of every other row.
        let g2 = g.with_stride(2, 2);
        let mut strided = vec![0i32; g2.out_pixels() * n];
        kern.conv(
            &input,
            &g2,
            4,
            &w,
            None,
            Output::i32(&mut strided, n),
            0..g2.out_pixels(),
        )
        .unwrap();
        for p in 0..g2.out_pixels() {
            let (oy, ox) = (p / g2.out_w(), p % g2.out_w());
            let q = 2 * oy * wd + 2 * ox;
            assert_eq!(strided[p * n..(p + 1) * n], by_gemm[q * n..(q + 1) * n]);
        }
    }
}

#[test]
fn bad_arguments_are_errors() {
    let k = scalar();
    let w = PackedWeights::pack_i8(&[1; 12], 3, 4).unwrap();
    let mut out = vec![0i32; 6];
    // Short activations: 2 rows need 4 + 4 bytes.
    assert!(matches!(
        k.gemm(&[0; 7], 2, 4, 0, &w, None, Output::i32(&mut out, 3)),
        Err(KernelError::Length {
            need: 8,
            got: 7,
            ..
        })
    ));
    // A residual shorter than the output, or with an infinite scale.
    let mut y = vec![0u8; 6];
    for (len, ra) in [(5usize, 1.0f32), (6, f32::INFINITY)] {
        let r = vec![0u8; len];
        let residual = Residual {
            data: &r,
            stride: 3,
            ra,
            za: 0,
            rb: 1.0,
            zb: 0,
            zy: 0,
            min: 0,
            max: 255,
        };
        let o = Output::U8Add {
            data: &mut y,
            stride: 3,
            scale: &[1.0],
            zero_point: 0,
            min: 0,
            max: 255,
            residual,
        };
        assert!(k.gemm(&[0; 8], 2, 4, 0, &w, None, o).is_err(), "{len} {ra}");
    }
    // Output stride below the column count, short output, wrong bias, bad scales and range.
    assert!(k
        .gemm(&[0; 8], 2, 4, 0, &w, None, Output::i32(&mut out, 2))
        .is_err());
    assert!(k
        .gemm(&[0; 8], 2, 4, 0, &w, None, Output::i32(&mut out[..5], 3))
        .is_err());
    assert!(k
        .gemm(
            &[0; 8],
            2,
            4,
            0,
            &w,
            Some(&[1, 2]),
            Output::i32(&mut out, 3)
        )
        .is_err());
    let mut o8 = vec![0u8; 6];
    assert!(k
        .gemm(
            &[0; 8],
            2,
            4,
            0,
            &w,
            None,
            Output::u8(&mut o8, 3, &[1.0, 2.0], 0)
        )
        .is_err());
    assert!(k
        .gemm(
            &[0; 8],
            2,
            4,
            0,
            &w,
            None,
            Output::u8(&mut o8, 3, &[f32::NAN], 0)
        )
        .is_err());
    let reversed = Output::U8 {
        data: &mut o8,
        stride: 3,
        scale: &[1.0],
        zero_point: 0,
        min: 9,
        max: 8,
    };
    assert!(k.gemm(&[0; 8], 2, 4, 0, &w, None, reversed).is_err());
    // Weight lengths, conv geometry, pixel ranges.
    assert!(PackedWeights::pack_i8(&[1; 11], 3, 4).is_err());
    assert!(DepthwiseWeights::pack_i8(&[1; 8], 1, 3, 3).is_err());
    let g = ConvGeometry::new(4, 4, 2, 3, 3);
    let cw = PackedWeights::pack_conv_i8(&[1; 18], 1, 2, 3, 3).unwrap();
    let input = vec![0u8; 32];
    let mut co = vec![0i32; 4];
    assert!(k
        .conv(
            &input[..31],
            &g,
            0,
            &cw,
            None,
            Output::i32(&mut co, 1),
            0..4
        )
        .is_err());
    assert!(k
        .conv(&input, &g, 0, &cw, None, Output::i32(&mut co, 1), 0..5)
        .is_err());
    assert!(k
        .conv(&input, &g, 0, &w, None, Output::i32(&mut co, 1), 0..4)
        .is_err());
    let tiny = ConvGeometry::new(2, 2, 2, 3, 3);
    assert!(k
        .conv(&input, &tiny, 0, &cw, None, Output::i32(&mut co, 1), 0..0)
        .is_err());
    assert!(k
        .conv(
            &input,
            &g.with_stride(0, 1),
            0,
            &cw,
            None,
            Output::i32(&mut co, 1),
            0..1
        )
        .is_err());
    let dw = DepthwiseWeights::pack_i8(&[1; 18], 2, 3, 3).unwrap();
    assert!(k
        .depthwise(
            &input,
            &g.with_padding(1, 1, 1, 1),
            0,
            &dw,
            None,
            Output::i32(&mut co, 2),
            0..2
        )
        .is_ok());
    assert!(k
        .depthwise(
            &input,
            &ConvGeometry::new(4, 4, 2, 5, 5),
            0,
            &dw,
            None,
            Output::i32(&mut co, 2),
            0..0
        )
        .is_err());
}

#[test]
fn variants_are_selected_by_name() {
    assert_eq!("AVX2".parse::<Variant>().unwrap(), Variant::Avx2);
    assert!(matches!(
        "sse9".parse::<Variant>(),
        Err(KernelError::UnknownVariant(_))
    ));
    assert!(matches!(
        select(Some("sse9")),
        Err(KernelError::UnknownVariant(_))
    ));
    assert_eq!(select(Some("scalar")).unwrap().name(), "scalar");
    assert_eq!(select(None).unwrap().variant(), Kernels::best().variant());
    assert_eq!(
        select(Some("auto")).unwrap().variant(),
        Kernels::best().variant()
    );
    for v in Variant::ALL {
        match select(Some(v.name())) {
            Ok(k) => assert!(v.is_supported() && k.variant() == v),
            Err(e) => assert!(!v.is_supported() && e == KernelError::Unsupported(v.name())),
        }
        assert_eq!(Kernels::get(v).is_some(), v.is_supported());
    }
    let names: Vec<_> = Kernels::available().map(Kernels::name).collect();
    assert_eq!(names[0], "scalar");
    assert!(Kernels::from_env().is_ok() || std::env::var("ZQ_KERNELS").is_ok());
}

#[test]
fn large_calls_span_cache_blocks_panels_and_chunks() {
    let mut rng = Rng::new(3);
    // GEMM: more rows than one cache block (256 KiB / k rows).
    let (m, n, k) = (600, 70, 1001);
    let a = rng.acts(m * k, 2);
    for format in [WeightFormat::I8, WeightFormat::I4] {
        let w = rng.weights(n * k, format, 2);
        let p = pack(&w, n, k, format);
        let bias = rng.bias(n);
        let want = expected(
            Kind::I32,
            &naive_gemm(&a, m, k, k, 17, &w, n, &bias),
            n,
            n,
            &[1.0],
        );
        for kern in Kernels::available() {
            let got = run_out(Kind::I32, m, n, n, &[1.0], |o| {
                kern.gemm(&a, m, k, 17, &p, Some(&bias), o)
            });
            assert_eq!(got, want, "gemm {} {:?}", kern.name(), format);
        }
    }
    // Convolutions: im2col over several panels (c = 3), implicit GEMM over several calls (c = 8).
    for (hw, c) in [(48, 3), (23, 8)] {
        let g = ConvGeometry::new(hw, hw, c, 3, 3)
            .with_padding(1, 1, 1, 1)
            .with_stride(1, 1);
        let input = rng.acts(hw * hw * c, 0);
        let n = 9;
        let w = rng.weights(n * c * 9, WeightFormat::I8, 0);
        let p = PackedWeights::pack_conv_i8(&w, n, c, 3, 3).unwrap();
        let bias = rng.bias(n);
        let pixels = 0..g.out_pixels();
        let want = expected(
            Kind::I32,
            &naive_conv(&input, &g, 200, &w, n, &bias, pixels.clone()),
            n,
            n,
            &[1.0],
        );
        for kern in Kernels::available() {
            let got = run_out(Kind::I32, pixels.len(), n, n, &[1.0], |o| {
                kern.conv(&input, &g, 200, &p, Some(&bias), o, pixels.clone())
            });
            assert_eq!(got, want, "conv {}x{}x{} {}", hw, hw, c, kern.name());
        }
    }
}

#[test]
fn empty_reductions_give_the_bias() {
    let w = PackedWeights::pack_i8(&[], 5, 0).unwrap();
    let dw = DepthwiseWeights::pack_i8(&[], 0, 3, 3).unwrap();
    let g = ConvGeometry::new(3, 3, 0, 3, 3).with_padding(1, 1, 1, 1);
    let cw = PackedWeights::pack_conv_i8(&[], 4, 0, 3, 3).unwrap();
    for kern in Kernels::available() {
        let mut out = vec![0i32; 15];
        kern.gemm(
            &[],
            3,
            7,
            9,
            &w,
            Some(&[1, 2, 3, 4, 5]),
            Output::i32(&mut out, 5),
        )
        .unwrap();
        assert_eq!(out, [1, 2, 3, 4, 5].repeat(3), "{}", kern.name());
        let mut co = vec![0i32; 9 * 4];
        kern.conv(
            &[],
            &g,
            9,
            &cw,
            Some(&[4, 3, 2, 1]),
            Output::i32(&mut co, 4),
            0..9,
        )
        .unwrap();
        assert_eq!(co, [4, 3, 2, 1].repeat(9), "{}", kern.name());
        kern.depthwise(&[], &g, 9, &dw, None, Output::i32(&mut [], 0), 0..9)
            .unwrap();
    }
}

#[test]
fn a_plan_serves_every_image_and_checks_each_input() {
    // One plan (indirection computed once) run on two images: each result equals the unplanned
    // call on that image, for the implicit-GEMM conv, the im2col conv and the depthwise kernel.
    let mut rng = Rng::new(7);
    for (c, n) in [(16usize, 16usize), (3, 8)] {
        let g = ConvGeometry::new(9, 7, c, 3, 3)
            .with_padding(1, 1, 1, 1)
            .with_stride(2, 1);
        let pixels = 5..g.out_pixels() - 3;
        let plan = ConvPlan::new(&g, pixels.clone()).unwrap();
        let w = rng.weights(n * c * 9, WeightFormat::I8, 0);
        let packed = PackedWeights::pack_conv_i8(&w, n, c, 3, 3).unwrap();
        let dw = DepthwiseWeights::pack_i8(&w[..c * 9], c, 3, 3).unwrap();
        for kern in Kernels::available() {
            for _ in 0..2 {
                let input = rng.acts(9 * 7 * c, 0);
                let mut a = vec![0i32; pixels.len() * n];
                let mut b = a.clone();
                kern.conv(
                    &input,
                    &g,
                    3,
                    &packed,
                    None,
                    Output::i32(&mut a, n),
                    pixels.clone(),
                )
                .unwrap();
                kern.conv_planned(&input, &plan, 3, &packed, None, Output::i32(&mut b, n))
                    .unwrap();
                assert_eq!(a, b, "{} conv, {c} channels", kern.name());
                let mut a = vec![0i32; pixels.len() * c];
                let mut b = a.clone();
                kern.depthwise(
                    &input,
                    &g,
                    3,
                    &dw,
                    None,
                    Output::i32(&mut a, c),
                    pixels.clone(),
                )
                .unwrap();
                kern.depthwise_planned(&input, &plan, 3, &dw, None, Output::i32(&mut b, c))
                    .unwrap();
                assert_eq!(a, b, "{} depthwise, {c} channels", kern.name());
            }
            // An image shorter than the plan's geometry is refused, not read past its end.
            let short = vec![0u8; 9 * 7 * c - 1];
            let mut y = vec![0i32; pixels.len() * n];
            let e = kern
                .conv_planned(&short, &plan, 3, &packed, None, Output::i32(&mut y, n))
                .unwrap_err();
            assert!(
                matches!(
                    e,
                    KernelError::Length {
                        what: "conv input",
                        ..
                    }
                ),
                "{e}"
            );
        }
    }
    // A pixel range outside the output is refused when the plan is made.
    let g = ConvGeometry::new(4, 4, 4, 3, 3);
    assert!(ConvPlan::new(&g, 0..5).is_err());
}

#[test]
fn a_1x1_depthwise_reads_each_pixel_in_place() {
    // A 1x1, stride-1, unpadded depthwise conv (a per-channel scale) stores no indirection
    // offsets in its plan; each variant must still read pixel p for output p, also with a pixel
    // stride wider than the channels and a range that does not start at 0.
    let mut rng = Rng::new(11);
    for (h, wd, c, extra) in [
        (1usize, 1usize, 1usize, 0usize),
        (3, 5, 17, 2),
        (4, 4, 64, 0),
    ] {
        let g = ConvGeometry::new(h, wd, c, 1, 1).with_pixel_stride(c + extra);
        let input = rng.acts(h * wd * g.pixel_stride, 0);
        let w = rng.weights(c, WeightFormat::I8, 0);
        let dw = DepthwiseWeights::pack_i8(&w, c, 1, 1).unwrap();
        let bias = rng.bias(c);
        for pixels in [0..g.out_pixels(), g.out_pixels() / 2..g.out_pixels()] {
            let want: Vec<i32> = naive_depthwise(&input, &g, 9, &w, &bias, pixels.clone())
                .into_iter()
                .map(|v| v as i32)
                .collect();
            for kern in Kernels::available() {
                let mut y = vec![0i32; pixels.len() * c];
                kern.depthwise(
                    &input,
                    &g,
                    9,
                    &dw,
                    Some(&bias),
                    Output::i32(&mut y, c),
                    pixels.clone(),
                )
                .unwrap();
                assert_eq!(y, want, "{} {h}x{wd}x{c}", kern.name());
            }
        }
    }
}
