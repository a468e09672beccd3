//! zq: zero-shot (data-free) quantization of ONNX neural networks.
//!
//! Layers, from the bottom: `ir` (graph, ops, shape inference, passes), `onnx` (protobuf I/O),
//! `data` (image folders), `exec` (candle FP32 executor, ONNX Runtime oracle), `pipeline`
//! (inspect, eval), and `cli` (argument definitions and printing) used by the `zq` binary.
//! Distillation lives in the `zq-synth` crate and quantization in `zq-quant`; this crate
//! implements their model traits (`adapters`). Only zq-kernels may contain `unsafe`.

#![forbid(unsafe_code)]

pub mod adapters;
pub mod cli;
pub mod data;
pub mod error;
pub mod exec;
pub mod ir;
pub mod onnx;
pub mod pipeline;
pub mod units;

pub use error::{Error, ExitStatus, Result};
