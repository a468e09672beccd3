//! Throughput benchmarks of the integer kernels, for `cargo bench --bench int8` and a future
//! `zq bench`: every available variant on a fixed set of layer shapes, single-threaded, best of
//! several runs, u8 requantized output. GOPS counts a multiply-add as 2 operations:
//! `2 * M * N * K / seconds` for GEMM and convolution, `2 * pixels * C * taps / seconds` for
//! depthwise.

use std::time::{Duration, Instant};

use super::{
    ConvGeometry, DepthwiseWeights, Kernels, Output, PackedWeights, Variant, WeightFormat,
};

/// One measurement.
#[derive(Debug, Clone)]
pub struct BenchRow {
    /// `gemm`, `conv` or `depthwise`.
    pub op: &'static str,
    /// A human-readable shape, e.g. `56x56x64->64 3x3`.
    pub shape: String,
    pub weights: WeightFormat,
    pub variant: Variant,
    /// GEMM view of the work: rows (output pixels), columns (output channels), reduction.
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// Operations per run (2 per multiply-add).
    pub ops: f64,
    /// Best time of one run.
    pub seconds: f64,
    pub gops: f64,
}

/// The measured `vpdpbusd` peak of one core.
#[derive(Debug, Clone, Copy)]
pub struct Peak {
    /// zmm `vpdpbusd` on 16 independent accumulators: 64 multiply-adds (128 ops) per instruction.
    pub gops: f64,
    /// Core clock while running, from a chain of dependent adds (1 per cycle).
    pub ghz: f64,
    /// `gops / ghz`.
    pub ops_per_cycle: f64,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Best time of `f` over a few runs (more for fast kernels, at least 2 after a warm-up).
fn best_time(mut f: impl FnMut()) -> f64 {
    f();
    let mut best = Duration::MAX;
    let started = Instant::now();
    for i in 0..15 {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed());
        if i >= 1 && started.elapsed() > Duration::from_millis(400) {
            break;
        }
    }
    best.as_secs_f64()
}

fn gemm_weights(rng: &mut Rng, n: usize, k: usize, format: WeightFormat) -> PackedWeights {
    match format {
        WeightFormat::I8 => {
            let w: Vec<i8> = rng.bytes(n * k).into_iter().map(|b| b as i8).collect();
            PackedWeights::pack_i8(&w, n, k)
        }
        WeightFormat::I4 => PackedWeights::pack_i4(&rng.bytes((n * k).div_ceil(2)), n, k),
    }
    .expect("benchmark weights pack")
}

/// Run every benchmark on every variant this CPU supports.
pub fn run() -> Vec<BenchRow> {
    run_variants(&Kernels::available().collect::<Vec<_>>())
}

/// Run every benchmark on the given variants.
pub fn run_variants(variants: &[&Kernels]) -> Vec<BenchRow> {
    run_matching(variants, "")
}

