//! ONNX ModelProto -> `ir::Graph`. Models are untrusted input: sizes are checked before allocation,
//! external data is confined to the model's directory, and every failure is an error, never a panic.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use prost::Message;

use super::proto::{self, attribute_proto::AttributeType, tensor_proto::DataLocation};
use crate::error::{Error, Result};
use crate::ir::{
    AutoPad, ConvAttrs, DType, Data, Dim, Graph, GraphInput, Node, Op, PadMode, PoolAttrs, Tensor,
    ValueId,
};

/// Bounds applied to untrusted models.
pub const MAX_FILE_BYTES: u64 = 2 << 30;
pub const MAX_NODES: usize = 100_000;
pub const MAX_TENSOR_ELEMS: usize = 1 << 31;
pub const MIN_OPSET: i64 = 11;
/// Opsets 22-28 changed the ops zq reads only by admitting new element types (bfloat16, float8,
/// float4, 2-bit integers: refused as element types) and by new attributes (Cast's
/// `round_mode`, QuantizeLinear's `precision`, DequantizeLinear's `output_dtype`), which the
/// attribute parsers refuse; their semantics are opset 21's.
pub const MAX_OPSET: i64 = 28;

/// A model read from disk: the IR plus what inspect wants to know about the file.
#[derive(Debug, Clone)]
pub struct Model {
    pub path: PathBuf,
    pub graph: Graph,
    pub file_bytes: u64,
    pub ir_version: i64,
    /// Op histogram of the file as stored (Constant nodes included).
    pub op_counts: std::collections::BTreeMap<String, usize>,
}

/// Read and import an ONNX file.
pub fn read_model(path: &Path) -> Result<Model> {
    read_model_bound(path, &HashMap::new())
}

/// A model file decoded but not yet imported (`zq run` looks at its declared inputs first).
#[derive(Debug, Clone)]
pub struct ModelFile {
    pub path: PathBuf,
    pub proto: proto::ModelProto,
    pub file_bytes: u64,
}

/// A graph input or output as the file declares it: name, element type and dimensions.
#[derive(Debug, Clone, PartialEq)]
pub struct Declared {
    pub name: String,
    pub dtype: DType,
    pub dims: Vec<Dim>,
}

impl ModelFile {
    /// Read and decode `path` (size-checked; not imported).
    pub fn open(path: &Path) -> Result<ModelFile> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        if meta.is_dir() {
            return Err(Error::Model {
                path: path.into(),
                msg: "is a directory, not an ONNX file".into(),
            });
        }
        if meta.len() > MAX_FILE_BYTES {
            return Err(Error::Model {
                path: path.into(),
                msg: format!(
                    "file is {} bytes; protobuf models are limited to 2 GiB",
                    meta.len()
                ),
            });
        }
        let bytes = std::fs::read(path).map_err(io)?;
        let proto = decode(&bytes).map_err(|e| in_file(path, e))?;
        Ok(ModelFile {
            path: path.into(),
            proto,
            file_bytes: meta.len(),
        })
    }

    /// The graph inputs that are not initializers, as declared (any element type).
    pub fn inputs(&self) -> Result<Vec<Declared>> {
        let gp = self.graph_proto()?;
        let inits: HashSet<&str> = gp.initializer.iter().map(|t| t.name()).collect();
        self.declared(
            gp.input.iter().filter(|vi| !inits.contains(vi.name())),
            "input",
        )
    }

    /// The graph outputs, as declared.
    pub fn outputs(&self) -> Result<Vec<Declared>> {
        let gp = self.graph_proto()?;
        self.declared(gp.output.iter(), "output")
    }

    fn graph_proto(&self) -> Result<&proto::GraphProto> {
        self.proto.graph.as_ref().ok_or_else(|| Error::Model {
            path: self.path.clone(),
            msg: "not an ONNX model: it has no graph".into(),
        })
    }

    fn declared<'a>(
        &self,
        vis: impl Iterator<Item = &'a proto::ValueInfoProto>,
        what: &str,
    ) -> Result<Vec<Declared>> {
        vis.map(|vi| {
            let (dtype, dims) = value_info_type(vi).map_err(|e| Error::Model {
                path: self.path.clone(),
                msg: format!("{what} '{}': {e}", vi.name()),
            })?;
            Ok(Declared {
                name: vi.name().to_string(),
                dtype,
                dims,
            })
        })
        .collect()
    }

    /// Import the graph. Graph inputs named in `bound` become constants holding those tensors
    /// (their element type must be the declared one); this is how a caller that knows an
    /// integer input's value (`zq run`) hands it in, since zq graphs take float inputs.
    pub fn import(&self, bound: &HashMap<String, Tensor>) -> Result<Model> {
        let dir = self.path.parent().map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        });
        let m = &self.proto;
        let graph = import_bound(m, dir, bound).map_err(|e| in_file(&self.path, e))?;
        let mut op_counts = std::collections::BTreeMap::new();
        for n in m.graph.iter().flat_map(|g| &g.node) {
            *op_counts.entry(n.op_type().to_string()).or_insert(0) += 1;
        }
        Ok(Model {
            path: self.path.clone(),
            graph,
            file_bytes: self.file_bytes,
            ir_version: m.ir_version(),
            op_counts,
        })
    }
}

/// A model-level message names the file.
fn in_file(path: &Path, e: Error) -> Error {
    match e {
        Error::Usage(msg) => Error::Model {
            path: path.into(),
            msg,
        },
        e => e,
    }
}

/// Read and import an ONNX file with some graph inputs bound to constants (see
/// [`ModelFile::import`]).
pub fn read_model_bound(path: &Path, bound: &HashMap<String, Tensor>) -> Result<Model> {
    ModelFile::open(path)?.import(bound)
}

