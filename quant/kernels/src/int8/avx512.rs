//! AVX-512 VNNI kernels (x86-64 with avx512f, avx512bw, avx512vl, avx512vnni).
//!
//! GEMM: register tiles of `MR` rows x `NV` zmm (16 columns each) of i32 accumulators; per group of
//! 4 `k`, one 64-byte load of packed weights per zmm column block, one 4-byte broadcast of each
//! A row, and `MR * NV` `vpdpbusd` (u8 x s8, four products summed into each i32 lane, wrapping,
//! never saturating). A is used raw; the zero point is removed in the epilogue by adding
//! `bias - za * colsum`. The tile shape follows the columns left: 6x64 (int4: 5x64, leaving
//! registers for the unpacking), 8x48, 12x32 or 16x16 (rows x columns), so narrow layers (16 or 32
//! channels) do not waste lanes. The K loop is an out-of-line function returning the accumulators,
//! which keeps them in registers (inlined, LLVM spilled them to the stack on every step). int4
//! weights are unpacked in register from 64 bytes of nibbles (two groups of 4 `k`): `& 0x0F` /
//! `>> 4 & 0x0F`, then `- 8`.
//!
//! Depthwise: 16 channels per zmm (one i32 lane each), 16 output pixels per tile; per tap the
//! weights are sign-extended (int4: unpacked) once into a zmm and applied to the 16 pixels with
//! `vpdpwssd`: the zero-extended input `(x, 0)` and the weight `(w, sign)` as i16 pairs give
//! exactly `x * w`, multiply and add in one instruction.

use core::arch::x86_64::*;

use super::{ASrc, DwJob, GemmJob, RawOut};

/// Rows of A per cache block: `MC_BYTES / k` (at least one tile of every shape).
const MC_BYTES: usize = 256 * 1024;

/// # Safety
/// `job` satisfies the [`GemmJob`] invariants and the CPU has avx512f/bw/vl/vnni.
pub(crate) unsafe fn gemm_i8(job: &GemmJob<'_>) {
    // SAFETY: forwarded from the caller.
    unsafe { gemm::<false>(job) }
}

/// # Safety
/// As [`gemm_i8`].
pub(crate) unsafe fn gemm_i4(job: &GemmJob<'_>) {
    // SAFETY: forwarded from the caller.
    unsafe { gemm::<true>(job) }
}

/// # Safety
/// `job` satisfies the [`DwJob`] invariants and the CPU has avx512f/bw/vl/vnni.
pub(crate) unsafe fn depthwise_i8(job: &DwJob<'_>) {
    // SAFETY: forwarded from the caller.
    unsafe { depthwise::<false>(job) }
}