/// Run the benchmarks whose `op shape` label contains `filter` (all for `""`), e.g. `"conv"`,
/// `"depthwise"` or `"3136x256"`, on the given variants.
pub fn run_matching(variants: &[&Kernels], filter: &str) -> Vec<BenchRow> {
    let mut rows = Vec::new();
    let wanted = |op: &str, shape: &str| format!("{op} {shape}").contains(filter);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let scale = [0.0007f32];
    let gemms: [(usize, usize, usize, &[WeightFormat]); 5] = [
        (3136, 64, 576, &[WeightFormat::I8, WeightFormat::I4]),
        (3136, 256, 576, &[WeightFormat::I8, WeightFormat::I4]),
        (1024, 16, 144, &[WeightFormat::I8]),
        (256, 32, 288, &[WeightFormat::I8]),
        (64, 64, 576, &[WeightFormat::I8]),
    ];
    for (m, n, k, formats) in gemms {
        for &format in formats {
            if !wanted("gemm", &format!("{m}x{n}x{k}")) {
                continue;
            }
            let w = gemm_weights(&mut rng, n, k, format);
            let a = rng.bytes(m * k);
            let bias: Vec<i32> = (0..n as i32).map(|j| j * 37 - 1000).collect();
            let mut out = vec![0u8; m * n];
            for kern in variants {
                let secs = best_time(|| {
                    kern.gemm(
                        &a,
                        m,
                        k,
                        3,
                        &w,
                        Some(&bias),
                        Output::u8(&mut out, n, &scale, 5),
                    )
                    .expect("benchmark gemm");
                });
                let ops = 2.0 * (m * n * k) as f64;
                rows.push(BenchRow {
                    op: "gemm",
                    shape: format!("{m}x{n}x{k}"),
                    weights: format,
                    variant: kern.variant(),
                    m,
                    n,
                    k,
                    ops,
                    seconds: secs,
                    gops: ops / secs / 1e9,
                });
            }
        }
    }
    // 3x3 convolutions, pad 1: the 56x56x64 layer of ResNet-18/50 and ResNet-20's three stages.
    let convs: [(usize, usize, WeightFormat); 5] = [
        (56, 64, WeightFormat::I8),
        (56, 64, WeightFormat::I4),
        (32, 16, WeightFormat::I8),
        (16, 32, WeightFormat::I8),
        (8, 64, WeightFormat::I8),
    ];
    for (hw, c, format) in convs {
        if !wanted("conv", &format!("{hw}x{hw}x{c}->{c} 3x3")) {
            continue;
        }
        let geom = ConvGeometry::new(hw, hw, c, 3, 3).with_padding(1, 1, 1, 1);
        let (m, n, k) = (geom.out_pixels(), c, 9 * c);
        let w = gemm_weights(&mut rng, n, k, format);
        let input = rng.bytes(hw * hw * c);
        let mut out = vec![0u8; m * n];
        for kern in variants {
            let secs = best_time(|| {
                kern.conv(
                    &input,
                    &geom,
                    3,
                    &w,
                    None,
                    Output::u8(&mut out, n, &scale, 5),
                    0..m,
                )
                .expect("benchmark conv");
            });
            let ops = 2.0 * (m * n * k) as f64;
            rows.push(BenchRow {
                op: "conv",
                shape: format!("{hw}x{hw}x{c}->{c} 3x3"),
                weights: format,
                variant: kern.variant(),
                m,
                n,
                k,
                ops,
                seconds: secs,
                gops: ops / secs / 1e9,
            });
        }
    }
    for format in [WeightFormat::I8, WeightFormat::I4] {
        let (hw, c) = (120, 32);
        if !wanted("depthwise", &format!("{hw}x{hw}x{c} 3x3")) {
            continue;
        }
        let geom = ConvGeometry::new(hw, hw, c, 3, 3).with_padding(1, 1, 1, 1);
        let w = match format {
            WeightFormat::I8 => {
                let v: Vec<i8> = rng.bytes(c * 9).into_iter().map(|b| b as i8).collect();
                DepthwiseWeights::pack_i8(&v, c, 3, 3)
            }
            WeightFormat::I4 => DepthwiseWeights::pack_i4(&rng.bytes((c * 9).div_ceil(2)), c, 3, 3),
        }
        .expect("benchmark depthwise weights");
        let input = rng.bytes(hw * hw * c);
        let m = geom.out_pixels();
        let mut out = vec![0u8; m * c];
        for kern in variants {
            let secs = best_time(|| {
                kern.depthwise(
                    &input,
                    &geom,
                    3,
                    &w,
                    None,
                    Output::u8(&mut out, c, &scale, 5),
                    0..m,
                )
                .expect("benchmark depthwise");
            });
            let ops = 2.0 * (m * c * 9) as f64;
            rows.push(BenchRow {
                op: "depthwise",
                shape: format!("{hw}x{hw}x{c} 3x3"),
                weights: format,
                variant: kern.variant(),
                m,
                n: c,
                k: 9,
                ops,
                seconds: secs,
                gops: ops / secs / 1e9,
            });
        }
    }
    rows
}

