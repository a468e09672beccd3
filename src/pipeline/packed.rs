//! `zq quantize --format safetensors`: the quantized model's parameters as packed integers with
//! their scales, plus a JSON plan in the header (format `zq.quantized.v1`, docs/formats.md).
//! Everything is read back from the QDQ graph zq emits, so both formats describe one model.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::ir::{DType, Graph, Op, ValueId};

pub const FORMAT: &str = "zq.quantized.v1";

#[derive(Debug, Serialize)]
struct ActParams {
    tensor: String,
    scale: f32,
    zero_point: i64,
    dtype: &'static str,
}

#[derive(Debug, Serialize)]
struct LayerPlan {
    name: String,
    op: String,
    bits: u8,
    weight_shape: Vec<usize>,
    /// Axis of the per-channel scales (null: one scale for the tensor).
    axis: Option<usize>,
    /// "int8" (one value per byte), "int4x2" (two per byte, first element in the low nibble),
    /// "float16" or "float32" (layers stored in float: no scale, the bias in float too).
    packing: &'static str,
    weight: String,
    weight_scale: Option<String>,
    /// Per-channel zero points of an affine INT4 weight; left out of the plan when all zero,
    /// so symmetric models keep the header they had.
    #[serde(skip_serializing_if = "Option::is_none")]
    weight_zero_point: Option<String>,
    bias: Option<String>,
    bias_scale: Option<String>,
    input: Option<ActParams>,
}

#[derive(Debug, Serialize)]
struct Plan {
    format: &'static str,
    zq_version: &'static str,
    model: String,
    layers: Vec<LayerPlan>,
    activations: Vec<ActParams>,
    /// Float constants the model still needs (layers kept in float, other parameters).
    float_tensors: Vec<String>,
}

/// Signed values in [-8, 7], two per byte, first in the low nibble (as ONNX packs INT4).
pub fn pack_int4(v: &[i64]) -> Vec<u8> {
    crate::ir::qdq::pack4(v)
}

/// Inverse of [`pack_int4`] for `n` values.
pub fn unpack_int4(b: &[u8], n: usize) -> Vec<i64> {
    crate::ir::qdq::unpack4(b, n, true)
}

/// The DequantizeLinear producing `v` with all-constant inputs: (q, scale, zero point, axis).
fn const_dq(
    g: &Graph,
    prod: &HashMap<ValueId, usize>,
    v: ValueId,
) -> Option<(ValueId, ValueId, Option<ValueId>, i64)> {
    let n = &g.nodes[*prod.get(&v)?];
    let Op::DequantizeLinear { axis } = n.op else {
        return None;
    };
    let (q, s) = (n.input(0)?, n.input(1)?);
    g.konst(q)?;
    Some((q, s, n.input(2), axis))
}

/// A float16 constant cast to float (how float16 storage appears in the graph).
fn const_f16(g: &Graph, prod: &HashMap<ValueId, usize>, v: ValueId) -> Option<ValueId> {
    let n = &g.nodes[*prod.get(&v)?];
    let Op::Cast { to: DType::F32 } = n.op else {
        return None;
    };
    let h = n.input(0)?;
    (g.konst(h)?.dtype == DType::F16).then_some(h)
}

