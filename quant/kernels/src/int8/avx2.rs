//! AVX2 kernels (x86-64 with avx2).
//!
//! `vpmaddubsw` (u8 x s8 pairs summed into *saturating* i16) cannot be used as is: `255 * -128 * 2`
//! does not fit in i16. So both operands are widened to i16 and multiplied with `vpmaddwd`, whose
//! pair sums land exactly in i32 (at most `2 * 255 * 128`).
//!
//! GEMM: the A rows of a 6-row tile are widened to i16 once (zero padded to the packing
//! granularity) and reused for every column block. Per group of 4 `k` and 8 columns, two 16-byte
//! weight loads are sign-extended to two ymm of i16 (4 columns x 4 `k` each, int4: unpacked from
//! nibbles first), each A row's 4 values are broadcast as one 64-bit pattern, and `vpmaddwd`
//! leaves two partial sums per column (k 0-1 and k 2-3) that stay apart until the epilogue folds
//! them with `vphaddd`. 12 accumulators + 2 weight registers + 1 broadcast fill the 16 ymm.
//!
//! Depthwise: 16 channels as two ymm of i32, 4 output pixels per tile; `vpmaddwd` of the
//! zero-extended input `(x, 0)` and the sign-extended weight `(w, sign)` (as i16 pairs) is exactly
//! `x * w`, cheaper than `vpmulld`.

use core::arch::x86_64::*;

use super::{DwJob, GemmJob, RawOut};

/// Rows per GEMM tile.
const MR: usize = 6;

/// # Safety
/// `job` satisfies the [`GemmJob`] invariants and the CPU has avx2.
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
/// `job` satisfies the [`DwJob`] invariants and the CPU has avx2.
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

#[target_feature(enable = "avx2")]
unsafe fn gemm<const I4: bool>(job: &GemmJob<'_>) {
    let k = job.k;
    let kq = if I4 {
        k.next_multiple_of(8)
    } else {
        k.next_multiple_of(4)
    };
    let mut abuf = vec![0i16; MR * kq];
    let mut row = vec![0u8; k];
    let (n, blocks) = (job.w.n(), job.w.blocks());
    let mut m0 = 0;
    while m0 < job.m {
        let rows = MR.min(job.m - m0);
        for (r, dst) in abuf.chunks_exact_mut(kq.max(1)).enumerate().take(MR) {
            if r < rows {
                // SAFETY: `m0 + r < m`.
                unsafe { job.copy_row(m0 + r, &mut row) };
                for (d, &s) in dst.iter_mut().zip(&row) {
                    *d = i16::from(s);
                }
                dst[k..].fill(0);
            } else {
                dst.fill(0);
            }
        }
        for b in 0..blocks {
            for half in 0..2 {
                let col = b * 16 + half * 8;
                if col < n {
                    // SAFETY: `abuf` holds MR rows of `kq` values, `kq <= w.k_padded()`, and
                    // rows `m0..m0 + rows` and columns `col..` are inside the job.
                    unsafe { tile::<I4>(job, &abuf, kq, m0, rows, b, half) };
                }
            }
        }
        m0 += rows;
    }
}

/// One 6-row x 8-column tile from the widened rows in `abuf`.
#[target_feature(enable = "avx2")]
unsafe fn tile<const I4: bool>(
    job: &GemmJob<'_>,
    abuf: &[i16],
    kq: usize,
    row0: usize,
    rows: usize,
    b: usize,
    half: usize,
) {
    // SAFETY: (whole body) the A reads are 4 i16 at `r * kq + 4 g` with `4 g + 4 <= kq`, inside
    // `abuf` (MR * kq values); the weight reads are 16-byte loads at offsets below 64 within group
    // `g < kq / 4` (int8) or pair `h < kq / 8` (int4) of block `b`, inside `w.data()` since
    // `kq <= kp`; `corr` and `scale` have `blocks * 16` entries and `col + 8 <= blocks * 16`.
    unsafe {
        let bp = job
            .w
            .data()
            .as_ptr()
            .add(b * job.w.block_stride() + half * 32);
        let ap = abuf.as_ptr();
        let mut acc = [[_mm256_setzero_si256(); 2]; MR];
        macro_rules! step {
            ($w0:expr, $w1:expr, $koff:expr) => {
                let (w0, w1) = ($w0, $w1);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av =
                        _mm256_set1_epi64x(ap.add(r * kq + $koff).cast::<i64>().read_unaligned());
                    acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(av, w0));
                    acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(av, w1));
                }
            };
        }
        if I4 {
            let low = _mm_set1_epi8(0x0F);
            let eight = _mm_set1_epi8(8);
            for h in 0..kq / 8 {
                let r0 = _mm_loadu_si128(bp.add(h * 64).cast());
                let r1 = _mm_loadu_si128(bp.add(h * 64 + 16).cast());
                let lo0 = _mm_sub_epi8(_mm_and_si128(r0, low), eight);
                let lo1 = _mm_sub_epi8(_mm_and_si128(r1, low), eight);
                step!(_mm256_cvtepi8_epi16(lo0), _mm256_cvtepi8_epi16(lo1), h * 8);
                let hi0 = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16::<4>(r0), low), eight);
                let hi1 = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16::<4>(r1), low), eight);
                step!(
                    _mm256_cvtepi8_epi16(hi0),
                    _mm256_cvtepi8_epi16(hi1),
                    h * 8 + 4
                );
            }
        } else {
            for g in 0..kq / 4 {
                let w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(bp.add(g * 64).cast()));
                let w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(bp.add(g * 64 + 16).cast()));
                step!(w0, w1, g * 4);
            }
        }
        let col = b * 16 + half * 8;
        let lanes = (job.w.n() - col).min(8);
        let corr = _mm256_loadu_si256(job.corr.as_ptr().add(col).cast());
        let scale = _mm256_loadu_ps(job.scale.as_ptr().add(col));
        for (r, acc) in acc.iter().enumerate().take(rows) {
            // [c0 c0 c1 c1 | c2 c2 c3 c3] + [c4 c4 c5 c5 | c6 c6 c7 c7] -> [c0 c1 c4 c5 | c2 c3 c6 c7]
            let s = _mm256_hadd_epi32(acc[0], acc[1]);
            let s = _mm256_permute4x64_epi64::<0b11_01_10_00>(s);
            store8(
                &job.out,
                row0 + r,
                col,
                lanes,
                _mm256_add_epi32(s, corr),
                scale,
            );
        }
    }
}