/// Decode and import a model from memory. `dir` is where external data may live (None: refused).
/// Returns the graph and the model's IR version.
pub fn import_bytes(bytes: &[u8], dir: Option<&Path>) -> Result<(Graph, i64)> {
    let m = decode(bytes)?;
    let g = import(&m, dir)?;
    Ok((g, m.ir_version.unwrap_or(0)))
}

fn decode(bytes: &[u8]) -> Result<proto::ModelProto> {
    proto::ModelProto::decode(bytes).map_err(|e| {
        bad(format!(
            "not a valid ONNX model (protobuf decoding failed: {e})"
        ))
    })
}

fn bad(msg: impl Into<String>) -> Error {
    Error::Usage(msg.into())
}

/// Import a decoded ModelProto.
pub fn import(m: &proto::ModelProto, dir: Option<&Path>) -> Result<Graph> {
    import_bound(m, dir, &HashMap::new())
}

/// Import a decoded ModelProto, the graph inputs named in `bound` taken as constants.
fn import_bound(
    m: &proto::ModelProto,
    dir: Option<&Path>,
    bound: &HashMap<String, Tensor>,
) -> Result<Graph> {
    let gp = m
        .graph
        .as_ref()
        .ok_or_else(|| bad("not an ONNX model: it has no graph"))?;
    if m.ir_version.unwrap_or(0) <= 0 {
        return Err(bad("not an ONNX model: ir_version is missing"));
    }
    let opset = m
        .opset_import
        .iter()
        .find(|o| matches!(o.domain.as_deref(), None | Some("") | Some("ai.onnx")))
        .and_then(|o| o.version)
        .ok_or_else(|| bad("not an ONNX model: no opset_import for the default domain"))?;
    if !(MIN_OPSET..=MAX_OPSET).contains(&opset) {
        return Err(bad(format!(
            "opset {opset} is not supported (zq reads opsets {MIN_OPSET} to {MAX_OPSET}); convert the model with onnx.version_converter"
        )));
    }
    if gp.node.len() > MAX_NODES {
        return Err(bad(format!(
            "graph has {} nodes, more than the limit {MAX_NODES}",
            gp.node.len()
        )));
    }
    if !gp.sparse_initializer.is_empty() {
        return Err(bad("sparse initializers are not supported"));
    }

    let mut g = Graph::new(gp.name().to_string(), opset, m.producer_name().to_string());
    let mut by_name: HashMap<String, ValueId> = HashMap::new();

    for t in &gp.initializer {
        let name = t.name().to_string();
        let tensor =
            tensor_from_proto(t, dir).map_err(|e| bad(format!("initializer '{name}': {e}")))?;
        if by_name.contains_key(&name) {
            return Err(bad(format!("initializer '{name}' is defined twice")));
        }
        let id = g.add_const(name.clone(), tensor);
        by_name.insert(name, id);
    }
    for vi in &gp.input {
        let name = vi.name().to_string();
        if by_name.contains_key(&name) {
            continue; // an initializer with a default value: treat as a constant
        }
        let (dtype, dims) = value_info_type(vi).map_err(|e| bad(format!("input '{name}': {e}")))?;
        if let Some(t) = bound.get(&name) {
            if t.dtype != dtype {
                return Err(bad(format!(
                    "input '{name}' is declared {dtype}, the value given is {}",
                    t.dtype
                )));
            }
            let id = g.add_const(name.clone(), t.clone());
            by_name.insert(name, id);
            continue;
        }
        if !dtype.is_float() {
            return Err(bad(format!(
                "input '{name}' has element type {dtype}; zq models take float inputs"
            )));
        }
        let id = g.add_value(name.clone(), DType::F32);
        g.values[id].dtype = dtype;
        by_name.insert(name, id);
        g.inputs.push(GraphInput { value: id, dims });
    }
    if g.inputs.is_empty() && bound.is_empty() {
        return Err(bad("the graph has no (non-constant) inputs"));
    }

    // Topological order (Kahn) over node indices, by value names.
    let mut producer_of: HashMap<&str, usize> = HashMap::new();
    for (i, n) in gp.node.iter().enumerate() {
        for o in &n.output {
            if o.is_empty() {
                continue;
            }
            if by_name.contains_key(o.as_str()) || producer_of.insert(o.as_str(), i).is_some() {
                return Err(bad(format!(
                    "value '{o}' is produced twice (by node '{}')",
                    node_name(n, i)
                )));
            }
        }
    }
    let mut indeg = vec![0usize; gp.node.len()];
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); gp.node.len()];
    for (i, n) in gp.node.iter().enumerate() {
        for inp in n.input.iter().filter(|s| !s.is_empty()) {
            if let Some(&p) = producer_of.get(inp.as_str()) {
                indeg[i] += 1;
                users[p].push(i);
            } else if !by_name.contains_key(inp.as_str()) {
                return Err(bad(format!(
                    "node '{}' ({}): input '{inp}' is not produced by any node, initializer or graph input",
                    node_name(n, i),
                    n.op_type()
                )));
            }
        }
    }
    let mut queue: VecDeque<usize> = (0..gp.node.len()).filter(|&i| indeg[i] == 0).collect();
    let mut order = Vec::with_capacity(gp.node.len());
    while let Some(i) = queue.pop_front() {
        order.push(i);
        for &u in &users[i] {
            indeg[u] -= 1;
            if indeg[u] == 0 {
                queue.push_back(u);
            }
        }
    }
    if order.len() != gp.node.len() {
        let i = (0..gp.node.len()).find(|&i| indeg[i] > 0).unwrap();
        return Err(bad(format!(
            "the graph has a cycle through node '{}' ({})",
            node_name(&gp.node[i], i),
            gp.node[i].op_type()
        )));
    }

    let mut used_names: HashSet<String> = HashSet::new();
    for i in order {
        let np = &gp.node[i];
        let name = unique_name(node_name(np, i), &mut used_names);
        let op_type = np.op_type();
        if !matches!(np.domain(), "" | "ai.onnx") {
            return Err(Error::Unsupported {
                node: name,
                op: format!("{}::{op_type}", np.domain()),
                opset,
                what: "operator domain".into(),
            });
        }
        let inputs: Vec<Option<ValueId>> = np
            .input
            .iter()
            .map(|s| {
                if s.is_empty() {
                    None
                } else {
                    Some(by_name[s.as_str()])
                }
            })
            .collect();
        let mut outputs = Vec::new();
        for o in &np.output {
            let id = g.add_value(o.clone(), DType::F32);
            if !o.is_empty() {
                by_name.insert(o.clone(), id);
            }
            outputs.push(id);
        }
        if op_type == "QLinearMatMul" {
            expand_qlinear_matmul(&mut g, np, &name, opset, &inputs, &outputs)?;
            continue;
        }
        if op_type == "Constant" {
            let t = constant_value(np, dir).map_err(|e| Error::node(&name, op_type, e))?;
            let o = *outputs
                .first()
                .ok_or_else(|| Error::node(&name, op_type, "has no output"))?;
            g.values[o].dtype = t.dtype;
            g.values[o].shape = Some(t.shape.clone());
            g.values[o].konst = Some(Arc::new(t));
            continue;
        }
        let (op, extra) = parse_op(np, opset, &name, dir)?;
        let mut inputs = inputs;
        // Attribute forms of older opsets become constant inputs (the opset-13+ form).
        for (slot, t) in extra {
            let id = g.add_const(format!("{name}::{slot}"), t);
            while inputs.len() <= slot {
                inputs.push(None);
            }
            inputs[slot] = Some(id);
        }
        check_arity(&op, &inputs, &outputs).map_err(|e| Error::node(&name, op_type, e))?;
        g.nodes.push(Node {
            name,
            op,
            inputs,
            outputs,
        });
    }

    for vi in &gp.output {
        let id = *by_name
            .get(vi.name())
            .ok_or_else(|| bad(format!("graph output '{}' is never produced", vi.name())))?;
        g.outputs.push(id);
    }
    if g.outputs.is_empty() {
        return Err(bad("the graph has no outputs"));
    }
    g.check().map_err(bad)?;
    Ok(g)
}