/// # Safety
/// As [`depthwise_i8`].
pub(crate) unsafe fn depthwise_i4(job: &DwJob<'_>) {
    // SAFETY: forwarded from the caller.
    unsafe { depthwise::<true>(job) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn gemm<const I4: bool>(job: &GemmJob<'_>) {
    let blocks = job.w.blocks();
    let mc = ((MC_BYTES / job.k.max(1)).clamp(48, 4800) / 48) * 48;
    let mut m0 = 0;
    while m0 < job.m {
        let mb = mc.min(job.m - m0);
        let mut b = 0;
        while b < blocks {
            let nv = (blocks - b).min(4);
            // SAFETY: rows `m0..m0 + mb` are below `m` and blocks `b..b + nv` below `blocks`.
            unsafe {
                match nv {
                    // int4 needs registers for its unpacking: one row fewer.
                    4 if I4 => panel::<5, 4, I4>(job, m0, mb, b),
                    4 => panel::<6, 4, I4>(job, m0, mb, b),
                    3 => panel::<8, 3, I4>(job, m0, mb, b),
                    2 => panel::<12, 2, I4>(job, m0, mb, b),
                    _ => panel::<16, 1, I4>(job, m0, mb, b),
                }
            }
            b += nv;
        }
        m0 += mb;
    }
}

/// Rows `m0..m0 + mb` against column blocks `b..b + NV`, one `MR`-row tile at a time.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn panel<const MR: usize, const NV: usize, const I4: bool>(
    job: &GemmJob<'_>,
    m0: usize,
    mb: usize,
    b: usize,
) {
    let mut r = m0;
    while r < m0 + mb {
        let rows = MR.min(m0 + mb - r);
        // SAFETY: forwarded; `r + rows <= m`.
        unsafe { tile::<MR, NV, I4>(job, r, rows, b) };
        r += rows;
    }
}

/// Up to 4 bytes at `p` as a little-endian i32, zero filled (`len` may be 0..=4). Written without
/// a variable-length copy, which would become a `memcpy` call and force the accumulators out of
/// their registers.
///
/// # Safety
/// `len.min(4)` bytes at `p` are readable.
#[inline(always)]
unsafe fn read_partial(p: *const u8, len: usize) -> i32 {
    // SAFETY: each arm reads only the first `len.min(4)` bytes.
    unsafe {
        match len {
            0 => 0,
            1 => i32::from(*p),
            2 => i32::from(p.cast::<u16>().read_unaligned()),
            3 => i32::from(p.cast::<u16>().read_unaligned()) | i32::from(*p.add(2)) << 16,
            _ => p.cast::<i32>().read_unaligned(),
        }
    }
}

/// `acc[r][v] += dot4(a_r, bv[v])` for the whole tile, `a_r` produced by `$a(r)`.
macro_rules! dp_step {
    ($acc:ident, $bv:ident, $mr:ident, $nv:ident, |$r:ident| $a:expr) => {
        for $r in 0..$mr {
            let av = _mm512_set1_epi32($a);
            for v in 0..$nv {
                $acc[$r][v] = _mm512_dpbusd_epi32($acc[$r][v], av, $bv[v]);
            }
        }
    };
}

/// The hot loop: the full groups of 4 `k` (int4: pairs of groups) of one `MR x 16 NV` tile.
///
/// The A rows come as `taps` segments of `gpt` groups (pairs) each: segment `t` of tile row `r`
/// starts at `*rowptrs.add(r' * taps + t)` with `r' = min(r, rows - 1)`, and meets the weights of
/// groups `t * gpt ..(t + 1) * gpt`. A dense GEMM is one segment per row; an implicit-GEMM
/// convolution has one segment per kernel tap.
///
/// Kept out of line so that nothing after it (tails, epilogue, calls) pushes the accumulators
/// out of their registers: they are stored once, as the return value.
///
/// # Safety
/// `rowptrs` has `rows * taps` entries (`1 <= rows <= MR`), each pointing to `4 * gpt` (int4:
/// `8 * gpt`) readable bytes; the weights of blocks `0..NV` at `b0` (block stride `bs`) cover
/// `taps * gpt` groups (pairs); the CPU has avx512f/bw/vl/vnni.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline(never)]
unsafe fn kloop<const MR: usize, const NV: usize, const I4: bool>(
    rowptrs: *const *const u8,
    rows: usize,
    taps: usize,
    gpt: usize,
    b0: *const u8,
    bs: usize,
) -> [[__m512i; NV]; MR] {
    let mut acc = [[_mm512_setzero_si512(); NV]; MR];
    let mut bv = [_mm512_setzero_si512(); NV];
    let low = _mm512_set1_epi8(0x0F);
    let eight = _mm512_set1_epi8(8);
    // SAFETY: the reads stay inside what the caller vouches for: row segment bytes
    // `g * 4 + 0..4 < 4 * gpt` (int4: `h * 8 + 0..8 < 8 * gpt`) and weight group (pair)
    // `t * gpt + g < taps * gpt` of blocks `0..NV`.
    unsafe {
        for t in 0..taps {
            let mut pa = [*rowptrs; MR];
            for (r, p) in pa.iter_mut().enumerate() {
                *p = *rowptrs.add(r.min(rows - 1) * taps + t);
            }
            let bt = b0.add(t * gpt * 64);
            if !I4 {
                for g in 0..gpt {
                    for (v, x) in bv.iter_mut().enumerate() {
                        *x = _mm512_loadu_si512(bt.add(v * bs + g * 64).cast());
                    }
                    dp_step!(acc, bv, MR, NV, |r| pa[r]
                        .add(g * 4)
                        .cast::<i32>()
                        .read_unaligned());
                }
            } else {
                for h in 0..gpt {
                    // Group 2h in the low nibbles, group 2h + 1 in the high ones.
                    for (v, x) in bv.iter_mut().enumerate() {
                        let raw = _mm512_loadu_si512(bt.add(v * bs + h * 64).cast());
                        *x = _mm512_sub_epi8(_mm512_and_si512(raw, low), eight);
                    }
                    dp_step!(acc, bv, MR, NV, |r| pa[r]
                        .add(h * 8)
                        .cast::<i32>()
                        .read_unaligned());
                    for (v, x) in bv.iter_mut().enumerate() {
                        let raw = _mm512_loadu_si512(bt.add(v * bs + h * 64).cast());
                        let raw = _mm512_srli_epi16::<4>(raw);
                        *x = _mm512_sub_epi8(_mm512_and_si512(raw, low), eight);
                    }
                    dp_step!(acc, bv, MR, NV, |r| pa[r]
                        .add(h * 8 + 4)
                        .cast::<i32>()
                        .read_unaligned());
                }
            }
        }
    }
    acc
}

/// One `MR x 16 NV` tile: rows `row0..row0 + rows` (`rows <= MR`; the missing rows repeat the
/// last one and are not stored), column blocks `b..b + NV`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile<const MR: usize, const NV: usize, const I4: bool>(
    job: &GemmJob<'_>,
    row0: usize,
    rows: usize,
    b: usize,
) {
    // SAFETY: (whole body) rows `row0..row0 + rows` of A have `k` readable bytes each (the job's
    // invariant) and every A read below stays within `k` bytes of a row pointer; the weight reads
    // stay within blocks `b..b + NV` of `w.data()` (block `bb` spans `block_stride` bytes: `kp / 4`
    // groups of 64 for int8, `kp / 8` pairs of 64 for int4, and `k <= kp`); the `corr` and
    // `scale` reads of 16 values at column `16 * bb` stay inside their `blocks * 16` entries.
    unsafe {
        let bs = job.w.block_stride();
        let b0 = job.w.data().as_ptr().add(b * bs);
        let k = job.k;
        let (mut acc, pa) = match job.src {
            ASrc::Dense { a, lda } => {
                let mut pa = [a; MR];
                for (r, p) in pa.iter_mut().enumerate() {
                    *p = a.add((row0 + r.min(rows - 1)) * lda);
                }
                let gpt = if I4 { k / 8 } else { k / 4 };
                (kloop::<MR, NV, I4>(pa.as_ptr(), rows, 1, gpt, b0, bs), pa)
            }
            ASrc::Indirect { ptrs, taps } => {
                // `k == taps * channels`, channels a multiple of the group size: no tail.
                let gpt = if I4 { k / taps / 8 } else { k / taps / 4 };
                let rowptrs = ptrs.as_ptr().add(row0 * taps);
                let acc = kloop::<MR, NV, I4>(rowptrs, rows, taps, gpt, b0, bs);
                return finish::<MR, NV>(job, &acc, row0, rows, b);
            }
        };
        let mut bv = [_mm512_setzero_si512(); NV];
        if !I4 {
            let groups = k / 4;
            let rem = k - groups * 4;
            if rem > 0 {
                for (v, x) in bv.iter_mut().enumerate() {
                    *x = _mm512_loadu_si512(b0.add(v * bs + groups * 64).cast());
                }
                dp_step!(acc, bv, MR, NV, |r| read_partial(
                    pa[r].add(groups * 4),
                    rem
                ));
            }
        } else {
            let low = _mm512_set1_epi8(0x0F);
            let eight = _mm512_set1_epi8(8);
            let pairs = k / 8;
            let rem = k - pairs * 8;
            if rem > 0 {
                for (v, x) in bv.iter_mut().enumerate() {
                    let raw = _mm512_loadu_si512(b0.add(v * bs + pairs * 64).cast());
                    *x = _mm512_sub_epi8(_mm512_and_si512(raw, low), eight);
                }
                dp_step!(acc, bv, MR, NV, |r| read_partial(pa[r].add(pairs * 8), rem));
                if rem > 4 {
                    for (v, x) in bv.iter_mut().enumerate() {
                        let raw = _mm512_loadu_si512(b0.add(v * bs + pairs * 64).cast());
                        let raw = _mm512_srli_epi16::<4>(raw);
                        *x = _mm512_sub_epi8(_mm512_and_si512(raw, low), eight);
                    }
                    dp_step!(acc, bv, MR, NV, |r| read_partial(
                        pa[r].add(pairs * 8 + 4),
                        rem - 4
                    ));
                }
            }
        }
        finish::<MR, NV>(job, &acc, row0, rows, b);
    }
}

