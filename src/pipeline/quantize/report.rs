//! What `zq quantize` reports, and the output file's bytes: per-layer bits and the ONNX Runtime
//! kernel each layer gets, activation ranges, sizes, the quality estimate, the Pareto search.

use std::collections::BTreeMap;

use serde::Serialize;
use zq_quant::{LayerQuant, QuantPlan};

use super::OutputFormat;
use crate::error::Result;
use crate::ir::{Graph, Op, ValueId};

/// The result of the mixed-precision search.
#[derive(Debug, Clone, Serialize)]
pub struct ParetoReport {
    pub budget: u64,
    pub candidate_bits: Vec<u8>,
    /// Layer names, in the order of every `bits` vector below.
    pub layers: Vec<String>,
    /// Sensitivity table: layer -> (bits, KL).
    pub sensitivity: Vec<Vec<(u8, f64)>>,
    pub frontier: Vec<zq_quant::pareto::Point>,
    pub chosen: zq_quant::pareto::Point,
    /// Uniform assignments (every layer at one width), for comparison.
    pub uniform: Vec<zq_quant::pareto::Point>,
    pub predicted_bytes: u64,
    /// Bit-operations per image of the chosen assignment (MACs x weight bits x input activation
    /// bits).
    pub chosen_bops: u64,
    pub bops_budget: Option<u64>,
    /// Multiply-accumulates per image of each layer (same order as `layers`).
    pub macs: Vec<u64>,
    /// Activation bits of each layer's input, which the BOPs count multiplies by.
    pub abits: Vec<u8>,
    /// With `--pareto-abits`: per layer, (input bits, KL with only that input quantized).
    pub act_sensitivity: Vec<Vec<(u8, f64)>>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    pub name: String,
    pub op: String,
    /// 2..8 integer bits, 16 for float16 storage, null when left in float.
    pub bits: Option<u8>,
    /// Bits of its input activation (null when the input is not quantized).
    pub abits: Option<u8>,
    pub params: usize,
    /// How ONNX Runtime (CPU) will run it.
    pub kernel: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct ActReport {
    pub tensor: String,
    /// Integer width of the quantized activation (uint8 container above 4 bits, uint4 below).
    pub bits: u8,
    pub observed: [f32; 2],
    pub range: [f32; 2],
    pub scale: f32,
    pub zero_point: u8,
}

#[derive(Debug, Clone, Serialize)]
pub struct Quality {
    pub images: usize,
    /// Fraction of held-out images where the quantized and FP32 models pick the same class.
    pub agreement: f64,
    /// Mean KL(FP32 || quantized) of the softmax outputs.
    pub kl: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct QuantizeReport {
    pub model: String,
    pub bn_folded: usize,
    pub calibration: String,
    pub calibration_images: usize,
    pub layers: Vec<LayerReport>,
    pub activations: Vec<ActReport>,
    pub fp32_weight_bytes: usize,
    pub quantized_weight_bytes: usize,
    pub quality: Option<Quality>,
    pub pareto: Option<ParetoReport>,
    pub refine: Option<super::refine::RefineReport>,
}

/// Every planned layer in graph order, with the kernel class ONNX Runtime gives it, and the
/// FP32 and stored parameter bytes.
pub fn layers(g: &Graph, plan: &QuantPlan<ValueId>) -> (Vec<LayerReport>, usize, usize) {
    let (mut fp32, mut stored) = (0, 0);
    let mut out = Vec::new();
    for n in &g.nodes {
        let (Some(w), Some(l)) = (
            n.input(1)
                .and_then(|w| g.konst(w))
                .filter(|_| n.op.is_weighted()),
            plan.layers.get(&n.name),
        ) else {
            continue;
        };
        let params = w.len();
        let bias_len = n.input(2).and_then(|b| g.konst(b)).map(|b| b.len());
        fp32 += params * 4;
        stored += l.stored_bytes(params, bias_len);
        let abits = n
            .input(0)
            .and_then(|x| plan.activations.get(&x))
            .map(|a| a.bits);
        let int8 = |w: &zq_quant::WeightQuant| w.bits == 8 && abits == Some(8);
        let kernel = match (l, &n.op) {
            (LayerQuant::Float16 { .. }, _) => "float16 weights, float kernel",
            (LayerQuant::Int { weight, .. }, Op::Conv(_)) if int8(weight) => "QLinearConv (int8)",
            (LayerQuant::Int { weight, .. }, Op::Gemm { .. } | Op::MatMul) if int8(weight) => {
                "QGemm/QLinearMatMul (int8)"
            }
            (LayerQuant::Int { .. }, _) => "dequantized weights, float kernel",
            (LayerQuant::Float, _) => "float",
        };
        out.push(LayerReport {
            name: n.name.clone(),
            op: n.op.name().to_string(),
            bits: l.bits(),
            abits,
            params,
            kernel,
        });
    }
    (out, fp32, stored)
}

/// Serialise a quantized graph in `format`; `layers` gives each layer's storage for the
/// safetensors plan.
pub fn serialize(
    qg: &Graph,
    format: OutputFormat,
    model: &str,
    layers: &[LayerReport],
) -> Result<Vec<u8>> {
    use prost::Message;
    Ok(match format {
        OutputFormat::Onnx => crate::onnx::write::to_model(qg).encode_to_vec(),
        OutputFormat::Safetensors => {
            let bits: BTreeMap<String, Option<u8>> =
                layers.iter().map(|l| (l.name.clone(), l.bits)).collect();
            crate::pipeline::packed::to_safetensors(qg, model, &bits)?
        }
    })
}

/// Argmax agreement and mean KL(p || q) between two [N, K] output tables.
pub fn compare(a: &[f32], b: &[f32], k: usize) -> Quality {
    use zq_quant::sensitivity::{agreement, kl_divergence};
    Quality {
        images: a.len() / k.max(1),
        agreement: agreement(a, b, k),
        kl: kl_divergence(a, b, k),
    }
}
