//! zq-kernels: numeric kernels behind safe, bounds-checked interfaces. This is the only crate of
//! zq that contains `unsafe`; every unsafe call states the invariant its checks establish.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod gemm;
pub mod int8;
pub mod rng;
pub mod simd;
pub mod small;
pub mod stats;
pub mod team;
