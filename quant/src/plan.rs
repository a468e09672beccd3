//! The quantization plan: everything the graph rewrite needs to emit a quantized model, decided
//! here over plain numbers (no ONNX, no files): per activation value its affine parameters, per
//! layer its weight storage (integer with scales, float16, or float) and its int32 bias.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

use crate::bias::{bias_shift, quantize_bias, BiasQuant, LayerKind};
use crate::numeric::f16_round;
use crate::range::ActQuant;
use crate::weights::{quantize_weights, ClipSearch, Grid, WeightQuant};

/// How one layer is stored and run.
#[derive(Debug, Clone, PartialEq)]
pub enum LayerQuant {
    /// Signed integer weights with one scale per output channel (or one for the tensor), and the
    /// bias as int32 on the scale `s_x * s_w`.
    Int {
        weight: WeightQuant,
        per_channel: bool,
        bias: Option<BiasQuant>,
    },
    /// float16 storage: the weights rounded to half precision, computed in float.
    Float16 { weight: Vec<f32> },
    /// Left as it is.
    Float,
}

impl LayerQuant {
    /// Weight bits as reports give them: 2..8 for integers, 16 for float16, `None` for float.
    pub fn bits(&self) -> Option<u8> {
        match self {
            LayerQuant::Int { weight, .. } => Some(weight.bits),
            LayerQuant::Float16 { .. } => Some(16),
            LayerQuant::Float => None,
        }
    }

    /// Bytes of the stored parameters (the report's estimate; the file adds its own framing).
    pub fn stored_bytes(&self, params: usize, bias_len: Option<usize>) -> usize {
        let bias = bias_len.unwrap_or(0) * 4;
        match self {
            LayerQuant::Int { weight, .. } => {
                (params * weight.bits as usize).div_ceil(8)
                    + weight.scales.len() * 4
                    + weight.zero_points.len().div_ceil(2)
                    + bias
            }
            LayerQuant::Float16 { .. } => params * 2 + bias,
            LayerQuant::Float => params * 4,
        }
    }
}

/// A quantized model's parameters; `V` identifies a value of the caller's graph.
#[derive(Debug, Clone)]
pub struct QuantPlan<V: Eq + Hash> {
    /// Activation parameters of every value that gets a QuantizeLinear/DequantizeLinear pair.
    pub activations: HashMap<V, ActQuant>,
    /// Every layer with constant weights, by name.
    pub layers: BTreeMap<String, LayerQuant>,
}

impl<V: Eq + Hash> QuantPlan<V> {
    /// Whether any weight or activation needs a 4-bit container (INT4/UINT4, opset 21).
    pub fn has_int4(&self) -> bool {
        self.layers
            .values()
            .any(|l| l.bits().is_some_and(|b| b <= 4))
            || self.activations.values().any(|a| a.bits == 4)
    }
}

/// One layer's weights as the planner sees them.
#[derive(Debug, Clone, Copy)]
pub struct LayerSpec<'a> {
    pub kind: LayerKind,
    /// Weight shape, output axis first for `Conv` and `DenseOutMajor`.
    pub shape: &'a [usize],
    pub weight: &'a [f32],
    pub bias: Option<&'a [f32]>,
}

/// How a layer is to be quantized.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerOptions {
    /// 2..=8 (integer), or 16 (float16 storage).
    pub bits: u8,
    /// One scale for the whole weight instead of one per output channel.
    pub per_tensor: bool,
    pub clip: ClipSearch,
    /// The grid of weights of 2..=4 bits (INT4 storage); wider ones are always symmetric.
    pub grid: Grid,
    /// Subtract the expected output shift of weight rounding from the bias.
    pub bias_correction: bool,
}

/// The grid weights of `bits` get when 2..=4-bit ones are asked to use `int4`: wider weights
/// stay symmetric, the grid ONNX Runtime's integer kernels and zq's int8 ones take.
pub fn grid_for(bits: u8, int4: Grid) -> Grid {
    if bits <= 4 {
        int4
    } else {
        Grid::Symmetric
    }
}

