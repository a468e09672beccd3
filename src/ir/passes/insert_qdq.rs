//! QuantizeLinear/DequantizeLinear insertion: the graph rewrite that turns a [`QuantPlan`] into a
//! standard QDQ model. Per-tensor uint8 Q -> DQ pairs on every planned activation; integer
//! weights as constant initializers (INT4 at opset 21 for 4 bits and fewer) behind a
//! DequantizeLinear along the output axis; int32 biases with scale `s_x * s_w`; float16 weights
//! as a half-precision initializer and a Cast back to float. The algorithms that chose these
//! numbers live in zq-quant; this pass only places them.

use std::collections::{HashMap, HashSet};

use zq_quant::{ActQuant, LayerQuant, QuantPlan};

use crate::error::{Error, Result};
use crate::ir::{DType, Data, Graph, Node, Op, Tensor, ValueId};

/// Per-axis QuantizeLinear/DequantizeLinear need opset 13; INT4 initializers need 21.
const OPSET_PER_AXIS_QDQ: i64 = 13;
const OPSET_INT4: i64 = 21;

/// The rewritten graph: `g` with the plan's quantization inserted (same values and nodes, plus
/// the new ones, in an order that stays topological).
pub fn insert_qdq(g: &Graph, plan: &QuantPlan<ValueId>) -> Result<Graph> {
    let mut q = g.clone();
    q.opset = q.opset.max(OPSET_PER_AXIS_QDQ);
    if plan.has_int4() {
        q.opset = q.opset.max(OPSET_INT4);
    }
    let mut nodes: Vec<Node> = Vec::with_capacity(g.nodes.len() * 3);
    let mut remap: HashMap<ValueId, ValueId> = HashMap::new();
    // ONNX Runtime 1.32 fuses DequantizeLinear -> Conv/Gemm/MatMul with 8-bit weights into its
    // integer kernels without checking the activation's type, and then rejects a uint4 input:
    // 4-bit activations read by such a layer live in uint8 behind a Clip (the same levels).
    let wide_readers: HashSet<ValueId> = g
        .nodes
        .iter()
        .filter(|n| {
            matches!(plan.layers.get(&n.name), Some(LayerQuant::Int { weight, .. }) if weight.bits > 4)
        })
        .filter_map(|n| n.input(0))
        .collect();
    let uint4 = |v: ValueId| !wide_readers.contains(&v);
    for i in &g.inputs {
        if let Some(a) = plan.activations.get(&i.value) {
            let d = qdq_activation(&mut q, &mut nodes, i.value, a, uint4(i.value));
            remap.insert(i.value, d);
        }
    }
    for n in &g.nodes {
        let mut n2 = n.clone();
        for inp in n2.inputs.iter_mut().flatten() {
            if let Some(&d) = remap.get(inp) {
                *inp = d;
            }
        }
        let weight = n
            .input(1)
            .filter(|_| n.op.is_weighted())
            .and_then(|w| g.konst(w));
        if let (Some(w), Some(layer)) = (weight, plan.layers.get(&n.name)) {
            let wname = format!("{}_weight", n.name);
            match layer {
                LayerQuant::Float16 { weight } => {
                    let hid = q.add_const(
                        format!("{wname}_float16"),
                        Tensor::f32(w.shape.clone(), weight.clone()).cast(DType::F16),
                    );
                    let wf = q.add_value(format!("{wname}_float"), DType::F32);
                    q.values[wf].shape = Some(w.shape.clone());
                    nodes.push(Node {
                        name: format!("{wname}_Cast"),
                        op: Op::Cast { to: DType::F32 },
                        inputs: vec![Some(hid)],
                        outputs: vec![wf],
                    });
                    n2.inputs[1] = Some(wf);
                }
                LayerQuant::Int {
                    weight,
                    per_channel,
                    bias,
                } => {
                    let dtype = if weight.bits <= 4 {
                        DType::I4
                    } else {
                        DType::I8
                    };
                    let qt = Tensor {
                        dtype,
                        shape: w.shape.clone(),
                        data: Data::I64(weight.q.iter().map(|&v| i64::from(v)).collect()),
                    };
                    let sshape = if *per_channel {
                        vec![weight.scales.len()]
                    } else {
                        vec![]
                    };
                    let zero_points = (0..weight.scales.len())
                        .map(|c| f32::from(weight.zero_point(c)))
                        .collect();
                    let wd = dq_const(
                        &mut q,
                        &mut nodes,
                        &wname,
                        qt,
                        sshape,
                        weight.scales.clone(),
                        zero_points,
                    );
                    n2.inputs[1] = Some(wd);
                    let bias_value = n.input(2).and_then(|b| g.konst(b));
                    if let (Some(b), Some(bq)) = (bias_value, bias) {
                        let qt = Tensor {
                            dtype: DType::I32,
                            shape: b.shape.clone(),
                            data: Data::I64(bq.q.iter().map(|&v| i64::from(v)).collect()),
                        };
                        let sshape = if *per_channel {
                            b.shape.clone()
                        } else {
                            vec![]
                        };
                        let bname = format!("{}_bias", n.name);
                        let zeros = vec![0.0; bq.scales.len()];
                        let bd = dq_const(
                            &mut q,
                            &mut nodes,
                            &bname,
                            qt,
                            sshape,
                            bq.scales.clone(),
                            zeros,
                        );
                        n2.inputs[2] = Some(bd);
                    }
                }
                LayerQuant::Float => {}
            }
        }
        nodes.push(n2);
        for &y in &n.outputs {
            if let Some(a) = plan.activations.get(&y) {
                let d = qdq_activation(&mut q, &mut nodes, y, a, uint4(y));
                remap.insert(y, d);
            }
        }
    }
    q.nodes = nodes;
    q.check()
        .map_err(|e| Error::Internal(format!("the quantized graph is inconsistent: {e}")))?;
    Ok(q)
}

