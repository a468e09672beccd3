//! `zq inspect`: what a model is made of, and what zq can do with it.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde::Serialize;

use crate::error::Result;
use crate::exec::Plan;
use crate::ir::passes::{self, BnInfo};
use crate::ir::{Dim, Op};
use crate::onnx::read_model;

#[derive(Debug, Serialize)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions; the batch dimension is given by its symbolic name (or "N").
    pub shape: Vec<serde_json::Value>,
}

#[derive(Debug, Serialize)]
pub struct QuantLayer {
    pub name: String,
    pub op: String,
    pub weight: String,
    pub weight_shape: Vec<usize>,
    pub params: usize,
    pub output_channels: usize,
    pub has_bias: bool,
}

#[derive(Debug, Serialize)]
pub struct Sizes {
    /// All float parameters at 4 bytes.
    pub fp32_bytes: u64,
    /// Quantizable weights at 8 bits with per-channel f32 scales, int32 biases, BatchNormalization
    /// folded where it can be, other parameters in float.
    pub int8_bytes: u64,
    /// The same with 4-bit weights (two per byte).
    pub int4_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct InspectReport {
    pub model: String,
    pub file_bytes: u64,
    pub ir_version: i64,
    pub opset: i64,
    pub producer: String,
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
    /// Op histogram of the file as stored.
    pub ops: BTreeMap<String, usize>,
    /// Op histogram after shape arithmetic is folded for a fixed batch size (what zq executes).
    pub ops_executed: BTreeMap<String, usize>,
    pub params: usize,
    pub quantizable_layers: Vec<QuantLayer>,
    pub bn_layers: Vec<BnInfo>,
    pub size: Sizes,
    pub warnings: Vec<String>,
}

fn dims_json(dims: &[Dim]) -> Vec<serde_json::Value> {
    dims.iter()
        .map(|d| match d {
            Dim::Fixed(n) => serde_json::Value::from(*n),
            Dim::Sym(s) if s.is_empty() => serde_json::Value::from("N"),
            Dim::Sym(s) => serde_json::Value::from(s.as_str()),
        })
        .collect()
}

pub fn inspect(path: &Path) -> Result<InspectReport> {
    let model = read_model(path)?;
    let g0 = &model.graph;
    let plan = Plan::new(g0, 1)?;
    let g = &plan.graph;

    let batch_name = g0
        .inputs
        .first()
        .and_then(|i| i.dims.first())
        .map(|d| match d {
            Dim::Sym(s) if !s.is_empty() => s.clone(),
            _ => "N".to_string(),
        });
    let inputs = g0
        .inputs
        .iter()
        .map(|i| TensorInfo {
            name: g0.values[i.value].name.clone(),
            shape: dims_json(&i.dims),
        })
        .collect();
    let outputs = g
        .outputs
        .iter()
        .map(|&o| {
            let s = g.values[o].shape.clone().unwrap_or_default();
            let mut shape: Vec<serde_json::Value> = s.iter().map(|&d| d.into()).collect();
            if let (Some(first), Some(b)) = (shape.first_mut(), &batch_name) {
                *first = b.as_str().into();
            }
            TensorInfo {
                name: g.values[o].name.clone(),
                shape,
            }
        })
        .collect();

    let bn_layers = passes::bn_layers(g);
    let folded_bn: HashSet<&str> = bn_layers
        .iter()
        .filter(|b| b.foldable)
        .map(|b| b.node.as_str())
        .collect();

    let mut quantizable_layers = Vec::new();
    let mut weight_ids = HashSet::new();
    for n in &g.nodes {
        if !n.op.is_weighted() {
            continue;
        }
        let Some(w) = n.input(1) else { continue };
        let Some(t) = g.konst(w) else { continue };
        if !t.is_float() {
            continue;
        }
        let output_channels = match &n.op {
            Op::Conv(_) => t.shape[0],
            Op::Gemm { trans_b: true, .. } => t.shape[0],
            _ => *t.shape.last().unwrap_or(&1),
        };
        weight_ids.insert(w);
        quantizable_layers.push(QuantLayer {
            name: n.name.clone(),
            op: n.op.name().to_string(),
            weight: g.values[w].name.clone(),
            weight_shape: t.shape.clone(),
            params: t.len(),
            output_channels,
            has_bias: n.input(2).is_some(),
        });
    }

    // Parameter accounting over float constants used by executed nodes.
    let mut seen = HashSet::new();
    let (mut params, mut other_float) = (0usize, 0usize);
    for n in &g.nodes {
        let bn_folds = folded_bn.contains(n.name.as_str());
        for (slot, v) in n.inputs.iter().enumerate() {
            let Some(v) = *v else { continue };
            let Some(t) = g.konst(v) else { continue };
            if !t.is_float() || !seen.insert(v) {
                continue;
            }
            params += t.len();
            if weight_ids.contains(&v) {
                continue;
            }
            // Folded BatchNormalization parameters vanish into the layer; biases become int32
            // and are counted with the per-channel overhead below.
            let folded = bn_folds && slot > 0;
            let bias = n.op.is_weighted() && slot == 2;
            if !folded && !bias {
                other_float += t.len();
            }
        }
    }
    let qweights: usize = quantizable_layers.iter().map(|l| l.params).sum();
    let channels: usize = quantizable_layers.iter().map(|l| l.output_channels).sum();
    // Every quantized layer ends up with a bias (folded BN adds one) and a scale per channel.
    let per_channel_overhead = (channels * (4 + 4)) as u64;
    let float_rest = (other_float * 4) as u64;
    let size = Sizes {
        fp32_bytes: (params * 4) as u64,
        int8_bytes: qweights as u64 + per_channel_overhead + float_rest,
        int4_bytes: (qweights as u64).div_ceil(2) + per_channel_overhead + float_rest,
    };

    let mut warnings = Vec::new();
    if bn_layers.is_empty() {
        warnings.push(
            "no BatchNormalization layers: data-free distillation (zq distill) is impossible; export the model keeping BatchNormalization (PyTorch: torch.onnx.export(..., training=TrainingMode.PRESERVE, dynamo=False)) or calibrate on real images".into(),
        );
    }
    for b in &bn_layers {
        if !b.foldable {
            warnings.push(format!(
                "BatchNormalization '{}' cannot be folded: {}",
                b.node, b.reason
            ));
        }
    }
    if quantizable_layers.is_empty() {
        warnings
            .push("no Conv/Gemm/MatMul layer with constant weights: nothing to quantize".into());
    }

    let hist = |g: &crate::ir::Graph| g.op_histogram().into_iter().collect::<BTreeMap<_, _>>();
    let ops = model.op_counts.clone();
    Ok(InspectReport {
        model: path.display().to_string(),
        file_bytes: model.file_bytes,
        ir_version: model.ir_version,
        opset: g0.opset,
        producer: g0.producer.clone(),
        inputs,
        outputs,
        ops,
        ops_executed: hist(g),
        params,
        quantizable_layers,
        bn_layers,
        size,
        warnings,
    })
}