/// The epilogue of a tile: add `bias - za * colsum`, then store through the output kind.
///
/// # Safety
/// Rows `row0..row0 + rows` and the columns of blocks `b..b + NV` below `n` are in the job.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn finish<const MR: usize, const NV: usize>(
    job: &GemmJob<'_>,
    acc: &[[__m512i; NV]; MR],
    row0: usize,
    rows: usize,
    b: usize,
) {
    let n = job.w.n();
    for (r, acc) in acc.iter().enumerate().take(rows) {
        for (v, &x) in acc.iter().enumerate() {
            let col = (b + v) * 16;
            if col < n {
                // SAFETY: `corr` and `scale` have `blocks * 16` entries, `col + 16` within them;
                // the store covers `(n - col).min(16)` valid columns of row `row0 + r`.
                unsafe {
                    let x =
                        _mm512_add_epi32(x, _mm512_loadu_si512(job.corr.as_ptr().add(col).cast()));
                    let scale = _mm512_loadu_ps(job.scale.as_ptr().add(col));
                    store16(&job.out, row0 + r, col, (n - col).min(16), x, scale);
                }
            }
        }
    }
}

/// Store 16 finished accumulators (`lanes` of them valid) at `(row, col)` through the epilogue.
///
/// # Safety
/// Columns `col..col + lanes` of `row` are inside the validated output (and residual).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn store16(out: &RawOut, row: usize, col: usize, lanes: usize, x: __m512i, scale: __m512) {
    let mask: __mmask16 = if lanes >= 16 {
        0xFFFF
    } else {
        (1u16 << lanes) - 1
    };
    // SAFETY: the masked stores write only the `lanes` valid elements, which the caller vouches
    // for; masked-off lanes are never accessed.
    unsafe {
        match *out {
            RawOut::I32 { ptr, ldc } => {
                _mm512_mask_storeu_epi32(ptr.add(row * ldc + col).cast(), mask, x)
            }
            RawOut::F32 { ptr, ldc } => {
                let f = _mm512_mul_ps(_mm512_cvtepi32_ps(x), scale);
                _mm512_mask_storeu_ps(ptr.add(row * ldc + col).cast(), mask, f)
            }
            RawOut::U8 {
                ptr,
                ldc,
                zp,
                lo,
                hi,
            } => {
                let f = requant16(x, scale, zp, lo, hi);
                let bytes = _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(f));
                _mm_mask_storeu_epi8(ptr.add(row * ldc + col).cast(), mask, bytes)
            }
            RawOut::U8Add {
                ptr,
                ldc,
                zp,
                lo,
                hi,
                res,
            } => {
                // `q` as the exact integer-valued f32 it is before the conversion to u8.
                let q = requant16(x, scale, zp, lo, hi);
                let b = _mm_maskz_loadu_epi8(mask, res.ptr.add(row * res.ldc + col).cast());
                let b = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
                let v = _mm512_add_ps(
                    _mm512_mul_ps(
                        _mm512_set1_ps(res.ra),
                        _mm512_sub_ps(q, _mm512_set1_ps(res.za)),
                    ),
                    _mm512_mul_ps(
                        _mm512_set1_ps(res.rb),
                        _mm512_sub_ps(b, _mm512_set1_ps(res.zb)),
                    ),
                );
                let f =
                    _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
                let f = _mm512_add_ps(f, _mm512_set1_ps(res.zy));
                let f = _mm512_min_ps(
                    _mm512_max_ps(f, _mm512_set1_ps(res.lo)),
                    _mm512_set1_ps(res.hi),
                );
                let bytes = _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(f));
                _mm_mask_storeu_epi8(ptr.add(row * ldc + col).cast(), mask, bytes)
            }
        }
    }
}

