//! zq-quant: quantizers, calibration observers and the sensitivity measure, over plain slices.
//!
//! No files, no ONNX: the `zq` crate feeds weights and activations in and implements
//! [`QuantModel`] so that sensitivity and mixed-precision search can run a model with a chosen
//! per-layer bit assignment.

#![forbid(unsafe_code)]

pub mod observer;
pub mod pareto;
pub mod scheme;
pub mod sensitivity;

pub use scheme::{quantize_weights, ClipSearch, QRange, WeightQuant};
/// The numeric kernels (GEMM now, integer SIMD kernels later), re-exported for the zq crate.
pub use zq_kernels as kernels;

/// A quantizable layer as the search sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerInfo {
    pub name: String,
    /// Number of weight parameters.
    pub params: usize,
    /// Output channels (one scale each when per-channel).
    pub channels: usize,
}

/// What sensitivity analysis and mixed-precision search need from a model: its quantizable layers,
/// and its outputs on the calibration inputs when some layers' weights are quantized.
pub trait QuantModel {
    type Error: std::error::Error;
    fn layers(&self) -> &[LayerInfo];
    /// Flattened `[N, K]` outputs with layer `i` quantized to `bits[i]` bits (`None`: float).
    fn outputs(&mut self, bits: &[Option<u8>]) -> Result<Vec<f32>, Self::Error>;
}
