//! Pipelines shared by the CLI and the tests.

pub mod bench;
pub mod distill;
pub mod eval;
pub mod inspect;
pub mod packed;
pub mod plot;
pub mod quantize;
pub mod run;
