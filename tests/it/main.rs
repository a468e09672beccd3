//! zq's integration tests: one binary, driving the real `zq` executable and the library.

mod cli;
mod conformance;
mod distill;
mod exec;
mod fuzz;
mod hostile;
mod layout;
mod man;
mod native;
mod quantize;
mod refine;
mod run;
mod shared;
mod synth;
mod util;