/// Q -> DQ for an activation value; returns the dequantized value. 8 bits are uint8, 4 uint4
/// (when `uint4` allows); other widths live in uint8 behind a Clip to their interval, so that
/// the written model has exactly `2^bits` levels (QuantizeLinear saturates only at its type's
/// ends).
fn qdq_activation(
    q: &mut Graph,
    nodes: &mut Vec<Node>,
    v: ValueId,
    a: &ActQuant,
    uint4: bool,
) -> ValueId {
    let name = q.values[v].name.clone();
    let container = if a.bits == 4 && uint4 {
        DType::U4
    } else {
        DType::U8
    };
    let clip = |q: &mut Graph, nodes: &mut Vec<Node>, from: ValueId, to: &str| {
        let (lo, hi) = a.interval();
        let lo_id = q.add_const(format!("{name}_clip_min"), Tensor::f32(vec![], vec![lo]));
        let hi_id = q.add_const(format!("{name}_clip_max"), Tensor::f32(vec![], vec![hi]));
        let y = q.add_value(format!("{name}_{to}"), DType::F32);
        q.values[y].shape = q.values[v].shape.clone();
        nodes.push(Node {
            name: format!("{name}_Clip{}bit", a.bits),
            op: Op::Clip,
            inputs: vec![Some(from), Some(lo_id), Some(hi_id)],
            outputs: vec![y],
        });
        y
    };
    // Widths other than 4 and 8 live in uint8 behind a Clip: ONNX Runtime 1.32's Clip/Relu ->
    // QuantizeLinear fusion fails on a uint4 zero point, so 2 and 3 bits do not use uint4
    // (nor do 4 bits read by a layer with 8-bit weights, see `insert_qdq`).
    let odd = a.bits != 8 && container != DType::U4;
    let x = if odd { clip(q, nodes, v, "clipped") } else { v };
    let s = q.add_const(format!("{name}_scale"), Tensor::f32(vec![], vec![a.scale]));
    let z = q.add_const(
        format!("{name}_zero_point"),
        Tensor::f32(vec![], vec![f32::from(a.zero_point)]).cast(container),
    );
    let qv = q.add_value(format!("{name}_quantized"), container);
    q.values[qv].shape = q.values[v].shape.clone();
    let dv = q.add_value(format!("{name}_dequantized"), DType::F32);
    q.values[dv].shape = q.values[v].shape.clone();
    nodes.push(Node {
        name: format!("{name}_QuantizeLinear"),
        op: Op::QuantizeLinear { axis: 1 },
        inputs: vec![Some(x), Some(s), Some(z)],
        outputs: vec![qv],
    });
    nodes.push(Node {
        name: format!("{name}_DequantizeLinear"),
        op: Op::DequantizeLinear { axis: 1 },
        inputs: vec![Some(qv), Some(s), Some(z)],
        outputs: vec![dv],
    });
    dv
}

/// A constant integer tensor `qt` dequantized along axis 0 (`zero_points` in its type) by a new
/// DequantizeLinear node appended to `nodes`; returns the float value it produces.
fn dq_const(
    q: &mut Graph,
    nodes: &mut Vec<Node>,
    name: &str,
    qt: Tensor,
    scale_shape: Vec<usize>,
    scales: Vec<f32>,
    zero_points: Vec<f32>,
) -> ValueId {
    let (dt, shape) = (qt.dtype, qt.shape.clone());
    let qid = q.add_const(format!("{name}_quantized"), qt);
    let sid = q.add_const(
        format!("{name}_scale"),
        Tensor::f32(scale_shape.clone(), scales),
    );
    let zid = q.add_const(
        format!("{name}_zero_point"),
        Tensor::f32(scale_shape, zero_points).cast(dt),
    );
    let d = q.add_value(format!("{name}_dequantized"), DType::F32);
    q.values[d].shape = Some(shape);
    nodes.push(Node {
        name: format!("{name}_DequantizeLinear"),
        op: Op::DequantizeLinear { axis: 0 },
        inputs: vec![Some(qid), Some(sid), Some(zid)],
        outputs: vec![d],
    });
    d
}
