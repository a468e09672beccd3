//! ONNX protobuf I/O. `proto` is prost output committed to the repository (see `regen.sh`), so
//! building zq needs no protoc.

#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
pub mod proto;
pub mod read;
pub mod write;

pub use read::{read_model, Model};
pub use write::{write_atomic, write_model};