/// QLinearMatMul as ONNX defines it, `Q(DQ(a) x DQ(b))`: `DequantizeLinear(a, a_scale,
/// a_zero_point)` per tensor or per row (axis -2), `DequantizeLinear(b, ...)` per tensor or per
/// column (axis -1), MatMul, and `QuantizeLinear(y_scale, y_zero_point)` per tensor. ONNX's
/// reference rounds `(A - a_zp)(B - b_zp) * (a_scale * b_scale / y_scale)`; computed in float
/// the product differs only at rounding ties, and the native engine runs this pattern as one
/// integer GEMM with that requantization fused. `y_scale` must be known to hold one element
/// (a constant, or a graph input declared so).
fn expand_qlinear_matmul(
    g: &mut Graph,
    np: &proto::NodeProto,
    name: &str,
    opset: i64,
    inputs: &[Option<ValueId>],
    outputs: &[ValueId],
) -> Result<()> {
    let op = "QLinearMatMul";
    if !np.attribute.is_empty() {
        return Err(Error::Unsupported {
            node: name.into(),
            op: op.into(),
            opset,
            what: format!("attribute '{}'", np.attribute[0].name()),
        });
    }
    if inputs.len() != 8 || inputs.iter().any(Option::is_none) || outputs.len() != 1 {
        return Err(Error::node(
            name,
            op,
            "needs 8 inputs (a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point) and 1 output",
        ));
    }
    let v: Vec<ValueId> = inputs.iter().map(|i| i.expect("checked above")).collect();
    for &k in &v[6..8] {
        let declared: Option<usize> = match g.konst(k) {
            Some(t) => Some(t.len()),
            None => g.inputs.iter().find(|gi| gi.value == k).and_then(|gi| {
                gi.dims
                    .iter()
                    .map(|d| match d {
                        Dim::Fixed(n) => Some(*n),
                        Dim::Sym(_) => None,
                    })
                    .product()
            }),
        };
        if declared != Some(1) {
            return Err(Error::node(
                name,
                op,
                format!(
                    "'{}' must hold one element (per-tensor output quantization) and be a constant or a graph input declared so",
                    g.values[k].name
                ),
            ));
        }
    }
    let node = |g: &mut Graph, suffix: &str, op: Op, ins: Vec<ValueId>, out: Option<ValueId>| {
        let o = out.unwrap_or_else(|| g.add_value(format!("{name}::{suffix}"), DType::F32));
        g.nodes.push(Node {
            name: format!("{name}::{suffix}"),
            op,
            inputs: ins.into_iter().map(Some).collect(),
            outputs: vec![o],
        });
        o
    };
    let a = node(
        g,
        "dq_a",
        Op::DequantizeLinear { axis: -2 },
        v[0..3].to_vec(),
        None,
    );
    let b = node(
        g,
        "dq_b",
        Op::DequantizeLinear { axis: -1 },
        v[3..6].to_vec(),
        None,
    );
    let y = node(g, "matmul", Op::MatMul, vec![a, b], None);
    node(
        g,
        "q_y",
        Op::QuantizeLinear { axis: 1 },
        vec![y, v[6], v[7]],
        Some(outputs[0]),
    );
    Ok(())
}