/// Measure the single-core `vpdpbusd` (zmm) peak; `None` without AVX-512 VNNI.
pub fn vnni_peak() -> Option<Peak> {
    #[cfg(target_arch = "x86_64")]
    {
        if !Variant::Avx512Vnni.is_supported() {
            return None;
        }
        // Short runs, best of many: robust to other processes sharing the core.
        const ITERS: u64 = 1_000_000;
        let mut best = f64::MAX;
        for _ in 0..30 {
            let t = Instant::now();
            // SAFETY: the CPU supports avx512f and avx512vnni (checked above).
            let r = unsafe { peak::dpbusd_loop(ITERS) };
            std::hint::black_box(r);
            best = best.min(t.elapsed().as_secs_f64());
        }
        let gops = (ITERS * peak::CHAINS as u64 * 128) as f64 / best / 1e9;
        let ghz = peak::clock_ghz();
        Some(Peak {
            gops,
            ghz,
            ops_per_cycle: gops / ghz,
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

#[cfg(target_arch = "x86_64")]
mod peak {
    use core::arch::x86_64::*;
    use std::time::Instant;

    /// Independent accumulator chains: enough to cover the instruction's latency.
    pub(super) const CHAINS: usize = 16;

    /// `iters * CHAINS` zmm `vpdpbusd`, returning a value that depends on all of them.
    ///
    /// # Safety
    /// The CPU supports avx512f and avx512vnni.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub(super) unsafe fn dpbusd_loop(iters: u64) -> i32 {
        let a = std::hint::black_box(_mm512_set1_epi32(0x0101_0101));
        let b = std::hint::black_box(_mm512_set1_epi32(0x0102_0304));
        let mut acc = [_mm512_setzero_si512(); CHAINS];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_dpbusd_epi32(*x, a, b);
            }
        }
        let mut s = _mm512_setzero_si512();
        for x in acc {
            s = _mm512_add_epi32(s, x);
        }
        _mm512_reduce_add_epi32(s)
    }

    /// The core clock in GHz: a chain of 4 dependent adds per loop iteration runs at one add per
    /// cycle, so cycles = 4 * iterations.
    pub(super) fn clock_ghz() -> f64 {
        const ITERS: u64 = 5_000_000;
        let mut best = f64::MAX;
        for _ in 0..30 {
            let t = Instant::now();
            // SAFETY: register-only arithmetic and a counted loop; no memory is touched.
            unsafe {
                core::arch::asm!(
                    "2:",
                    "add {x}, 1",
                    "add {x}, 1",
                    "add {x}, 1",
                    "add {x}, 1",
                    "sub {n}, 1",
                    "jnz 2b",
                    x = inout(reg) 0u64 => _,
                    n = inout(reg) ITERS => _,
                    options(nomem, nostack),
                );
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        (4 * ITERS) as f64 / best / 1e9
    }
}

/// The rows as a table; with a peak, each AVX-512 VNNI GEMM or convolution also shows its
/// fraction of it.
pub fn report(rows: &[BenchRow], peak: Option<&Peak>) -> String {
    let mut s = String::new();
    if let Some(p) = peak {
        s += &format!(
            "vpdpbusd zmm peak (1 core, measured): {:.1} GOPS at {:.2} GHz = {:.0} ops/cycle \
             (nominal 256 ops/cycle x clock = {:.1} GOPS); \"of peak\" is of the measured peak\n",
            p.gops,
            p.ghz,
            p.ops_per_cycle,
            256.0 * p.ghz
        );
    }
    s += &format!(
        "{:<10} {:<22} {:<3} {:<11} {:>10} {:>8} {:>8}\n",
        "op", "shape", "w", "variant", "ms", "GOPS", "of peak"
    );
    for r in rows {
        let frac = match peak {
            Some(p) if r.variant == Variant::Avx512Vnni && r.op != "depthwise" => {
                format!("{:.0}%", 100.0 * r.gops / p.gops)
            }
            _ => String::new(),
        };
        s += &format!(
            "{:<10} {:<22} {:<3} {:<11} {:>10.3} {:>8.1} {:>8}\n",
            r.op,
            r.shape,
            r.weights.name(),
            r.variant.name(),
            r.seconds * 1e3,
            r.gops,
            frac
        );
    }
    s
}