/// Store 8 finished accumulators (`lanes` of them valid) at `(row, col)` through the epilogue.
///
/// # Safety
/// Columns `col..col + lanes` of `row` are inside the validated output.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn store8(out: &RawOut, row: usize, col: usize, lanes: usize, x: __m256i, scale: __m256) {
    let mask = _mm256_cmpgt_epi32(
        _mm256_set1_epi32(lanes as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    );
    // SAFETY: full stores happen only with 8 valid lanes; otherwise `vpmaskmov` writes (and
    // touches) only the valid lanes, or the bytes are copied one by one.
    unsafe {
        match *out {
            RawOut::I32 { ptr, ldc } => {
                let p = ptr.add(row * ldc + col);
                if lanes == 8 {
                    _mm256_storeu_si256(p.cast(), x);
                } else {
                    _mm256_maskstore_epi32(p, mask, x);
                }
            }
            RawOut::F32 { ptr, ldc } => {
                let f = _mm256_mul_ps(_mm256_cvtepi32_ps(x), scale);
                let p = ptr.add(row * ldc + col);
                if lanes == 8 {
                    _mm256_storeu_ps(p, f);
                } else {
                    _mm256_maskstore_ps(p, mask, f);
                }
            }
            RawOut::U8 {
                ptr,
                ldc,
                zp,
                lo,
                hi,
            } => store_u8x8(
                ptr.add(row * ldc + col),
                lanes,
                requant8(x, scale, zp, lo, hi),
            ),
            RawOut::U8Add {
                ptr,
                ldc,
                zp,
                lo,
                hi,
                res,
            } => {
                // `q` as the exact integer-valued f32 it is before the conversion to u8.
                let q = requant8(x, scale, zp, lo, hi);
                let src = res.ptr.add(row * res.ldc + col);
                let b = if lanes == 8 {
                    _mm_loadl_epi64(src.cast())
                } else {
                    let mut tmp = [0u8; 16];
                    core::ptr::copy_nonoverlapping(src, tmp.as_mut_ptr(), lanes);
                    _mm_loadu_si128(tmp.as_ptr().cast())
                };
                let b = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
                let v = _mm256_add_ps(
                    _mm256_mul_ps(
                        _mm256_set1_ps(res.ra),
                        _mm256_sub_ps(q, _mm256_set1_ps(res.za)),
                    ),
                    _mm256_mul_ps(
                        _mm256_set1_ps(res.rb),
                        _mm256_sub_ps(b, _mm256_set1_ps(res.zb)),
                    ),
                );
                let f = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
                let f = _mm256_add_ps(f, _mm256_set1_ps(res.zy));
                let f = _mm256_min_ps(
                    _mm256_max_ps(f, _mm256_set1_ps(res.lo)),
                    _mm256_set1_ps(res.hi),
                );
                store_u8x8(ptr.add(row * ldc + col), lanes, f);
            }
        }
    }
}

/// The U8 epilogue up to the conversion: `clamp(round_ties_even(x * scale) + zp, lo, hi)` in f32.
#[target_feature(enable = "avx2")]
#[inline]
fn requant8(x: __m256i, scale: __m256, zp: f32, lo: f32, hi: f32) -> __m256 {
    let f = _mm256_mul_ps(_mm256_cvtepi32_ps(x), scale);
    let f = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(f);
    let f = _mm256_add_ps(f, _mm256_set1_ps(zp));
    _mm256_min_ps(_mm256_max_ps(f, _mm256_set1_ps(lo)), _mm256_set1_ps(hi))
}