fn node_name(n: &proto::NodeProto, i: usize) -> String {
    if n.name().is_empty() {
        format!("{}_{i}", n.op_type())
    } else {
        n.name().to_string()
    }
}

fn unique_name(base: String, used: &mut HashSet<String>) -> String {
    let mut name = base.clone();
    let mut k = 1;
    while !used.insert(name.clone()) {
        name = format!("{base}.{k}");
        k += 1;
    }
    name
}

fn value_info_type(vi: &proto::ValueInfoProto) -> Result<(DType, Vec<Dim>), String> {
    use proto::type_proto::Value as TV;
    let tt = match vi.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(TV::TensorType(t)) => t,
        _ => return Err("is not a tensor".into()),
    };
    let dtype =
        DType::from_onnx_code(tt.elem_type()).ok_or_else(|| unsupported_type(tt.elem_type()))?;
    let shape = tt.shape.as_ref().ok_or("has no declared shape")?;
    use proto::tensor_shape_proto::dimension::Value as DV;
    let dims = shape
        .dim
        .iter()
        .map(|d| match &d.value {
            Some(DV::DimValue(v)) if *v > 0 => Ok(Dim::Fixed(*v as usize)),
            Some(DV::DimValue(v)) if *v == 0 => Ok(Dim::Sym(String::new())),
            Some(DV::DimValue(v)) => Err(format!("negative dimension {v}")),
            Some(DV::DimParam(p)) => Ok(Dim::Sym(p.clone())),
            None => Ok(Dim::Sym(String::new())),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((dtype, dims))
}

fn check_arity(op: &Op, inputs: &[Option<ValueId>], outputs: &[ValueId]) -> Result<(), String> {
    let (min, max) = op.arity();
    let present = inputs
        .iter()
        .rposition(|i| i.is_some())
        .map_or(0, |p| p + 1);
    if present < min || inputs.len() > max {
        return Err(format!(
            "has {} inputs, expected {min}..={}",
            inputs.len(),
            max.min(99)
        ));
    }
    for (i, inp) in inputs.iter().enumerate().take(min) {
        if inp.is_none() {
            return Err(format!("required input {i} is missing"));
        }
    }
    if let Op::Concat { .. } = op {
        if inputs.iter().any(|i| i.is_none()) {
            return Err("Concat has an empty input".into());
        }
    }
    if outputs.is_empty() {
        return Err("has no outputs".into());
    }
    let max_out = op.max_outputs();
    if outputs.len() > max_out {
        return Err(format!(
            "has {} outputs, zq supports {max_out}",
            outputs.len()
        ));
    }
    Ok(())
}

/// Typed attribute access that rejects attributes the op does not know.
struct Attrs<'a> {
    np: &'a proto::NodeProto,
    node: &'a str,
    opset: i64,
}

type Extra = Vec<(usize, Tensor)>;

impl<'a> Attrs<'a> {
    fn unsupported(&self, what: String) -> Error {
        Error::Unsupported {
            node: self.node.into(),
            op: self.np.op_type().into(),
            opset: self.opset,
            what,
        }
    }
    fn err(&self, msg: String) -> Error {
        Error::node(self.node, self.np.op_type(), msg)
    }
    fn only(&self, allowed: &[&str]) -> Result<()> {
        for a in &self.np.attribute {
            if !allowed.contains(&a.name()) {
                return Err(self.unsupported(format!("attribute '{}'", a.name())));
            }
        }
        Ok(())
    }
    fn get(&self, name: &str) -> Option<&'a proto::AttributeProto> {
        self.np.attribute.iter().find(|a| a.name() == name)
    }
    fn int(&self, name: &str, default: i64) -> Result<i64> {
        match self.get(name) {
            None => Ok(default),
            Some(a) if a.r#type() == AttributeType::Int || a.i.is_some() => Ok(a.i()),
            Some(_) => Err(self.err(format!("attribute '{name}' must be an int"))),
        }
    }
    fn float(&self, name: &str, default: f32) -> Result<f32> {
        match self.get(name) {
            None => Ok(default),
            Some(a) if a.r#type() == AttributeType::Float || a.f.is_some() => Ok(a.f()),
            Some(_) => Err(self.err(format!("attribute '{name}' must be a float"))),
        }
    }
    fn ints(&self, name: &str) -> Result<Option<Vec<i64>>> {
        match self.get(name) {
            None => Ok(None),
            Some(a) if a.r#type() == AttributeType::Ints || !a.ints.is_empty() => {
                Ok(Some(a.ints.clone()))
            }
            Some(_) => Err(self.err(format!("attribute '{name}' must be a list of ints"))),
        }
    }
    fn usizes(&self, name: &str) -> Result<Vec<usize>> {
        let v = self.ints(name)?.unwrap_or_default();
        v.iter()
            .map(|&x| {
                if (0..=1 << 20).contains(&x) {
                    Ok(x as usize)
                } else {
                    Err(self.err(format!("attribute '{name}' has out-of-range value {x}")))
                }
            })
            .collect()
    }
    fn string(&self, name: &str, default: &str) -> Result<String> {
        match self.get(name) {
            None => Ok(default.to_string()),
            Some(a) => String::from_utf8(a.s().to_vec())
                .map_err(|_| self.err(format!("attribute '{name}' is not UTF-8"))),
        }
    }
    fn auto_pad(&self) -> Result<AutoPad> {
        Ok(match self.string("auto_pad", "NOTSET")?.as_str() {
            "NOTSET" | "" => AutoPad::NotSet,
            "SAME_UPPER" => AutoPad::SameUpper,
            "SAME_LOWER" => AutoPad::SameLower,
            "VALID" => AutoPad::Valid,
            other => return Err(self.err(format!("unknown auto_pad '{other}'"))),
        })
    }
    fn pool(&self, max: bool) -> Result<PoolAttrs> {
        let own = if max {
            "storage_order"
        } else {
            "count_include_pad"
        };
        self.only(&[
            "kernel_shape",
            "strides",
            "pads",
            "dilations",
            "auto_pad",
            "ceil_mode",
            own,
        ])?;
        let kernel_shape = self.usizes("kernel_shape")?;
        if kernel_shape.is_empty() {
            return Err(self.err("kernel_shape is required".into()));
        }
        if max && self.int("storage_order", 0)? != 0 {
            return Err(self.unsupported("storage_order=1".into()));
        }
        Ok(PoolAttrs {
            kernel_shape,
            strides: self.usizes("strides")?,
            dilations: self.usizes("dilations")?,
            pads: self.usizes("pads")?,
            auto_pad: self.auto_pad()?,
            ceil_mode: self.int("ceil_mode", 0)? != 0,
            count_include_pad: self.int("count_include_pad", 0)? != 0,
        })
    }
}

