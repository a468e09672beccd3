//! Runtime dispatch for plain loops: [`vectorize`] runs a [`Kernel`] in a copy compiled for the
//! best instruction set this CPU has (AVX2+FMA on x86-64 where present, else the baseline), so the
//! compiler's auto-vectorisation can use it. `Kernel::run` and every function it calls must be
//! `#[inline(always)]` to be compiled into that copy (a call to an ordinary function runs the
//! baseline code).

/// A piece of work to compile per instruction set.
pub trait Kernel {
    type Output;
    /// Mark the implementation `#[inline(always)]`.
    fn run(self) -> Self::Output;
}

struct Dispatch<K>(K);

impl<K: Kernel> pulp::WithSimd for Dispatch<K> {
    type Output = K::Output;
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) -> Self::Output {
        self.0.run()
    }
}

/// Run `k` compiled for the best instruction set detected at run time, at most AVX2+FMA on
/// x86-64: the f32 GEMM is built with AVX-512 kernels, but auto-vectorised loops (Winograd
/// transforms, elementwise ops) measured twice as slow with 512-bit vectors on Zen 4, which
/// executes them as two 256-bit halves and pays for the masked remainders.
pub fn vectorize<K: Kernel>(k: K) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    if let Some(v3) = pulp::x86::V3::try_new() {
        return pulp::Simd::vectorize(v3, Dispatch(k));
    }
    pulp::Arch::new().dispatch(Dispatch(k))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Sum<'a>(&'a [f32]);

    impl Kernel for Sum<'_> {
        type Output = f32;
        #[inline(always)]
        fn run(self) -> f32 {
            self.0.iter().sum()
        }
    }

    #[test]
    fn runs_the_kernel_and_returns_its_value() {
        let v: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        assert_eq!(vectorize(Sum(&v)), 499500.0);
    }
}
