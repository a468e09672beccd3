//! f32 matrix multiply over strided views, on the `gemm` crate's runtime-dispatched kernels.

/// A read-only strided matrix: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

/// A writable matrix, row-major (`cs == 1`) or column-major (`rs == 1`), so no two elements alias.
#[derive(Debug)]
pub struct MatMut<'a> {
    pub data: &'a mut [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// A contiguous row-major matrix.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }
    /// A row-major matrix whose rows start `rs` floats apart (`rs >= cols`).
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, rs: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            rs,
            cs: 1,
        }
    }
    /// The transpose of a contiguous row-major `rows x cols` matrix (a `cols x rows` view).
    pub fn transposed(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows: cols,
            cols: rows,
            rs: 1,
            cs: cols,
        }
    }
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

impl<'a> MatMut<'a> {
    /// A contiguous row-major matrix.
    pub fn rows(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        MatMut {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }
    /// A row-major matrix whose rows start `rs` floats apart (`rs >= cols`).
    pub fn strided(data: &'a mut [f32], rows: usize, cols: usize, rs: usize) -> Self {
        MatMut {
            data,
            rows,
            cols,
            rs,
            cs: 1,
        }
    }
    fn valid(&self) -> bool {
        let no_alias =
            (self.cs == 1 && self.rs >= self.cols) || (self.rs == 1 && self.cs >= self.rows);
        let in_bounds = self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len();
        (self.rows <= 1 || self.cols <= 1 || no_alias) && in_bounds
    }
}

/// Panic, naming `what`, unless `c = a · b` has matching shapes.
pub(crate) fn assert_product(what: &str, c: &MatMut<'_>, a: &MatRef<'_>, b: &MatRef<'_>) {
    assert!(
        a.rows == c.rows && b.cols == c.cols && a.cols == b.rows,
        "{what}: [{}x{}] = [{}x{}] . [{}x{}]",
        c.rows,
        c.cols,
        a.rows,
        a.cols,
        b.rows,
        b.cols
    );
}

/// `c = a · b`, or `c += a · b` when `accumulate`. `threads > 1` lets the kernel split the work
/// over rayon's pool. Panics when shapes disagree or a view reaches outside its slice.
pub fn sgemm(c: MatMut<'_>, a: MatRef<'_>, b: MatRef<'_>, accumulate: bool, threads: usize) {
    assert_product("sgemm", &c, &a, &b);
    assert!(
        a.in_bounds() && b.in_bounds(),
        "sgemm: input view out of bounds"
    );
    assert!(c.valid(), "sgemm: output view out of bounds or aliasing");
    assert!(
        [a.rs, a.cs, b.rs, b.cs, c.rs, c.cs]
            .iter()
            .all(|&s| s <= isize::MAX as usize),
        "sgemm: stride overflow"
    );
    if c.rows == 0 || c.cols == 0 {
        return;
    }
    if a.cols == 0 {
        if !accumulate {
            for i in 0..c.rows {
                for j in 0..c.cols {
                    c.data[i * c.rs + j * c.cs] = 0.0;
                }
            }
        }
        return;
    }
    let par = if threads > 1 {
        ::gemm::Parallelism::Rayon(threads)
    } else {
        ::gemm::Parallelism::None
    };
    // SAFETY: the asserts above establish that every (i, j) the kernel touches lies inside the
    // three slices, that the output's elements are distinct, and that `c` (a unique borrow) does
    // not overlap `a` or `b` (shared borrows).
    unsafe {
        ::gemm::gemm(
            c.rows,
            c.cols,
            a.cols,
            c.data.as_mut_ptr(),
            c.cs as isize,
            c.rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive(m: usize, n: usize, k: usize, a: &MatRef, b: &MatRef) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    s += f64::from(a.data[i * a.rs + p * a.cs])
                        * f64::from(b.data[p * b.rs + j * b.cs]);
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    proptest! {
        #[test]
        fn matches_the_definition(m in 1usize..40, n in 1usize..70, k in 1usize..50,
                                  ta in any::<bool>(), tb in any::<bool>(), acc in any::<bool>(),
                                  threads in 1usize..3, seed in any::<u64>()) {
            let mut s = seed | 1;
            let mut rnd = |len: usize| -> Vec<f32> {
                (0..len).map(|_| { s ^= s << 13; s ^= s >> 7; s ^= s << 17; (s % 2001) as f32 / 1000.0 - 1.0 }).collect()
            };
            let (av, bv) = (rnd(m * k), rnd(k * n));
            let a = if ta { MatRef::transposed(&av, k, m) } else { MatRef::rows(&av, m, k) };
            let b = if tb { MatRef::transposed(&bv, n, k) } else { MatRef::rows(&bv, k, n) };
            let init = rnd(m * n);
            let mut c = init.clone();
            sgemm(MatMut::rows(&mut c, m, n), a, b, acc, threads);
            let want = naive(m, n, k, &a, &b);
            for i in 0..m * n {
                let w = want[i] + if acc { init[i] } else { 0.0 };
                prop_assert!((c[i] - w).abs() <= 1e-4 * (k as f32), "{} vs {}", c[i], w);
            }
        }
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn short_slices_are_refused() {
        let a = vec![0f32; 5];
        let b = vec![0f32; 6];
        let mut c = vec![0f32; 6];
        sgemm(
            MatMut::rows(&mut c, 2, 3),
            MatRef::rows(&a, 2, 3),
            MatRef::rows(&b, 3, 3),
            false,
            1,
        );
    }
}