fn parse_op(
    np: &proto::NodeProto,
    opset: i64,
    node: &str,
    dir: Option<&Path>,
) -> Result<(Op, Extra)> {
    let a = Attrs { np, node, opset };
    let mut extra: Extra = Vec::new();
    let axes_attr = |a: &Attrs, slot: usize, extra: &mut Extra| -> Result<()> {
        if let Some(axes) = a.ints("axes")? {
            if opset >= 13 {
                return Err(a.unsupported("attribute 'axes' (an input since opset 13)".into()));
            }
            extra.push((slot, Tensor::i64(vec![axes.len()], axes)));
        }
        Ok(())
    };
    let op = match np.op_type() {
        "Conv" => {
            a.only(&[
                "kernel_shape",
                "strides",
                "pads",
                "dilations",
                "group",
                "auto_pad",
            ])?;
            let group = a.int("group", 1)?;
            if group < 1 {
                return Err(a.err(format!("group {group} must be positive")));
            }
            let ks = a.usizes("kernel_shape")?;
            Op::Conv(ConvAttrs {
                kernel_shape: if ks.is_empty() { None } else { Some(ks) },
                strides: a.usizes("strides")?,
                dilations: a.usizes("dilations")?,
                pads: a.usizes("pads")?,
                auto_pad: a.auto_pad()?,
                group: group as usize,
            })
        }
        "Gemm" => {
            a.only(&["alpha", "beta", "transA", "transB"])?;
            Op::Gemm {
                alpha: a.float("alpha", 1.0)?,
                beta: a.float("beta", 1.0)?,
                trans_a: a.int("transA", 0)? != 0,
                trans_b: a.int("transB", 0)? != 0,
            }
        }
        "MatMul" => {
            a.only(&[])?;
            Op::MatMul
        }
        "BatchNormalization" => {
            a.only(&["epsilon", "momentum", "training_mode"])?;
            if a.int("training_mode", 0)? != 0 {
                return Err(a.unsupported("training_mode=1 (export the model in eval mode)".into()));
            }
            if np.output.len() > 1 {
                return Err(a.unsupported("training outputs (running mean/var)".into()));
            }
            Op::BatchNorm {
                epsilon: a.float("epsilon", 1e-5)?,
            }
        }
        "Relu" | "Sigmoid" | "Tanh" | "Erf" | "Identity" | "PRelu" | "GlobalAveragePool"
        | "GlobalMaxPool" | "Add" | "Sub" | "Mul" | "Div" | "Slice" | "HardSwish" => {
            a.only(&[])?;
            match np.op_type() {
                "Relu" => Op::Relu,
                "Sigmoid" => Op::Sigmoid,
                "Tanh" => Op::Tanh,
                "Erf" => Op::Erf,
                "Identity" => Op::Identity,
                "PRelu" => Op::PRelu,
                "GlobalAveragePool" => Op::GlobalAveragePool,
                "GlobalMaxPool" => Op::GlobalMaxPool,
                "Add" => Op::Add,
                "Sub" => Op::Sub,
                "Mul" => Op::Mul,
                "Div" => Op::Div,
                "Slice" => Op::Slice,
                _ => {
                    if opset < 14 {
                        return Err(a.unsupported("op (HardSwish exists from opset 14)".into()));
                    }
                    Op::HardSwish
                }
            }
        }
        "Clip" => {
            a.only(&[])?;
            Op::Clip
        }
        "LeakyRelu" => {
            a.only(&["alpha"])?;
            Op::LeakyRelu {
                alpha: a.float("alpha", 0.01)?,
            }
        }
        "HardSigmoid" => {
            a.only(&["alpha", "beta"])?;
            Op::HardSigmoid {
                alpha: a.float("alpha", 0.2)?,
                beta: a.float("beta", 0.5)?,
            }
        }
        "MaxPool" => {
            if np.output.len() > 1 {
                return Err(a.unsupported("the Indices output".into()));
            }
            Op::MaxPool(a.pool(true)?)
        }
        "AveragePool" => Op::AveragePool(a.pool(false)?),
        "Flatten" => {
            a.only(&["axis"])?;
            Op::Flatten {
                axis: a.int("axis", 1)?,
            }
        }
        "Reshape" => {
            a.only(&["allowzero"])?;
            Op::Reshape {
                allowzero: a.int("allowzero", 0)? != 0,
            }
        }
        "Concat" => {
            a.only(&["axis"])?;
            Op::Concat {
                axis: a.int("axis", i64::MIN).and_then(|v| {
                    if v == i64::MIN {
                        Err(a.err("attribute 'axis' is required".into()))
                    } else {
                        Ok(v)
                    }
                })?,
            }
        }
        "Softmax" => {
            a.only(&["axis"])?;
            let coerce_2d = opset < 13;
            Op::Softmax {
                axis: a.int("axis", if coerce_2d { 1 } else { -1 })?,
                coerce_2d,
            }
        }
        "Pad" => {
            a.only(&["mode"])?;
            let mode = match a.string("mode", "constant")?.as_str() {
                "constant" => PadMode::Constant,
                "reflect" => PadMode::Reflect,
                "edge" => PadMode::Edge,
                other => return Err(a.unsupported(format!("mode '{other}'"))),
            };
            Op::Pad { mode }
        }
        "Transpose" => {
            a.only(&["perm"])?;
            let perm = if a.get("perm").is_some() {
                Some(a.usizes("perm")?)
            } else {
                None
            };
            Op::Transpose { perm }
        }
        "Squeeze" => {
            a.only(&["axes"])?;
            axes_attr(&a, 1, &mut extra)?;
            Op::Squeeze
        }
        "Unsqueeze" => {
            a.only(&["axes"])?;
            axes_attr(&a, 1, &mut extra)?;
            Op::Unsqueeze
        }
        "Dropout" => {
            a.only(&["ratio", "seed"])?;
            Op::Dropout
        }
        "Shape" => {
            a.only(&["start", "end"])?;
            Op::Shape {
                start: a.int("start", 0)?,
                end: a.get("end").map(|e| e.i()),
            }
        }
        "Gather" => {
            a.only(&["axis"])?;
            Op::Gather {
                axis: a.int("axis", 0)?,
            }
        }
        "ConstantOfShape" => {
            a.only(&["value"])?;
            let value = match a.get("value").and_then(|v| v.t.as_ref()) {
                Some(t) => {
                    let t = tensor_from_proto(t, dir).map_err(|e| a.err(format!("value: {e}")))?;
                    if t.len() != 1 {
                        return Err(a.err("value must hold one element".into()));
                    }
                    t
                }
                None => Tensor::f32(vec![1], vec![0.0]),
            };
            Op::ConstantOfShape { value }
        }
        "Cast" => {
            a.only(&["to", "saturate"])?;
            let code = a.int("to", 0)?;
            let to = i32::try_from(code)
                .ok()
                .and_then(DType::from_onnx_code)
                .ok_or_else(|| a.unsupported(format!("cast target type {code}")))?;
            Op::Cast { to }
        }
        "QuantizeLinear" | "DequantizeLinear" => {
            a.only(&["axis", "saturate", "block_size", "output_dtype"])?;
            if a.int("block_size", 0)? != 0 {
                return Err(a.unsupported("blocked quantization (block_size)".into()));
            }
            if a.int("output_dtype", 0)? != 0 {
                return Err(a.unsupported("the output_dtype attribute".into()));
            }
            let axis = a.int("axis", 1)?;
            if np.op_type() == "QuantizeLinear" {
                Op::QuantizeLinear { axis }
            } else {
                Op::DequantizeLinear { axis }
            }
        }
        other => {
            return Err(Error::Unsupported {
                node: node.into(),
                op: other.into(),
                opset,
                what: "operator".into(),
            })
        }
    };
    Ok((op, extra))
}