/// The U8 epilogue up to the conversion: `clamp(round_ties_even(x * scale) + zp, lo, hi)` in f32.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn requant16(x: __m512i, scale: __m512, zp: f32, lo: f32, hi: f32) -> __m512 {
    let f = _mm512_mul_ps(_mm512_cvtepi32_ps(x), scale);
    let f = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(f);
    let f = _mm512_add_ps(f, _mm512_set1_ps(zp));
    _mm512_min_ps(_mm512_max_ps(f, _mm512_set1_ps(lo)), _mm512_set1_ps(hi))
}

/// Output pixels per depthwise tile.
const DW_P: usize = 16;

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn depthwise<const I4: bool>(job: &DwJob<'_>) {
    let w = job.w;
    let (c, cp, taps) = (w.channels(), w.channels_padded(), w.taps());
    let wd = w.data().as_ptr();
    let low = _mm_set1_epi8(0x0F);
    let eight = _mm_set1_epi8(8);
    for cb in 0..cp / 16 {
        let ch0 = cb * 16;
        let lanes = (c - ch0).min(16);
        let mask: __mmask16 = if lanes >= 16 {
            0xFFFF
        } else {
            (1u16 << lanes) - 1
        };
        let mut p0 = 0;
        while p0 < job.npix {
            let np = DW_P.min(job.npix - p0);
            // SAFETY: (whole block) pixel rows `p0..p0 + np` are below `npix` (missing tile rows
            // repeat the last one and are not stored), so each `ptrs` index is below
            // `npix * taps`; each pointer has `c` readable bytes and the masked loads read only
            // channels `ch0..ch0 + lanes <= c` (masked-off lanes are never accessed); the weight
            // reads stay within tap `t`'s `cp` bytes (int8) or `cp / 2` bytes (int4); `corr` and
            // `scale` have `cp` entries; the stores go through `store16` with `lanes` valid.
            unsafe {
                let mut rows = [job.ptrs.as_ptr(); DW_P];
                for (p, r) in rows.iter_mut().enumerate() {
                    *r = job.ptrs.as_ptr().add((p0 + p.min(np - 1)) * taps);
                }
                let mut acc = [_mm512_setzero_si512(); DW_P];
                for t in 0..taps {
                    let wv = if I4 {
                        let v = _mm_loadl_epi64(wd.add((t * cp / 16 + cb) * 8).cast());
                        let lo = _mm_and_si128(v, low);
                        let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), low);
                        let b = _mm_sub_epi8(_mm_unpacklo_epi64(lo, hi), eight);
                        _mm512_cvtepi8_epi32(b)
                    } else {
                        _mm512_cvtepi8_epi32(_mm_loadu_si128(wd.add(t * cp + ch0).cast()))
                    };
                    for (p, acc) in acc.iter_mut().enumerate() {
                        let src = (*rows[p].add(t)).add(ch0);
                        let x = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, src.cast()));
                        // Lane = (x, 0) and (w, sign) as i16 pairs: `vpdpwssd` adds x * w.
                        *acc = _mm512_dpwssd_epi32(*acc, x, wv);
                    }
                }
                let corr = _mm512_loadu_si512(job.corr.as_ptr().add(ch0).cast());
                let scale = _mm512_loadu_ps(job.scale.as_ptr().add(ch0));
                for (p, &x) in acc.iter().enumerate().take(np) {
                    store16(
                        &job.out,
                        p0 + p,
                        ch0,
                        lanes,
                        _mm512_add_epi32(x, corr),
                        scale,
                    );
                }
            }
            p0 += np;
        }
    }
}

/// The indirection fill ([`super::conv::fill_ptrs`]) compiled for avx512f.
///
/// # Safety
/// The CPU has avx512f; it only forms pointers.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn fill_ptrs(
    offs: &[u32],
    base: *const u8,
    za: *const u8,
    out: &mut [*const u8],
) {
    super::conv::fill_ptrs(offs, base, za, out)
}
