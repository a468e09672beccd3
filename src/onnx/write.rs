//! `ir::Graph` -> ONNX ModelProto, and atomic writing of model files.

use std::path::Path;

use prost::Message;

use super::proto;
use crate::error::{Error, Result};
use crate::ir::{AutoPad, Data, Dim, Graph, Op, PadMode, Tensor};

/// Serialise a constant.
pub fn tensor_to_proto(name: &str, t: &Tensor) -> proto::TensorProto {
    let mut p = proto::TensorProto {
        name: Some(name.to_string()),
        dims: t.shape.iter().map(|&d| d as i64).collect(),
        data_type: Some(t.dtype.onnx_code()),
        ..Default::default()
    };
    use crate::ir::DType::*;
    let mut raw = Vec::with_capacity(t.nbytes());
    match (&t.data, t.dtype) {
        (Data::F32(v), F32) => v
            .iter()
            .for_each(|x| raw.extend_from_slice(&x.to_le_bytes())),
        (Data::F32(v), F16) => v
            .iter()
            .for_each(|x| raw.extend_from_slice(&half::f16::from_f32(*x).to_le_bytes())),
        (Data::F32(v), _) => v
            .iter()
            .for_each(|x| raw.extend_from_slice(&f64::from(*x).to_le_bytes())),
        (Data::I64(v), I4 | U4) => raw = crate::ir::qdq::pack4(v),
        (Data::I64(v), dt) => {
            for &x in v {
                match dt {
                    I64 | U64 => raw.extend_from_slice(&x.to_le_bytes()),
                    I32 | U32 => raw.extend_from_slice(&(x as i32).to_le_bytes()),
                    I16 | U16 => raw.extend_from_slice(&(x as i16).to_le_bytes()),
                    _ => raw.push(x as u8),
                }
            }
        }
    }
    p.raw_data = Some(raw);
    p
}