fn constant_value(np: &proto::NodeProto, dir: Option<&Path>) -> Result<Tensor, String> {
    let a = np
        .attribute
        .first()
        .ok_or("Constant has no value attribute")?;
    if np.attribute.len() != 1 {
        return Err("Constant must have exactly one attribute".into());
    }
    Ok(match a.name() {
        "value" => tensor_from_proto(a.t.as_ref().ok_or("value is not a tensor")?, dir)?,
        "value_float" => Tensor::scalar_f32(a.f()),
        "value_floats" => Tensor::f32(vec![a.floats.len()], a.floats.clone()),
        "value_int" => Tensor::i64(vec![], vec![a.i()]),
        "value_ints" => Tensor::i64(vec![a.ints.len()], a.ints.clone()),
        other => return Err(format!("unsupported Constant attribute '{other}'")),
    })
}

/// "element type N (its ONNX name) is not supported".
fn unsupported_type(code: i32) -> String {
    let name = match code {
        0 => "undefined",
        8 => "string",
        14 => "complex64",
        15 => "complex128",
        16 => "bfloat16",
        17 => "float8e4m3fn",
        18 => "float8e4m3fnuz",
        19 => "float8e5m2",
        20 => "float8e5m2fnuz",
        23 => "float4e2m1",
        24 => "float8e8m0",
        25 => "uint2",
        26 => "int2",
        _ => "unknown",
    };
    format!("element type {code} ({name}) is not supported")
}

