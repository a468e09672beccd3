//! Compiled engines: a specialised graph lowered once into steps over buffers allocated once.
//! `tape` is the f32 engine distillation steps through (forward to the BatchNormalization
//! inputs, the input gradient back, channels-last, one image per task on each core), with
//! `wino`'s Winograd F(4x4, 3x3) convolutions. The reference executor (`exec::Plan`) stays the
//! definition of what every op computes; the compiled engines are checked against it.

pub mod infer;
pub mod tape;
pub mod wino;
