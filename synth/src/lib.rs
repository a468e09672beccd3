//! zq-synth: data-free synthesis of calibration inputs (ZeroQ and Genie-D).
//!
//! The crate knows nothing of files or ONNX. Distillation steps through [`TapGrad`]: a forward pass
//! that reports the per-channel moments of every BatchNormalization input, and a backward pass that
//! turns the loss gradient at those inputs into the gradient at the model input. [`Autograd`]
//! provides it for any [`TapModel`] (a model that hands back the BN inputs as candle tensors); the
//! `zq` crate implements both, the former with its own tape engine.

#![forbid(unsafe_code)]

pub mod adam;
pub mod engine;
pub mod genie;
pub mod zeroq;

pub use engine::{Autograd, Coeffs, Moments, TapGrad};

use candle_core::{Result, Tensor};

/// The statistics one BatchNormalization layer remembers from training.
#[derive(Debug, Clone, PartialEq)]
pub struct BnTarget {
    /// Node name, for reports.
    pub name: String,
    /// running_mean, per channel.
    pub mean: Vec<f32>,
    /// sqrt(running_var + eps), per channel.
    pub std: Vec<f32>,
    /// The layer's epsilon (added to the batch variance as well).
    pub eps: f32,
}

/// What distillation needs from a model.
pub trait TapModel {
    /// Shape of the input batch, `[N, C, H, W]`.
    fn input_shape(&self) -> Vec<usize>;
    /// The BatchNormalization layers, in the order [`TapModel::forward_taps`] returns their inputs.
    fn bn_targets(&self) -> &[BnTarget];
    /// Run the model on `x` and return the input of every BatchNormalization layer, differentiable
    /// with respect to `x`.
    fn forward_taps(&self, x: &Tensor) -> Result<Vec<Tensor>>;
}