fn attr_int(name: &str, v: i64) -> proto::AttributeProto {
    proto::AttributeProto {
        name: Some(name.into()),
        r#type: Some(proto::attribute_proto::AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

fn attr_float(name: &str, v: f32) -> proto::AttributeProto {
    proto::AttributeProto {
        name: Some(name.into()),
        r#type: Some(proto::attribute_proto::AttributeType::Float as i32),
        f: Some(v),
        ..Default::default()
    }
}

fn attr_ints(name: &str, v: &[usize]) -> proto::AttributeProto {
    proto::AttributeProto {
        name: Some(name.into()),
        r#type: Some(proto::attribute_proto::AttributeType::Ints as i32),
        ints: v.iter().map(|&x| x as i64).collect(),
        ..Default::default()
    }
}

fn attr_str(name: &str, v: &str) -> proto::AttributeProto {
    proto::AttributeProto {
        name: Some(name.into()),
        r#type: Some(proto::attribute_proto::AttributeType::String as i32),
        s: Some(v.as_bytes().to_vec()),
        ..Default::default()
    }
}

fn attr_tensor(name: &str, t: &Tensor) -> proto::AttributeProto {
    proto::AttributeProto {
        name: Some(name.into()),
        r#type: Some(proto::attribute_proto::AttributeType::Tensor as i32),
        t: Some(tensor_to_proto("", t)),
        ..Default::default()
    }
}

fn auto_pad_str(a: AutoPad) -> &'static str {
    match a {
        AutoPad::NotSet => "NOTSET",
        AutoPad::SameUpper => "SAME_UPPER",
        AutoPad::SameLower => "SAME_LOWER",
        AutoPad::Valid => "VALID",
    }
}

fn attributes(op: &Op) -> Vec<proto::AttributeProto> {
    let mut a = Vec::new();
    let nonempty = |a: &mut Vec<_>, n: &str, v: &[usize]| {
        if !v.is_empty() {
            a.push(attr_ints(n, v));
        }
    };
    match op {
        Op::Conv(c) => {
            if let Some(k) = &c.kernel_shape {
                a.push(attr_ints("kernel_shape", k));
            }
            nonempty(&mut a, "strides", &c.strides);
            nonempty(&mut a, "dilations", &c.dilations);
            nonempty(&mut a, "pads", &c.pads);
            if c.auto_pad != AutoPad::NotSet {
                a.push(attr_str("auto_pad", auto_pad_str(c.auto_pad)));
            }
            a.push(attr_int("group", c.group as i64));
        }
        Op::MaxPool(p) | Op::AveragePool(p) => {
            a.push(attr_ints("kernel_shape", &p.kernel_shape));
            nonempty(&mut a, "strides", &p.strides);
            nonempty(&mut a, "dilations", &p.dilations);
            nonempty(&mut a, "pads", &p.pads);
            if p.auto_pad != AutoPad::NotSet {
                a.push(attr_str("auto_pad", auto_pad_str(p.auto_pad)));
            }
            a.push(attr_int("ceil_mode", p.ceil_mode as i64));
            if matches!(op, Op::AveragePool(_)) {
                a.push(attr_int("count_include_pad", p.count_include_pad as i64));
            }
        }
        Op::Gemm {
            alpha,
            beta,
            trans_a,
            trans_b,
        } => {
            a.push(attr_float("alpha", *alpha));
            a.push(attr_float("beta", *beta));
            a.push(attr_int("transA", *trans_a as i64));
            a.push(attr_int("transB", *trans_b as i64));
        }
        Op::BatchNorm { epsilon } => a.push(attr_float("epsilon", *epsilon)),
        Op::LeakyRelu { alpha } => a.push(attr_float("alpha", *alpha)),
        Op::HardSigmoid { alpha, beta } => {
            a.push(attr_float("alpha", *alpha));
            a.push(attr_float("beta", *beta));
        }
        Op::Flatten { axis } | Op::Concat { axis } | Op::Gather { axis } => {
            a.push(attr_int("axis", *axis))
        }
        Op::Softmax { axis, .. } => a.push(attr_int("axis", *axis)),
        Op::Reshape { allowzero: true } => a.push(attr_int("allowzero", 1)),
        Op::Pad { mode } => a.push(attr_str(
            "mode",
            match mode {
                PadMode::Constant => "constant",
                PadMode::Reflect => "reflect",
                PadMode::Edge => "edge",
            },
        )),
        Op::Transpose { perm: Some(p) } => a.push(attr_ints("perm", p)),
        Op::Shape { start, end } => {
            if *start != 0 {
                a.push(attr_int("start", *start));
            }
            if let Some(e) = end {
                a.push(attr_int("end", *e));
            }
        }
        Op::ConstantOfShape { value } => a.push(attr_tensor("value", value)),
        Op::Cast { to } => a.push(attr_int("to", to.onnx_code() as i64)),
        Op::QuantizeLinear { axis } | Op::DequantizeLinear { axis } => {
            a.push(attr_int("axis", *axis))
        }
        // No attributes (or only defaults): listed, so a new op is a compile error here.
        Op::MatMul
        | Op::Relu
        | Op::Clip
        | Op::PRelu
        | Op::Sigmoid
        | Op::HardSwish
        | Op::Tanh
        | Op::Erf
        | Op::Add
        | Op::Sub
        | Op::Mul
        | Op::Div
        | Op::GlobalAveragePool
        | Op::GlobalMaxPool
        | Op::Slice
        | Op::Squeeze
        | Op::Unsqueeze
        | Op::Identity
        | Op::Dropout
        | Op::Transpose { perm: None }
        | Op::Reshape { allowzero: false } => {}
    }
    a
}

fn value_info(g: &Graph, id: usize, dims: Option<&[Dim]>) -> proto::ValueInfoProto {
    use proto::tensor_shape_proto::{dimension::Value as DV, Dimension};
    let v = &g.values[id];
    let dim: Option<Vec<Dimension>> = match dims {
        Some(d) => Some(
            d.iter()
                .map(|d| Dimension {
                    value: Some(match d {
                        Dim::Fixed(n) => DV::DimValue(*n as i64),
                        Dim::Sym(s) => {
                            DV::DimParam(if s.is_empty() { "N".into() } else { s.clone() })
                        }
                    }),
                    ..Default::default()
                })
                .collect(),
        ),
        None => v.shape.as_ref().map(|s| {
            s.iter()
                .map(|&n| Dimension {
                    value: Some(DV::DimValue(n as i64)),
                    ..Default::default()
                })
                .collect()
        }),
    };
    proto::ValueInfoProto {
        name: Some(v.name.clone()),
        r#type: Some(proto::TypeProto {
            value: Some(proto::type_proto::Value::TensorType(
                proto::type_proto::Tensor {
                    elem_type: Some(v.dtype.onnx_code()),
                    shape: dim.map(|dim| proto::TensorShapeProto { dim }),
                },
            )),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Build a ModelProto for a graph, at the graph's opset.
pub fn to_model(g: &Graph) -> proto::ModelProto {
    let mut gp = proto::GraphProto {
        name: Some(g.name.clone()),
        ..Default::default()
    };
    let mut emitted = std::collections::HashSet::new();
    let mut add_init = |gp: &mut proto::GraphProto, id: usize| {
        if let Some(t) = g.konst(id) {
            if emitted.insert(id) {
                gp.initializer.push(tensor_to_proto(&g.values[id].name, t));
            }
        }
    };
    for n in &g.nodes {
        let mut inputs: Vec<String> = Vec::new();
        let mut attrs = attributes(&n.op);
        for (slot, i) in n.inputs.iter().enumerate() {
            // Before opset 13, Squeeze/Unsqueeze take axes as an attribute.
            if g.opset < 13 && slot == 1 && matches!(n.op, Op::Squeeze | Op::Unsqueeze) {
                if let Some(t) = i.and_then(|v| g.konst(v)) {
                    let axes: Vec<i64> = t.to_i64_vec();
                    attrs.push(proto::AttributeProto {
                        name: Some("axes".into()),
                        r#type: Some(proto::attribute_proto::AttributeType::Ints as i32),
                        ints: axes,
                        ..Default::default()
                    });
                }
                continue;
            }
            match i {
                Some(v) => {
                    add_init(&mut gp, *v);
                    inputs.push(g.values[*v].name.clone());
                }
                None => inputs.push(String::new()),
            }
        }
        while inputs.last().is_some_and(|s| s.is_empty()) {
            inputs.pop();
        }
        gp.node.push(proto::NodeProto {
            name: Some(n.name.clone()),
            op_type: Some(n.op.name().to_string()),
            input: inputs,
            output: n
                .outputs
                .iter()
                .map(|&o| g.values[o].name.clone())
                .collect(),
            attribute: attrs,
            ..Default::default()
        });
    }
    for i in &g.inputs {
        gp.input.push(value_info(g, i.value, Some(&i.dims)));
    }
    for &o in &g.outputs {
        add_init(&mut gp, o);
        let batch_sym = g
            .inputs
            .first()
            .and_then(|i| i.dims.first())
            .filter(|d| matches!(d, Dim::Sym(_)));
        let dims: Option<Vec<Dim>> = match (batch_sym, &g.values[o].shape) {
            (Some(b), Some(s)) if !s.is_empty() => {
                let mut d: Vec<Dim> = s.iter().map(|&n| Dim::Fixed(n)).collect();
                d[0] = b.clone();
                Some(d)
            }
            _ => None,
        };
        gp.output.push(value_info(g, o, dims.as_deref()));
    }
    proto::ModelProto {
        // The IR version each opset came with (onnx.helper.VERSION_TABLE).
        ir_version: Some(if g.opset >= 28 {
            14
        } else if g.opset >= 25 {
            13
        } else if g.opset >= 24 {
            12
        } else if g.opset >= 23 {
            11
        } else if g.opset >= 21 {
            10
        } else if g.opset >= 19 {
            9
        } else {
            8
        }),
        producer_name: Some("zq".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        opset_import: vec![proto::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(g.opset),
        }],
        graph: Some(gp),
        ..Default::default()
    }
}

/// Write bytes to `path` atomically: a temporary file in the same directory, then a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut tmp = tempfile::Builder::new()
        .prefix(".zq-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(io)?;
    tmp.write_all(bytes).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// Serialise a graph and write it atomically.
pub fn write_model(g: &Graph, path: &Path) -> Result<()> {
    write_atomic(path, &to_model(g).encode_to_vec())
}