/// Serialise the quantized graph's parameters; `bits` gives each layer's weight bits (16:
/// float16, `None`: float). Every weighted layer is stored, whatever its storage.
pub fn to_safetensors(
    qg: &Graph,
    model: &str,
    bits: &BTreeMap<String, Option<u8>>,
) -> Result<Vec<u8>> {
    let prod = qg.producers();
    let mut tensors: BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> = BTreeMap::new();
    let f32_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let scalar = |v: ValueId| qg.konst(v).map(|t| t.to_f32_vec()).unwrap_or_default();
    let mut layers = Vec::new();
    let mut used = std::collections::HashSet::new();
    for n in qg.nodes.iter().filter(|n| n.op.is_weighted()) {
        let Some(w_in) = n.input(1) else { continue };
        let Some((wq, ws, wz, axis)) = const_dq(qg, &prod, w_in) else {
            // Stored in float: float16 behind a Cast, or a float constant kept as it is.
            let (wv, dt, packing, lb) = match const_f16(qg, &prod, w_in) {
                Some(h) => (h, safetensors::Dtype::F16, "float16", 16),
                None => match qg.konst(w_in) {
                    Some(t) if t.dtype == DType::F32 => {
                        (w_in, safetensors::Dtype::F32, "float32", 32)
                    }
                    _ => continue,
                },
            };
            let t = qg.konst(wv).unwrap();
            let data = if dt == safetensors::Dtype::F16 {
                t.to_f32_vec()
                    .iter()
                    .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                    .collect()
            } else {
                f32_bytes(&t.to_f32_vec())
            };
            let wname = format!("{}.weight", n.name);
            tensors.insert(wname.clone(), (dt, t.shape.clone(), data));
            used.insert(wv);
            let bias = n
                .input(2)
                .and_then(|b| qg.konst(b).map(|t| (b, t)))
                .map(|(b, t)| {
                    let bname = format!("{}.bias", n.name);
                    tensors.insert(
                        bname.clone(),
                        (
                            safetensors::Dtype::F32,
                            t.shape.clone(),
                            f32_bytes(&t.to_f32_vec()),
                        ),
                    );
                    used.insert(b);
                    bname
                });
            layers.push(LayerPlan {
                name: n.name.clone(),
                op: n.op.name().to_string(),
                bits: bits.get(&n.name).copied().flatten().unwrap_or(lb),
                weight_shape: t.shape.clone(),
                axis: None,
                packing,
                weight: wname,
                weight_scale: None,
                weight_zero_point: None,
                bias,
                bias_scale: None,
                input: None,
            });
            continue;
        };
        let b = bits.get(&n.name).copied().flatten().unwrap_or(8);
        let wt = qg.konst(wq).unwrap();
        let q = wt.to_i64_vec();
        let (packing, data, dt) = if b <= 4 {
            ("int4x2", pack_int4(&q), safetensors::Dtype::U8)
        } else {
            (
                "int8",
                q.iter().map(|&v| v as i8 as u8).collect(),
                safetensors::Dtype::I8,
            )
        };
        let wname = format!("{}.weight", n.name);
        let plen = data.len();
        tensors.insert(
            wname.clone(),
            (dt, if b <= 4 { vec![plen] } else { wt.shape.clone() }, data),
        );
        let scales = scalar(ws);
        let per_channel = scales.len() > 1;
        tensors.insert(
            format!("{wname}_scale"),
            (
                safetensors::Dtype::F32,
                vec![scales.len()],
                f32_bytes(&scales),
            ),
        );
        let zero_points: Vec<i64> = wz
            .and_then(|z| qg.konst(z))
            .map(|t| t.to_i64_vec())
            .unwrap_or_default();
        let weight_zero_point = zero_points.iter().any(|&z| z != 0).then(|| {
            let name = format!("{wname}_zero_point");
            tensors.insert(
                name.clone(),
                (
                    safetensors::Dtype::I8,
                    vec![zero_points.len()],
                    zero_points.iter().map(|&z| z as i8 as u8).collect(),
                ),
            );
            name
        });
        let (mut bias, mut bias_scale) = (None, None);
        if let Some((bq, bs, _, _)) = n.input(2).and_then(|v| const_dq(qg, &prod, v)) {
            let bt = qg.konst(bq).unwrap();
            let bv: Vec<u8> = bt
                .to_i64_vec()
                .iter()
                .flat_map(|&v| (v as i32).to_le_bytes())
                .collect();
            let bname = format!("{}.bias", n.name);
            tensors.insert(
                bname.clone(),
                (safetensors::Dtype::I32, bt.shape.clone(), bv),
            );
            let s = scalar(bs);
            tensors.insert(
                format!("{bname}_scale"),
                (safetensors::Dtype::F32, vec![s.len()], f32_bytes(&s)),
            );
            bias = Some(bname.clone());
            bias_scale = Some(format!("{bname}_scale"));
            used.insert(bq);
        }
        used.insert(wq);
        // The layer's input activation: produced by a DequantizeLinear of a run-time tensor.
        let input = n
            .input(0)
            .and_then(|x| prod.get(&x))
            .map(|&i| &qg.nodes[i])
            .and_then(|d| {
                let Op::DequantizeLinear { .. } = d.op else {
                    return None;
                };
                let qn = &qg.nodes[*prod.get(&d.input(0)?)?];
                Some(ActParams {
                    tensor: qg.values[qn.input(0)?].name.clone(),
                    scale: scalar(d.input(1)?).first().copied()?,
                    zero_point: d
                        .input(2)
                        .and_then(|z| qg.konst(z))
                        .map_or(0, |t| t.to_i64_vec()[0]),
                    dtype: "uint8",
                })
            });
        layers.push(LayerPlan {
            name: n.name.clone(),
            op: n.op.name().to_string(),
            bits: b,
            weight_shape: wt.shape.clone(),
            axis: per_channel.then_some(axis.max(0) as usize),
            packing,
            weight: wname.clone(),
            weight_scale: Some(format!("{wname}_scale")),
            weight_zero_point,
            bias,
            bias_scale,
            input,
        });
    }
    let mut activations = Vec::new();
    for n in &qg.nodes {
        if let Op::QuantizeLinear { .. } = n.op {
            let (Some(x), Some(s)) = (n.input(0), n.input(1)) else {
                continue;
            };
            if qg.konst(x).is_some() {
                continue;
            }
            let zp = n.input(2).and_then(|z| qg.konst(z));
            activations.push(ActParams {
                tensor: qg.values[x].name.clone(),
                scale: scalar(s).first().copied().unwrap_or(1.0),
                zero_point: zp.map_or(0, |t| t.to_i64_vec()[0]),
                dtype: if zp.is_some_and(|t| t.dtype == DType::I8) {
                    "int8"
                } else {
                    "uint8"
                },
            });
        }
    }
    // Float constants consumed by compute nodes (not by the QDQ pairs, not quantized weights).
    let mut float_tensors = Vec::new();
    for n in &qg.nodes {
        if matches!(
            n.op,
            Op::QuantizeLinear { .. } | Op::DequantizeLinear { .. }
        ) {
            continue;
        }
        for v in n.inputs.iter().flatten() {
            if let Some(t) = qg.konst(*v) {
                if t.dtype == DType::F32 && !used.contains(v) {
                    let name = qg.values[*v].name.clone();
                    if !tensors.contains_key(&name) {
                        tensors.insert(
                            name.clone(),
                            (
                                safetensors::Dtype::F32,
                                t.shape.clone(),
                                f32_bytes(&t.to_f32_vec()),
                            ),
                        );
                        float_tensors.push(name);
                    }
                }
            }
        }
    }
    let plan = Plan {
        format: FORMAT,
        zq_version: env!("CARGO_PKG_VERSION"),
        model: model.to_string(),
        layers,
        activations,
        float_tensors,
    };
    let meta = serde_json::to_string(&plan).map_err(|e| Error::Exec(e.to_string()))?;
    let views = tensors
        .iter()
        .map(|(k, (dt, shape, data))| {
            safetensors::tensor::TensorView::new(*dt, shape.clone(), data)
                .map(|v| (k.clone(), v))
                .map_err(|e| Error::Exec(format!("safetensors: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let header = HashMap::from([("zq".to_string(), meta)]);
    safetensors::tensor::serialize(views, Some(header))
        .map_err(|e| Error::Exec(format!("safetensors: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int4_packing_round_trips_low_nibble_first() {
        let v = vec![-8, 7, 0, -1, 3];
        let p = pack_int4(&v);
        assert_eq!(p, vec![0x78, 0xF0, 0x03]);
        assert_eq!(unpack_int4(&p, 5), v);
    }
}
