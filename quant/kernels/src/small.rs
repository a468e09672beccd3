//! A register-blocked f32 GEMM for the many small products of a Winograd convolution (a tile
//! band's 36 `[tiles, C] x [C, M]` with C, M of 16 to 128): one call costs a feature check and a
//! loop, where the general [`crate::gemm::sgemm`] pays for packing and its thread-local workspace
//! on every call, which at these sizes is as much as the arithmetic.
//!
//! Every output is `c[i][j] (+)= sum_k a[i][k] * b[k][j]`, summed over `k` in order with fused
//! multiply-adds from zero, so the AVX2 kernel and the portable one agree bit for bit (tested).

use crate::gemm::{MatMut, MatRef};

type Kernel = unsafe fn(&Job);

/// The checked arguments of one call.
struct Job {
    c: *mut f32,
    crs: usize,
    a: *const f32,
    ars: usize,
    b: *const f32,
    brs: usize,
    rows: usize,
    cols: usize,
    depth: usize,
    accumulate: bool,
}

/// `c = a · b`, or `c += a · b` when `accumulate`, for row-major views (`cs == 1`) of any
/// stride. Panics when the shapes disagree or a view reaches outside its slice.
pub fn sgemm_small(c: MatMut<'_>, a: MatRef<'_>, b: MatRef<'_>, accumulate: bool) {
    run(best(), c, a, b, accumulate)
}

/// [`sgemm_small`] on the portable kernel, the reference the SIMD one is tested against.
pub fn sgemm_small_reference(c: MatMut<'_>, a: MatRef<'_>, b: MatRef<'_>, accumulate: bool) {
    run(portable, c, a, b, accumulate)
}

fn run(kernel: Kernel, c: MatMut<'_>, a: MatRef<'_>, b: MatRef<'_>, accumulate: bool) {
    crate::gemm::assert_product("sgemm_small", &c, &a, &b);
    assert!(
        a.cs == 1 && b.cs == 1 && c.cs == 1,
        "sgemm_small: views must be row-major"
    );
    let reach = |rows: usize, cols: usize, rs: usize| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * rs + cols
        }
    };
    assert!(
        reach(a.rows, a.cols, a.rs) <= a.data.len()
            && reach(b.rows, b.cols, b.rs) <= b.data.len()
            && reach(c.rows, c.cols, c.rs) <= c.data.len(),
        "sgemm_small: view out of bounds"
    );
    assert!(
        c.rows <= 1 || c.rs >= c.cols,
        "sgemm_small: output rows overlap"
    );
    if c.rows == 0 || c.cols == 0 {
        return;
    }
    let job = Job {
        c: c.data.as_mut_ptr(),
        crs: c.rs,
        a: a.data.as_ptr(),
        ars: a.rs,
        b: b.data.as_ptr(),
        brs: b.rs,
        rows: c.rows,
        cols: c.cols,
        depth: a.cols,
        accumulate,
    };
    // SAFETY: the asserts above keep every element the kernel reads or writes inside the three
    // slices, the output's rows distinct, and `c` (a unique borrow) apart from `a` and `b`;
    // `best` returns a SIMD kernel only when the CPU has its features.
    unsafe { kernel(&job) }
}

fn best() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        return avx2;
    }
    portable
}

/// # Safety
/// `job` must satisfy the bounds [`run`] checks.
unsafe fn portable(job: &Job) {
    for i in 0..job.rows {
        for j in 0..job.cols {
            // SAFETY: i < rows and j < cols.
            unsafe { element(job, i, j) }
        }
    }
}

/// Output (`i`, `j`) alone: the reference summation (fused, in order of `k`, from zero), which
/// the SIMD blocks reproduce.
///
/// # Safety
/// `i < job.rows`, `j < job.cols`, and `job` within the bounds [`run`] checks.
#[inline(always)]
unsafe fn element(job: &Job, i: usize, j: usize) {
    let mut s = 0f32;
    for k in 0..job.depth {
        // SAFETY: i < rows, k < depth, j < cols are inside the checked views.
        let (x, y) = unsafe { (*job.a.add(i * job.ars + k), *job.b.add(k * job.brs + j)) };
        s = x.mul_add(y, s);
    }
    // SAFETY: as above; the output element is this call's alone.
    let d = unsafe { &mut *job.c.add(i * job.crs + j) };
    *d = if job.accumulate { *d + s } else { s };
}

