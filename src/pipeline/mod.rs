//! Pipelines shared by the CLI and the tests.

pub mod eval;
pub mod inspect;