/// Store `lanes` (1..=8) u8 values given as integer-valued f32 in 0..=255.
///
/// # Safety
/// `lanes` bytes at `p` are writable.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn store_u8x8(p: *mut u8, lanes: usize, f: __m256) {
    let i = _mm256_cvttps_epi32(f);
    // Values are in 0..=255: the saturating packs are exact.
    let w = _mm256_permute4x64_epi64::<0b00_00_10_00>(_mm256_packus_epi32(i, i));
    let bytes = _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_castsi256_si128(w));
    // SAFETY: a full 8-byte store only with 8 lanes; otherwise `lanes` bytes are copied.
    unsafe {
        if lanes == 8 {
            _mm_storel_epi64(p.cast(), bytes);
        } else {
            let mut tmp = [0u8; 16];
            _mm_storeu_si128(tmp.as_mut_ptr().cast(), bytes);
            core::ptr::copy_nonoverlapping(tmp.as_ptr(), p, lanes);
        }
    }
}

/// Output pixels per depthwise tile.
const DW_P: usize = 4;

#[target_feature(enable = "avx2")]
unsafe fn depthwise<const I4: bool>(job: &DwJob<'_>) {
    let w = job.w;
    let (c, cp, taps) = (w.channels(), w.channels_padded(), w.taps());
    let wd = w.data().as_ptr();
    let low = _mm_set1_epi8(0x0F);
    let eight = _mm_set1_epi8(8);
    for cb in 0..cp / 16 {
        let ch0 = cb * 16;
        let lanes = (c - ch0).min(16);
        let mut p0 = 0;
        while p0 < job.npix {
            let np = DW_P.min(job.npix - p0);
            // SAFETY: (whole block) pixel rows `p0..p0 + np` are below `npix` (missing tile rows
            // repeat the last one and are not stored), so each `ptrs` index is below
            // `npix * taps`; each pointer has `c` readable bytes: a 16-byte load is done only when
            // `ch0 + 16 <= c`, otherwise the `lanes` valid bytes are copied to a stack buffer;
            // weight reads stay inside tap `t`'s `cp` (int8) or `cp / 2` (int4) bytes; `corr` and
            // `scale` have `cp` entries; `store8` writes only valid lanes.
            unsafe {
                let mut rows = [job.ptrs.as_ptr(); DW_P];
                for (p, r) in rows.iter_mut().enumerate() {
                    *r = job.ptrs.as_ptr().add((p0 + p.min(np - 1)) * taps);
                }
                let mut acc = [[_mm256_setzero_si256(); 2]; DW_P];
                for t in 0..taps {
                    let wv = if I4 {
                        let v = _mm_loadl_epi64(wd.add((t * cp / 16 + cb) * 8).cast());
                        let lo = _mm_and_si128(v, low);
                        let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), low);
                        _mm_sub_epi8(_mm_unpacklo_epi64(lo, hi), eight)
                    } else {
                        _mm_loadu_si128(wd.add(t * cp + ch0).cast())
                    };
                    let w0 = _mm256_cvtepi8_epi32(wv);
                    let w1 = _mm256_cvtepi8_epi32(_mm_srli_si128::<8>(wv));
                    for (p, acc) in acc.iter_mut().enumerate() {
                        let src = (*rows[p].add(t)).add(ch0);
                        let x = if lanes == 16 {
                            _mm_loadu_si128(src.cast())
                        } else {
                            let mut tmp = [0u8; 16];
                            core::ptr::copy_nonoverlapping(src, tmp.as_mut_ptr(), lanes);
                            _mm_loadu_si128(tmp.as_ptr().cast())
                        };
                        let x0 = _mm256_cvtepu8_epi32(x);
                        let x1 = _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(x));
                        // Lane = (x, 0) and (w, sign) as i16 pairs: `vpmaddwd` gives x * w.
                        acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(x0, w0));
                        acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(x1, w1));
                    }
                }
                for (p, acc) in acc.iter().enumerate().take(np) {
                    for (hh, &x) in acc.iter().enumerate() {
                        let col = ch0 + hh * 8;
                        if col < c {
                            let corr = _mm256_loadu_si256(job.corr.as_ptr().add(col).cast());
                            let scale = _mm256_loadu_ps(job.scale.as_ptr().add(col));
                            let x = _mm256_add_epi32(x, corr);
                            store8(&job.out, p0 + p, col, (c - col).min(8), x, scale);
                        }
                    }
                }
            }
            p0 += np;
        }
    }
}

/// The indirection fill ([`super::conv::fill_ptrs`]) compiled for avx2.
///
/// # Safety
/// The CPU has avx2; it only forms pointers.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn fill_ptrs(
    offs: &[u32],
    base: *const u8,
    za: *const u8,
    out: &mut [*const u8],
) {
    super::conv::fill_ptrs(offs, base, za, out)
}