/// # Safety
/// The CPU must have AVX2 and FMA, and `job` satisfy the bounds [`run`] checks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2(job: &Job) {
    let mut i = 0;
    while i < job.rows {
        let r = (job.rows - i).min(4);
        let mut j = 0;
        while j + 16 <= job.cols {
            // SAFETY: rows i..i+r and columns j..j+16 are inside the views.
            unsafe { rows::<2>(job, r, i, j) };
            j += 16;
        }
        if j + 8 <= job.cols {
            // SAFETY: as above, eight columns.
            unsafe { rows::<1>(job, r, i, j) };
            j += 8;
        }
        for jj in j..job.cols {
            for ii in i..i + r {
                // SAFETY: ii < rows, jj < cols.
                unsafe { element(job, ii, jj) }
            }
        }
        i += r;
    }
}

/// [`block`] for `r` (1 to 4) rows.
///
/// # Safety
/// As [`block`], for rows `i..i+r`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn rows<const V: usize>(job: &Job, r: usize, i: usize, j: usize) {
    // SAFETY: the caller's bounds, for the `r` rows chosen.
    unsafe {
        match r {
            4 => block::<4, V>(job, i, j),
            3 => block::<3, V>(job, i, j),
            2 => block::<2, V>(job, i, j),
            _ => block::<1, V>(job, i, j),
        }
    }
}

/// `R` rows by `8 V` columns of the output at (`i`, `j`), accumulated in registers.
///
/// # Safety
/// AVX2 and FMA present; rows `i..i+R` and columns `j..j+8V` inside the job's views.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn block<const R: usize, const V: usize>(job: &Job, i: usize, j: usize) {
    use std::arch::x86_64::*;
    let mut s = [[_mm256_setzero_ps(); V]; R];
    for k in 0..job.depth {
        let mut b = [_mm256_setzero_ps(); V];
        for (v, bv) in b.iter_mut().enumerate() {
            // SAFETY: row k, columns j+8v..j+8v+8 of b are inside its view.
            *bv = unsafe { _mm256_loadu_ps(job.b.add(k * job.brs + j + 8 * v)) };
        }
        for (r, sr) in s.iter_mut().enumerate() {
            // SAFETY: row i+r, column k of a is inside its view.
            let x = unsafe { _mm256_set1_ps(*job.a.add((i + r) * job.ars + k)) };
            for (acc, &bv) in sr.iter_mut().zip(&b) {
                *acc = _mm256_fmadd_ps(x, bv, *acc);
            }
        }
    }
    for (r, sr) in s.iter().enumerate() {
        for (v, &acc) in sr.iter().enumerate() {
            // SAFETY: row i+r, columns j+8v.. of c are inside its view and only this call's.
            unsafe {
                let p = job.c.add((i + r) * job.crs + j + 8 * v);
                let out = if job.accumulate {
                    _mm256_add_ps(_mm256_loadu_ps(p), acc)
                } else {
                    acc
                };
                _mm256_storeu_ps(p, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn case() -> impl Strategy<Value = (usize, usize, usize, usize, usize, usize, bool, u64)> {
        (
            0usize..13,
            0usize..41,
            0usize..37,
            0usize..5,
            0usize..5,
            0usize..3,
            any::<bool>(),
            any::<u64>(),
        )
    }

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::SplitMix64::new(seed);
        (0..n).map(|_| rng.next_unit() as f32 * 2.0 - 1.0).collect()
    }

    proptest! {
        /// The kernel chosen on this CPU equals the portable one bit for bit, on ragged shapes,
        /// padded strides and both output modes.
        #[test]
        fn simd_equals_the_portable_kernel(
            (m, n, k, pa, pb, pc, acc, seed) in case()
        ) {
            let (ars, brs, crs) = (k + pa, n + pb, n + pc);
            let a = data(m * ars, seed);
            let b = data(k * brs, seed ^ 1);
            let c0 = data(m * crs, seed ^ 2);
            let (mut c1, mut c2) = (c0.clone(), c0.clone());
            fn view(data: &[f32], rows: usize, cols: usize, rs: usize) -> MatRef<'_> {
                MatRef { data, rows, cols, rs, cs: 1 }
            }
            fn out(data: &mut [f32], rows: usize, cols: usize, rs: usize) -> MatMut<'_> {
                MatMut { data, rows, cols, rs, cs: 1 }
            }
            sgemm_small(out(&mut c1, m, n, crs), view(&a, m, k, ars), view(&b, k, n, brs), acc);
            sgemm_small_reference(out(&mut c2, m, n, crs), view(&a, m, k, ars), view(&b, k, n, brs), acc);
            prop_assert_eq!(
                c1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                c2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            // And both are a matrix product (padding between rows untouched).
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|t| f64::from(a[i * ars + t]) * f64::from(b[t * brs + j])).sum::<f64>()
                        + if acc { f64::from(c0[i * crs + j]) } else { 0.0 };
                    prop_assert!((f64::from(c2[i * crs + j]) - want).abs() < 1e-4);
                }
                for j in n..crs {
                    prop_assert_eq!(c2[i * crs + j].to_bits(), c0[i * crs + j].to_bits());
                }
            }
        }
    }
}
