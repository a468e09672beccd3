//! The algorithm crates' model traits, implemented over zq's executors: `synth` gives zq-synth
//! the BatchNormalization taps (the tape engine, or candle's autograd over the reference
//! executor); `quant` gives zq-quant's sensitivity measurement a model it can perturb one layer
//! at a time. The executors themselves know nothing of either crate.

pub mod quant;
pub mod synth;
