//! The closed set of operators zq understands, with attributes already parsed.

use super::tensor::{DType, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoPad {
    NotSet,
    SameUpper,
    SameLower,
    Valid,
}

/// Convolution attributes. `pads` is `[begin_0.., end_0..]` (ONNX order); empty vectors mean defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvAttrs {
    pub kernel_shape: Option<Vec<usize>>,
    pub strides: Vec<usize>,
    pub dilations: Vec<usize>,
    pub pads: Vec<usize>,
    pub auto_pad: AutoPad,
    pub group: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolAttrs {
    pub kernel_shape: Vec<usize>,
    pub strides: Vec<usize>,
    pub dilations: Vec<usize>,
    pub pads: Vec<usize>,
    pub auto_pad: AutoPad,
    pub ceil_mode: bool,
    /// AveragePool only.
    pub count_include_pad: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PadMode {
    Constant,
    Reflect,
    Edge,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    // --- layers with weights
    /// inputs: X, W, B?
    Conv(ConvAttrs),
    /// inputs: A, B, C?
    Gemm {
        alpha: f32,
        beta: f32,
        trans_a: bool,
        trans_b: bool,
    },
    MatMul,
    /// inputs: X, scale, B, mean, var
    BatchNorm {
        epsilon: f32,
    },
    // --- activations
    Relu,
    /// inputs: X, min?, max?
    Clip,
    LeakyRelu {
        alpha: f32,
    },
    /// inputs: X, slope
    PRelu,
    Sigmoid,
    HardSigmoid {
        alpha: f32,
        beta: f32,
    },
    HardSwish,
    Tanh,
    Erf,
    // --- elementwise binary (numpy broadcasting)
    Add,
    Sub,
    Mul,
    Div,
    // --- pooling
    MaxPool(PoolAttrs),
    AveragePool(PoolAttrs),
    GlobalAveragePool,
    GlobalMaxPool,
    // --- layout
    Flatten {
        axis: i64,
    },
    /// inputs: data, shape
    Reshape {
        allowzero: bool,
    },
    Concat {
        axis: i64,
    },
    /// `coerce_2d`: opset < 13 semantics (flatten to 2-D around `axis`).
    Softmax {
        axis: i64,
        coerce_2d: bool,
    },
    /// inputs: data, pads, constant_value?, axes?
    Pad {
        mode: PadMode,
    },
    /// inputs: data, starts, ends, axes?, steps?
    Slice,
    Transpose {
        perm: Option<Vec<usize>>,
    },
    /// inputs: data, axes?
    Squeeze,
    /// inputs: data, axes
    Unsqueeze,
    Identity,
    Dropout,
    // --- shape arithmetic (folded away for a concrete batch size)
    Shape {
        start: i64,
        end: Option<i64>,
    },
    Gather {
        axis: i64,
    },
    /// input: shape
    ConstantOfShape {
        value: Tensor,
    },
    Cast {
        to: DType,
    },
    /// inputs: x, y_scale, y_zero_point (optional; its type is the output type, default uint8)
    QuantizeLinear {
        axis: i64,
    },
    /// inputs: x, x_scale, x_zero_point (optional)
    DequantizeLinear {
        axis: i64,
    },
}

impl Op {
    /// The ONNX op type.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Conv(_) => "Conv",
            Op::Gemm { .. } => "Gemm",
            Op::MatMul => "MatMul",
            Op::BatchNorm { .. } => "BatchNormalization",
            Op::Relu => "Relu",
            Op::Clip => "Clip",
            Op::LeakyRelu { .. } => "LeakyRelu",
            Op::PRelu => "PRelu",
            Op::Sigmoid => "Sigmoid",
            Op::HardSigmoid { .. } => "HardSigmoid",
            Op::HardSwish => "HardSwish",
            Op::Tanh => "Tanh",
            Op::Erf => "Erf",
            Op::Add => "Add",
            Op::Sub => "Sub",
            Op::Mul => "Mul",
            Op::Div => "Div",
            Op::MaxPool(_) => "MaxPool",
            Op::AveragePool(_) => "AveragePool",
            Op::GlobalAveragePool => "GlobalAveragePool",
            Op::GlobalMaxPool => "GlobalMaxPool",
            Op::Flatten { .. } => "Flatten",
            Op::Reshape { .. } => "Reshape",
            Op::Concat { .. } => "Concat",
            Op::Softmax { .. } => "Softmax",
            Op::Pad { .. } => "Pad",
            Op::Slice => "Slice",
            Op::Transpose { .. } => "Transpose",
            Op::Squeeze => "Squeeze",
            Op::Unsqueeze => "Unsqueeze",
            Op::Identity => "Identity",
            Op::Dropout => "Dropout",
            Op::Shape { .. } => "Shape",
            Op::Gather { .. } => "Gather",
            Op::ConstantOfShape { .. } => "ConstantOfShape",
            Op::Cast { .. } => "Cast",
            Op::QuantizeLinear { .. } => "QuantizeLinear",
            Op::DequantizeLinear { .. } => "DequantizeLinear",
        }
    }

    /// How many inputs the op takes, (required, at most), optional ones counted. Every op is
    /// listed: a new op must say its arity here before the reader accepts it.
    pub fn arity(&self) -> (usize, usize) {
        match self {
            Op::Conv(_) | Op::Gemm { .. } => (2, 3),
            Op::BatchNorm { .. } => (5, 5),
            Op::Clip => (1, 3),
            Op::PRelu
            | Op::Add
            | Op::Sub
            | Op::Mul
            | Op::Div
            | Op::MatMul
            | Op::Reshape { .. }
            | Op::Gather { .. }
            | Op::Unsqueeze => (2, 2),
            Op::Pad { .. } => (2, 4),
            Op::Slice => (3, 5),
            Op::Squeeze => (1, 2),
            Op::Dropout => (1, 3),
            Op::QuantizeLinear { .. } | Op::DequantizeLinear { .. } => (2, 3),
            Op::Concat { .. } => (1, usize::MAX),
            Op::Relu
            | Op::LeakyRelu { .. }
            | Op::Sigmoid
            | Op::HardSigmoid { .. }
            | Op::HardSwish
            | Op::Tanh
            | Op::Erf
            | Op::MaxPool(_)
            | Op::AveragePool(_)
            | Op::GlobalAveragePool
            | Op::GlobalMaxPool
            | Op::Flatten { .. }
            | Op::Softmax { .. }
            | Op::Transpose { .. }
            | Op::Identity
            | Op::Shape { .. }
            | Op::ConstantOfShape { .. }
            | Op::Cast { .. } => (1, 1),
        }
    }

    /// How many outputs zq supports (Dropout's optional mask is the only second one).
    pub fn max_outputs(&self) -> usize {
        match self {
            Op::Dropout => 2,
            _ => 1,
        }
    }

    /// Layers whose weights a quantizer acts on (when the weight is a constant).
    pub fn is_weighted(&self) -> bool {
        matches!(self, Op::Conv(_) | Op::Gemm { .. } | Op::MatMul)
    }
}
