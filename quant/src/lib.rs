//! zq-quant: the quantization algorithms, over plain numbers.
//!
//! Range observers and priors (`observer`, `range`), weight quantizers (`weights`), bias
//! correction and int32 biases (`bias`), the size/BOPs cost model (`cost`), ZeroQ sensitivity
//! (`sensitivity`), the Pareto search and its infeasibility diagnosis (`pareto`), and the result
//! of it all, a [`QuantPlan`] (`plan`). No files, no ONNX: the `zq` crate turns a plan into a
//! graph and implements [`sensitivity::Perturb`] over its executor.

#![forbid(unsafe_code)]

pub mod bias;
pub mod cost;
pub mod numeric;
pub mod observer;
pub mod pareto;
pub mod plan;
pub mod range;
pub mod refine;
pub mod sensitivity;
pub mod weights;

pub use numeric::{argmax, f16_round, round_half_even};
pub use plan::{plan_layer, LayerOptions, LayerQuant, LayerSpec, QuantPlan};
pub use range::{ActQuant, Prior};
pub use weights::{quantize_weights, ClipSearch, Grid, QRange, WeightQuant};