/// Decode a TensorProto, checking declared sizes against the bytes present before allocating.
pub fn tensor_from_proto(t: &proto::TensorProto, dir: Option<&Path>) -> Result<Tensor, String> {
    let dtype =
        DType::from_onnx_code(t.data_type()).ok_or_else(|| unsupported_type(t.data_type()))?;
    let mut shape = Vec::with_capacity(t.dims.len());
    let mut n: usize = 1;
    for &d in &t.dims {
        if d < 0 {
            return Err(format!("negative dimension {d}"));
        }
        let d = usize::try_from(d).map_err(|_| "dimension too large".to_string())?;
        n = n
            .checked_mul(d)
            .filter(|&n| n <= MAX_TENSOR_ELEMS)
            .ok_or_else(|| {
                format!(
                    "declared shape {:?} exceeds the limit of {MAX_TENSOR_ELEMS} elements",
                    t.dims
                )
            })?;
        shape.push(d);
    }
    if t.segment.is_some() {
        return Err("segmented tensors are not supported".into());
    }
    let nbytes = dtype.raw_len(n);
    let raw_inline = t.raw_data.is_some() || (n == 0 && no_typed_data(t));
    let external: Option<Vec<u8>> = if t.data_location() == DataLocation::External {
        Some(read_external(t, dir, nbytes)?)
    } else {
        None
    };
    if external.is_none() && raw_inline && t.raw_data().len() != nbytes {
        return Err(format!(
            "declared shape {:?} of {dtype} needs {nbytes} bytes but raw_data holds {}",
            t.dims,
            t.raw_data().len()
        ));
    }
    let bytes: Option<&[u8]> = match &external {
        Some(v) => Some(v),
        None if raw_inline => Some(t.raw_data()),
        None => None,
    };
    let data = match bytes {
        Some(b) if matches!(dtype, DType::I4 | DType::U4) => {
            Data::I64(crate::ir::qdq::unpack4(b, n, dtype == DType::I4))
        }
        None if matches!(dtype, DType::I4 | DType::U4) => {
            // int32_data holds the packed bytes, one per entry (two elements each).
            if t.int32_data.len() != n.div_ceil(2) {
                return Err(format!(
                    "declared shape {:?} of {dtype} needs {} packed bytes but int32_data holds {}",
                    t.dims,
                    n.div_ceil(2),
                    t.int32_data.len()
                ));
            }
            let packed = t
                .int32_data
                .iter()
                .map(|&b| u8::try_from(b))
                .collect::<Result<Vec<u8>, _>>()
                .map_err(|_| format!("{dtype} int32_data entries must be bytes (0..=255)"))?;
            Data::I64(crate::ir::qdq::unpack4(&packed, n, dtype == DType::I4))
        }
        Some(b) => decode_raw(b, dtype),
        None => {
            let check = |len: usize, field: &str| -> Result<(), String> {
                if len != n {
                    Err(format!(
                        "declared shape {:?} has {n} elements but {field} holds {len}",
                        t.dims
                    ))
                } else {
                    Ok(())
                }
            };
            match dtype {
                DType::F32 => {
                    check(t.float_data.len(), "float_data")?;
                    Data::F32(t.float_data.clone())
                }
                DType::F64 => {
                    check(t.double_data.len(), "double_data")?;
                    Data::F32(t.double_data.iter().map(|&x| x as f32).collect())
                }
                DType::F16 => {
                    check(t.int32_data.len(), "int32_data")?;
                    Data::F32(
                        t.int32_data
                            .iter()
                            .map(|&x| half::f16::from_bits(x as u16).to_f32())
                            .collect(),
                    )
                }
                DType::I64 => {
                    check(t.int64_data.len(), "int64_data")?;
                    Data::I64(t.int64_data.clone())
                }
                DType::U32 | DType::U64 => {
                    check(t.uint64_data.len(), "uint64_data")?;
                    Data::I64(t.uint64_data.iter().map(|&x| x as i64).collect())
                }
                _ => {
                    check(t.int32_data.len(), "int32_data")?;
                    Data::I64(t.int32_data.iter().map(|&x| x as i64).collect())
                }
            }
        }
    };
    Ok(Tensor { dtype, shape, data })
}

fn no_typed_data(t: &proto::TensorProto) -> bool {
    t.float_data.is_empty()
        && t.int32_data.is_empty()
        && t.int64_data.is_empty()
        && t.double_data.is_empty()
        && t.uint64_data.is_empty()
}

fn decode_raw(b: &[u8], dtype: DType) -> Data {
    macro_rules! le {
        ($t:ty, $n:expr) => {
            b.chunks_exact($n)
                .map(|c| <$t>::from_le_bytes(c.try_into().unwrap()))
        };
    }
    match dtype {
        DType::F32 => Data::F32(le!(f32, 4).collect()),
        DType::F64 => Data::F32(le!(f64, 8).map(|x| x as f32).collect()),
        DType::F16 => Data::F32(
            le!(u16, 2)
                .map(|x| half::f16::from_bits(x).to_f32())
                .collect(),
        ),
        DType::I64 => Data::I64(le!(i64, 8).collect()),
        DType::U64 => Data::I64(le!(u64, 8).map(|x| x as i64).collect()),
        DType::I32 => Data::I64(le!(i32, 4).map(i64::from).collect()),
        DType::U32 => Data::I64(le!(u32, 4).map(i64::from).collect()),
        DType::I16 => Data::I64(le!(i16, 2).map(i64::from).collect()),
        DType::U16 => Data::I64(le!(u16, 2).map(i64::from).collect()),
        DType::I8 => Data::I64(b.iter().map(|&x| i64::from(x as i8)).collect()),
        DType::U8 | DType::Bool | DType::U4 | DType::I4 => {
            Data::I64(b.iter().map(|&x| i64::from(x)).collect())
        }
    }
}

/// Resolve an external-data location inside `dir`, refusing absolute paths, `..` and symlink escapes.
pub fn confine(dir: &Path, location: &str) -> Result<PathBuf, String> {
    if location.is_empty() {
        return Err("external data has an empty location".into());
    }
    let p = Path::new(location);
    for c in p.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            _ => {
                return Err(format!(
                    "external data location '{location}' must be a relative path inside the model's directory"
                ))
            }
        }
    }
    if location.contains('\\') || location.contains(':') {
        return Err(format!(
            "external data location '{location}' must be a plain relative path"
        ));
    }
    let full = dir.join(p);
    let canon = full
        .canonicalize()
        .map_err(|e| format!("external data file '{}': {e}", full.display()))?;
    let root = dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    if !canon.starts_with(&root) {
        return Err(format!(
            "external data location '{location}' escapes the model's directory"
        ));
    }
    Ok(canon)
}

