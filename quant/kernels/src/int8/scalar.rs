//! The scalar reference: portable Rust that states the arithmetic directly — `(a - za) * w`
//! summed in wrapping i32, plus the bias, then the epilogue — reading the same packed weights as
//! the SIMD kernels. It is the definition every other variant is tested against, and the fallback
//! on targets without a SIMD variant.

use super::{requant, DwJob, GemmJob, RawOut};

/// Write one finished accumulator.
///
/// # Safety
/// `(row, col)` is inside the output (and residual) the job validated.
#[inline]
unsafe fn store(out: &RawOut, row: usize, col: usize, acc: i32, scale: f32) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match *out {
            RawOut::U8 {
                ptr,
                ldc,
                zp,
                lo,
                hi,
            } => *ptr.add(row * ldc + col) = requant(acc, scale, zp, lo, hi),
            RawOut::U8Add {
                ptr,
                ldc,
                zp,
                lo,
                hi,
                res,
            } => {
                let q = requant(acc, scale, zp, lo, hi);
                let b = *res.ptr.add(row * res.ldc + col);
                *ptr.add(row * ldc + col) = res.add(q, b);
            }
            RawOut::F32 { ptr, ldc } => *ptr.add(row * ldc + col) = acc as f32 * scale,
            RawOut::I32 { ptr, ldc } => *ptr.add(row * ldc + col) = acc,
        }
    }
}

/// # Safety
/// `job` satisfies the [`GemmJob`] invariants.
pub(crate) unsafe fn gemm(job: &GemmJob<'_>) {
    let w = job.w;
    let za = i32::from(job.za);
    let groups = job.k.div_ceil(4);
    let mut a = vec![0u8; job.k];
    for r in 0..job.m {
        // SAFETY: `r < m`.
        unsafe { job.copy_row(r, &mut a) };
        for b in 0..w.blocks() {
            let mut acc = [0i32; 16];
            for g in 0..groups {
                let wg = w.group(b, g);
                let mut x = [0i32; 4];
                for (j, x) in x.iter_mut().enumerate() {
                    if let Some(&v) = a.get(g * 4 + j) {
                        *x = i32::from(v) - za;
                    }
                }
                for (col, acc) in acc.iter_mut().enumerate() {
                    let s: i32 = (0..4).map(|j| x[j] * i32::from(wg[col * 4 + j])).sum();
                    *acc = acc.wrapping_add(s);
                }
            }
            for (col, &acc) in acc.iter().enumerate() {
                let j = b * 16 + col;
                if j < w.n() {
                    // SAFETY: `r < m`, `j < n`: inside the validated output.
                    unsafe { store(&job.out, r, j, acc.wrapping_add(job.bias[j]), job.scale[j]) };
                }
            }
        }
    }
}

/// # Safety
/// `job` satisfies the [`DwJob`] invariants.
pub(crate) unsafe fn depthwise(job: &DwJob<'_>) {
    let w = job.w;
    let (c, taps) = (w.channels(), w.taps());
    let za = i32::from(job.za);
    for p in 0..job.npix {
        for ch in 0..c {
            let mut acc = job.bias[ch];
            for t in 0..taps {
                // SAFETY: each pointer has `c` readable bytes and `ch < c`.
                let x = i32::from(unsafe { *job.ptrs[p * taps + t].add(ch) });
                acc = acc.wrapping_add((x - za) * i32::from(w.at(ch, t)));
            }
            // SAFETY: `p < npix`, `ch < c`: inside the validated output.
            unsafe { store(&job.out, p, ch, acc, job.scale[ch]) };
        }
    }
}

/// The indirection fill ([`super::conv::fill_ptrs`]).
///
/// # Safety
/// It only forms pointers.
pub(crate) unsafe fn fill_ptrs(
    offs: &[u32],
    base: *const u8,
    za: *const u8,
    out: &mut [*const u8],
) {
    super::conv::fill_ptrs(offs, base, za, out)
}