/// Plan one layer: float16 when asked for; otherwise integer weights where the layer's input is a
/// quantized activation (`input`), else float. `input_mean` (per input channel, on the
/// calibration images) drives the bias correction.
pub fn plan_layer(
    spec: &LayerSpec,
    input: Option<ActQuant>,
    input_mean: Option<&[f32]>,
    o: &LayerOptions,
) -> LayerQuant {
    if o.bits == 16 {
        return LayerQuant::Float16 {
            weight: spec.weight.iter().map(|&v| f16_round(v)).collect(),
        };
    }
    let Some(x) = input else {
        return LayerQuant::Float;
    };
    let per_channel = spec.kind.out_axis_first() && !o.per_tensor;
    let channels = if per_channel { spec.shape[0] } else { 1 };
    let weight = quantize_weights(
        spec.weight,
        channels,
        o.bits,
        o.clip,
        grid_for(o.bits, o.grid),
    );
    let bias = spec.bias.map(|b| {
        let mut bv = b.to_vec();
        if o.bias_correction {
            if let Some(shift) = input_mean
                .and_then(|mu| {
                    bias_shift(spec.kind, spec.weight, &weight.dequantize(), spec.shape, mu)
                })
                .filter(|s| s.len() == bv.len())
            {
                for (b, s) in bv.iter_mut().zip(shift) {
                    *b -= s;
                }
            }
        }
        quantize_bias(&bv, x.scale, &weight.scales, per_channel)
    });
    LayerQuant::Int {
        weight,
        per_channel,
        bias,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec<'a>(w: &'a [f32], b: Option<&'a [f32]>) -> LayerSpec<'a> {
        LayerSpec {
            kind: LayerKind::Conv,
            shape: &[2, 1, 1, 1],
            weight: w,
            bias: b,
        }
    }

    #[test]
    fn a_layer_is_integer_float16_or_float() {
        let x = ActQuant::uint8(0.0, 2.55);
        let o = LayerOptions {
            bits: 4,
            per_tensor: false,
            clip: ClipSearch::MinMax,
            grid: Grid::Symmetric,
            bias_correction: false,
        };
        let w = [0.7, -0.35];
        let l = plan_layer(&spec(&w, Some(&[0.1, 0.2])), Some(x), None, &o);
        let LayerQuant::Int {
            weight,
            per_channel,
            bias: Some(b),
        } = &l
        else {
            panic!("{l:?}")
        };
        assert!(*per_channel);
        assert_eq!(weight.q, vec![7, -7]);
        assert_eq!(b.scales.len(), 2);
        assert_eq!(l.bits(), Some(4));
        assert_eq!(l.stored_bytes(2, Some(2)), 1 + 8 + 8);
        // No quantized input: the layer stays float; 16 bits: float16 whatever the input.
        assert_eq!(
            plan_layer(&spec(&w, None), None, None, &o),
            LayerQuant::Float
        );
        let h = plan_layer(&spec(&w, None), None, None, &LayerOptions { bits: 16, ..o });
        assert_eq!(h.bits(), Some(16));
        assert_eq!(h.stored_bytes(2, None), 4);
    }

    #[test]
    fn bias_correction_moves_the_bias_by_the_rounding_shift() {
        let x = ActQuant::uint8(0.0, 2.55);
        let o = LayerOptions {
            bits: 2,
            per_tensor: true,
            clip: ClipSearch::MinMax,
            grid: Grid::Symmetric,
            bias_correction: true,
        };
        // Per-tensor 2-bit grid {-1, 0, 1} x 1.0: 0.4 rounds to 0, a shift of -0.4 x mean 2.
        let w = [1.0, 0.4];
        let s = LayerSpec {
            kind: LayerKind::Conv,
            shape: &[2, 1, 1, 1],
            weight: &w,
            bias: Some(&[0.0, 0.0]),
        };
        let plain = plan_layer(
            &s,
            Some(x),
            None,
            &LayerOptions {
                bias_correction: false,
                ..o
            },
        );
        let fixed = plan_layer(&s, Some(x), Some(&[2.0]), &o);
        let bias = |l: &LayerQuant| match l {
            LayerQuant::Int { bias: Some(b), .. } => b.q.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(bias(&plain), vec![0, 0]);
        // +0.8 on the scale 0.01 x 1.0.
        assert_eq!(bias(&fixed), vec![0, 80]);
    }
}