fn read_external(
    t: &proto::TensorProto,
    dir: Option<&Path>,
    nbytes: usize,
) -> Result<Vec<u8>, String> {
    let dir = dir.ok_or("external data needs the model's directory")?;
    let mut location = None;
    let mut offset: u64 = 0;
    let mut length: Option<u64> = None;
    for kv in &t.external_data {
        let v = kv.value();
        match kv.key() {
            "location" => location = Some(v.to_string()),
            "offset" => {
                offset = v
                    .parse()
                    .map_err(|_| format!("bad external data offset '{v}'"))?
            }
            "length" => {
                length = Some(
                    v.parse()
                        .map_err(|_| format!("bad external data length '{v}'"))?,
                )
            }
            _ => {}
        }
    }
    let location = location.ok_or("external data has no location")?;
    let path = confine(dir, &location)?;
    let mut f = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let size = f
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    if !f.metadata().map(|m| m.is_file()).unwrap_or(false) {
        return Err(format!("external data '{location}' is not a regular file"));
    }
    let want = nbytes as u64;
    if let Some(l) = length {
        if l != want {
            return Err(format!(
                "external data length {l} differs from the {want} bytes the shape needs"
            ));
        }
    }
    if offset.checked_add(want).is_none_or(|end| end > size) {
        return Err(format!(
            "external data '{location}' holds {size} bytes, fewer than offset {offset} + {want} declared"
        ));
    }
    f.seek(SeekFrom::Start(offset))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut buf = vec![0u8; nbytes];
    f.read_exact(&mut buf)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{
        tensor_shape_proto::{dimension::Value as DV, Dimension},
        type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
        TensorShapeProto, TypeProto, ValueInfoProto,
    };

    fn vi(name: &str, elem: i32, dims: &[i64]) -> ValueInfoProto {
        ValueInfoProto {
            name: Some(name.into()),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: Some(elem),
                    shape: Some(TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|&d| Dimension {
                                value: Some(DV::DimValue(d)),
                                ..Default::default()
                            })
                            .collect(),
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// `y = op(x)` on a float [2] input at `opset`, with one int attribute.
    fn one_node(op: &str, opset: i64, attr: Option<(&str, i64)>) -> ModelProto {
        ModelProto {
            ir_version: Some(10),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(opset),
            }],
            graph: Some(GraphProto {
                name: Some("g".into()),
                node: vec![NodeProto {
                    op_type: Some(op.into()),
                    input: vec!["x".into()],
                    output: vec!["y".into()],
                    attribute: attr
                        .map(|(n, v)| AttributeProto {
                            name: Some(n.into()),
                            i: Some(v),
                            r#type: Some(AttributeType::Int as i32),
                            ..Default::default()
                        })
                        .into_iter()
                        .collect(),
                    ..Default::default()
                }],
                input: vec![vi("x", 1, &[2])],
                output: vec![vi("y", 1, &[2])],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn opsets_up_to_28_are_read_and_their_new_attributes_refused() {
        for opset in [21, 22, 25, 28] {
            import(&one_node("Relu", opset, None), None).unwrap();
            import(&one_node("Cast", opset, Some(("to", 1))), None).unwrap();
        }
        let e = import(&one_node("Relu", 29, None), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("opset 29 is not supported"), "{e}");
        let e = import(&one_node("Cast", 28, Some(("round_mode", 1))), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("attribute 'round_mode'"), "{e}");
        let e = import(
            &one_node("QuantizeLinear", 28, Some(("precision", 1))),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("attribute 'precision'"), "{e}");
        let e = import(
            &one_node("DequantizeLinear", 28, Some(("output_dtype", 1))),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("output_dtype"), "{e}");
    }

    #[test]
    fn int4_tensors_read_from_packed_int32_data() {
        // As onnx.numpy_helper writes them: [0, 1, 7, -4, -8] packed low nibble first.
        let t = proto::TensorProto {
            dims: vec![5],
            data_type: Some(22),
            int32_data: vec![16, 199, 8],
            ..Default::default()
        };
        let x = tensor_from_proto(&t, None).unwrap();
        assert_eq!(x.to_i64_vec(), vec![0, 1, 7, -4, -8]);
        let short = proto::TensorProto {
            int32_data: vec![16, 199],
            ..t.clone()
        };
        let e = tensor_from_proto(&short, None).unwrap_err();
        assert!(e.contains("needs 3 packed bytes"), "{e}");
        let wide = proto::TensorProto {
            int32_data: vec![16, 199, 300],
            ..t
        };
        assert!(tensor_from_proto(&wide, None).is_err());
    }

    #[test]
    fn bound_inputs_become_constants_of_the_declared_type() {
        let mut m = one_node("Relu", 21, None);
        let g = m.graph.as_mut().unwrap();
        g.input.push(vi("k", 7, &[1]));
        g.node[0].op_type = Some("Add".into());
        g.node[0].input.push("k".into());
        // An int64 input alone is refused (zq graphs take float inputs) ...
        let e = import(&m, None).unwrap_err().to_string();
        assert!(e.contains("input 'k' has element type int64"), "{e}");
        // ... bound, it is a constant.
        let mut bound = HashMap::new();
        bound.insert("k".to_string(), Tensor::i64(vec![1], vec![3]));
        let g = import_bound(&m, None, &bound).unwrap();
        assert_eq!(g.inputs.len(), 1);
        let k = g.values.iter().position(|v| v.name == "k").unwrap();
        assert_eq!(g.konst(k).unwrap().to_i64_vec(), vec![3]);
        // A bound value of another type is refused, naming the input.
        bound.insert("k".to_string(), Tensor::f32(vec![1], vec![3.0]));
        let e = import_bound(&m, None, &bound).unwrap_err().to_string();
        assert!(e.contains("input 'k' is declared int64"), "{e}");
    }
}
