//! Executors. This module is the reference executor: `Plan` runs a specialised graph on
//! candle-core tensors (CPU, differentiable: every op is built from candle ops with gradients,
//! so distillation can back-propagate to the input), with `conv` (the one place convolutions are
//! lowered) and `fused` (BN and ReLU with one-pass backward). `compiled` holds the engines that
//! lower a graph once into steps over preallocated buffers; `ort` loads ONNX Runtime, the oracle.

pub mod compiled;
pub mod conv;
pub mod fused;
pub mod native;
pub mod ort;

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::ir::infer::{self, SliceAxis, Window};
use crate::ir::{passes, DType, Graph, Node, Op, PadMode, ValueId};
use conv::ConvGeom;

/// Static, per-batch-size parameters of a node, resolved once.
#[derive(Debug, Clone)]
enum Kind {
    Conv(ConvGeom, bool /* 1-d */),
    MaxPool(Window, bool),
    AvgPool(Window, bool, Tensor /* divisor [1,1,oh,ow] */),
    /// Output shape of a pure reshape (Reshape, Flatten, Squeeze, Unsqueeze).
    Reshape(Vec<usize>),
    Slice(Vec<SliceAxis>),
    Pad(Vec<usize>, Vec<usize>, f32, PadMode),
    Transpose(Vec<usize>),
    Concat(usize),
    Softmax(usize, bool),
    Clip(f32, f32),
    BatchNorm,
    /// QuantizeLinear: the integer range of the output type.
    Quantize((f32, f32)),
    Gather(usize, Tensor, Vec<usize>),
    Other,
}

#[derive(Debug, Clone)]
struct Step {
    node: usize,
    kind: Kind,
}

/// Options for one run.
#[derive(Default)]
pub struct RunOptions<'a> {
    /// Values to return besides the graph outputs (e.g. BatchNormalization inputs).
    pub taps: &'a [ValueId],
    /// Replace constant values (e.g. weights) for this run.
    pub overrides: Option<&'a HashMap<ValueId, Tensor>>,
}

/// A graph specialised for one batch size, ready to run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub graph: Graph,
    pub batch: usize,
    steps: Vec<Step>,
    consts: HashMap<ValueId, Tensor>,
    /// For each value, the index of the last step that reads it (values are freed after).
    last_use: HashMap<ValueId, usize>,
    device: Device,
}

fn to_candle(t: &crate::ir::Tensor, dev: &Device) -> candle_core::Result<Tensor> {
    Tensor::from_vec(t.to_f32_vec(), t.shape.clone(), dev)
}

/// Evaluate a node whose inputs are all constant with candle (constant folding of float ops).
pub fn fold_with_candle(
    g: &Graph,
    n: &Node,
    _shapes: &[Vec<usize>],
) -> Result<Option<Vec<crate::ir::Tensor>>, String> {
    // Only float-valued ops; integer tensors are folded by the host evaluator.
    if n.inputs
        .iter()
        .flatten()
        .any(|&v| !g.konst(v).unwrap().is_float())
    {
        return Ok(None);
    }
    let dev = Device::Cpu;
    let kind = lower(g, n, &dev).map_err(|e| e.to_string())?;
    let ins: Vec<Option<Tensor>> = n
        .inputs
        .iter()
        .map(|i| i.map(|v| to_candle(g.konst(v).unwrap(), &dev)).transpose())
        .collect::<candle_core::Result<_>>()
        .map_err(|e| e.to_string())?;
    let out = eval(n, &kind, &ins).map_err(|e| e.to_string())?;
    let v = out
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| e.to_string())?;
    if n.outputs.len() > 1 {
        return Ok(None);
    }
    Ok(Some(vec![crate::ir::Tensor::f32(out.dims().to_vec(), v)]))
}

impl Plan {
    /// Specialise `g` for `batch` and resolve every node's static parameters.
    pub fn new(g: &Graph, batch: usize) -> Result<Plan> {
        let dev = Device::Cpu;
        let folder = |g: &Graph, n: &Node, s: &[Vec<usize>]| fold_with_candle(g, n, s);
        let graph = passes::specialize(g, batch, &folder)?;
        let mut steps = Vec::with_capacity(graph.nodes.len());
        let mut consts = HashMap::new();
        let mut last_use = HashMap::new();
        for (i, n) in graph.nodes.iter().enumerate() {
            let kind = lower(&graph, n, &dev)
                .map_err(|e| Error::node(&n.name, n.op.name(), e.to_string()))?;
            for v in n.inputs.iter().flatten() {
                if let Some(t) = graph.konst(*v) {
                    if !consts.contains_key(v) {
                        consts.insert(*v, to_candle(t, &dev)?);
                    }
                } else if !graph.values[*v].dtype.is_float()
                    && !matches!(n.op, Op::DequantizeLinear { .. })
                {
                    return Err(Error::node(
                        &n.name,
                        n.op.name(),
                        format!(
                            "integer tensor '{}' is computed at run time; zq runs float graphs",
                            graph.values[*v].name
                        ),
                    ));
                }
                last_use.insert(*v, i);
            }
            steps.push(Step { node: i, kind });
        }
        for &o in &graph.outputs {
            if let Some(t) = graph.konst(o) {
                consts.insert(o, to_candle(t, &dev)?);
            }
        }
        Ok(Plan {
            graph,
            batch,
            steps,
            consts,
            last_use,
            device: dev,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Shape of the i-th graph input for this batch size.
    pub fn input_shape(&self, i: usize) -> &[usize] {
        self.graph.values[self.graph.inputs[i].value]
            .shape
            .as_deref()
            .unwrap()
    }

    /// Constant value as a candle tensor (weights, BN statistics).
    pub fn constant(&self, v: ValueId) -> Option<&Tensor> {
        self.consts.get(&v)
    }

    /// Run the graph; returns the graph outputs.
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        Ok(self.run_with(inputs, &RunOptions::default())?.0)
    }

    /// A value environment holding the graph inputs, checked against the planned shapes.
    fn bind(&self, inputs: &[Tensor]) -> Result<Vec<Option<Tensor>>> {
        let g = &self.graph;
        if inputs.len() != g.inputs.len() {
            return Err(Error::Usage(format!(
                "model takes {} inputs, got {}",
                g.inputs.len(),
                inputs.len()
            )));
        }
        let mut env: Vec<Option<Tensor>> = vec![None; g.values.len()];
        for (gi, x) in g.inputs.iter().zip(inputs) {
            let want = g.values[gi.value].shape.as_deref().unwrap();
            if x.dims() != want {
                return Err(Error::Usage(format!(
                    "input '{}' has shape {:?}, the model expects {want:?}",
                    g.values[gi.value].name,
                    x.dims()
                )));
            }
            env[gi.value] = Some(x.clone());
        }
        Ok(env)
    }

    /// Compute step `si` from the values in `env` (constants and overrides filled in).
    fn step(
        &self,
        si: usize,
        env: &mut [Option<Tensor>],
        overrides: Option<&HashMap<ValueId, Tensor>>,
    ) -> Result<()> {
        let s = &self.steps[si];
        let n = &self.graph.nodes[s.node];
        let ins: Vec<Option<Tensor>> = n
            .inputs
            .iter()
            .map(|i| {
                i.and_then(|v| {
                    overrides
                        .and_then(|o| o.get(&v).cloned())
                        .or_else(|| env[v].clone())
                        .or_else(|| self.consts.get(&v).cloned())
                })
            })
            .collect();
        let y =
            eval(n, &s.kind, &ins).map_err(|e| Error::node(&n.name, n.op.name(), e.to_string()))?;
        for (k, &o) in n.outputs.iter().enumerate() {
            env[o] = Some(if k == 0 { y.clone() } else { y.ones_like()? });
        }
        Ok(())
    }

    /// The step that computes node `node` of `self.graph`.
    /// How many steps the plan runs.
    pub fn steps_len(&self) -> usize {
        self.steps.len()
    }

    /// The node step `si` computes.
    pub fn node_of_step(&self, si: usize) -> usize {
        self.steps[si].node
    }

    pub fn step_of(&self, node: usize) -> Option<usize> {
        self.steps.iter().position(|s| s.node == node)
    }

    /// The steps computing the nodes whose first output is in `values`, in execution order.
    pub fn steps_producing(&self, values: &std::collections::HashSet<ValueId>) -> Vec<usize> {
        (0..self.steps.len())
            .filter(|&si| {
                let n = &self.graph.nodes[self.steps[si].node];
                n.outputs.first().is_some_and(|o| values.contains(o))
            })
            .collect()
    }

    /// Run `steps` (indices into this plan, in order) in `env`, a value table of
    /// `graph.values.len()` entries holding what they read; `overrides` replace constants;
    /// `after(v, t)` sees each value produced and its result is what later steps read (a
    /// block's fake quantization). Gradients flow through all of it.
    pub fn run_steps(
        &self,
        env: &mut [Option<Tensor>],
        steps: &[usize],
        overrides: Option<&HashMap<ValueId, Tensor>>,
        after: &mut dyn FnMut(ValueId, Tensor) -> Result<Tensor>,
    ) -> Result<()> {
        for &si in steps {
            self.step(si, env, overrides)?;
            for &o in &self.graph.nodes[self.steps[si].node].outputs {
                if let Some(t) = env[o].take() {
                    env[o] = Some(after(o, t)?);
                }
            }
        }
        Ok(())
    }

    /// Run once and keep every value computed (the cache [`Plan::run_from`] starts from).
    pub fn run_keep_all(&self, inputs: &[Tensor]) -> Result<Vec<Option<Tensor>>> {
        let mut env = self.bind(inputs)?;
        for si in 0..self.steps.len() {
            self.step(si, &mut env, None)?;
        }
        Ok(env)
    }

    /// Re-run from step `from` with `overrides`, taking the graph inputs and every value computed
    /// before `from` from `cache` (a [`Plan::run_keep_all`] result); returns the graph outputs.
    /// Perturbing one layer then costs only the layers after it.
    pub fn run_from(
        &self,
        cache: &[Option<Tensor>],
        from: usize,
        overrides: Option<&HashMap<ValueId, Tensor>>,
    ) -> Result<Vec<Tensor>> {
        let g = &self.graph;
        let mut env: Vec<Option<Tensor>> = vec![None; g.values.len()];
        for gi in &g.inputs {
            env[gi.value] = cache[gi.value].clone();
        }
        for s in &self.steps[..from.min(self.steps.len())] {
            for &o in &g.nodes[s.node].outputs {
                env[o] = cache[o].clone();
            }
        }
        for si in from..self.steps.len() {
            self.step(si, &mut env, overrides)?;
        }
        g.outputs
            .iter()
            .map(|&v| {
                env[v]
                    .clone()
                    .or_else(|| self.consts.get(&v).cloned())
                    .ok_or_else(|| {
                        Error::Usage(format!("value '{}' was not computed", g.values[v].name))
                    })
            })
            .collect()
    }

    /// Run the graph; returns the outputs and the tapped values, in the order asked.
    pub fn run_with(
        &self,
        inputs: &[Tensor],
        opts: &RunOptions,
    ) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        let g = &self.graph;
        let mut env = self.bind(inputs)?;
        let keep: std::collections::HashSet<ValueId> =
            g.outputs.iter().chain(opts.taps.iter()).copied().collect();
        let get = |env: &Vec<Option<Tensor>>, v: ValueId| -> Option<Tensor> {
            if let Some(t) = opts.overrides.and_then(|o| o.get(&v)) {
                return Some(t.clone());
            }
            env[v].clone().or_else(|| self.consts.get(&v).cloned())
        };
        for (si, s) in self.steps.iter().enumerate() {
            let n = &g.nodes[s.node];
            self.step(si, &mut env, opts.overrides)?;
            for v in n.inputs.iter().flatten() {
                if self.last_use.get(v) == Some(&si) && !keep.contains(v) {
                    env[*v] = None;
                }
            }
        }
        let fetch = |v: &ValueId| {
            get(&env, *v).ok_or_else(|| {
                Error::Usage(format!("value '{}' was not computed", g.values[*v].name))
            })
        };
        let outs = g.outputs.iter().map(fetch).collect::<Result<Vec<_>>>()?;
        let taps = opts.taps.iter().map(fetch).collect::<Result<Vec<_>>>()?;
        Ok((outs, taps))
    }
}

fn shape_of<'a>(g: &'a Graph, n: &Node, i: usize) -> &'a [usize] {
    n.input(i)
        .and_then(|v| g.values[v].shape.as_deref())
        .unwrap_or(&[])
}

/// Lift 1-D windows to 2-D (H = 1).
fn lift(w: Window) -> (Window, bool) {
    if w.kernel.len() == 1 {
        let w2 = Window {
            kernel: vec![1, w.kernel[0]],
            strides: vec![1, w.strides[0]],
            dilations: vec![1, w.dilations[0]],
            pad_begin: vec![0, w.pad_begin[0]],
            pad_end: vec![0, w.pad_end[0]],
            out: vec![1, w.out[0]],
        };
        (w2, true)
    } else {
        (w, false)
    }
}

fn lower(g: &Graph, n: &Node, dev: &Device) -> std::result::Result<Kind, String> {
    let out_shape = || g.values[n.outputs[0]].shape.clone().unwrap_or_default();
    Ok(match &n.op {
        Op::Conv(a) => {
            let x = shape_of(g, n, 0);
            if !(3..=4).contains(&x.len()) {
                return Err(format!(
                    "only 1-D and 2-D convolutions are supported, input is {x:?}"
                ));
            }
            let (win, one_d) = lift(infer::window_of(g, n)?);
            Kind::Conv(
                ConvGeom {
                    win,
                    group: a.group.max(1),
                },
                one_d,
            )
        }
        Op::MaxPool(_) | Op::AveragePool(_) => {
            let x = shape_of(g, n, 0);
            if !(3..=4).contains(&x.len()) {
                return Err(format!(
                    "only 1-D and 2-D pooling is supported, input is {x:?}"
                ));
            }
            let (win, one_d) = lift(infer::window_of(g, n)?);
            match &n.op {
                Op::MaxPool(_) => Kind::MaxPool(win, one_d),
                Op::AveragePool(p) => {
                    let (h, w) = if one_d { (1, x[2]) } else { (x[2], x[3]) };
                    let div = avg_divisor(&win, h, w, p.count_include_pad);
                    let t = Tensor::from_vec(div, (1, 1, win.out[0], win.out[1]), dev)
                        .map_err(|e| e.to_string())?;
                    Kind::AvgPool(win, one_d, t)
                }
                _ => unreachable!(),
            }
        }
        Op::Reshape { .. } | Op::Flatten { .. } | Op::Squeeze | Op::Unsqueeze => {
            Kind::Reshape(out_shape())
        }
        Op::Slice => Kind::Slice(infer::slice_of(g, n)?),
        Op::Pad { mode } => {
            let (b, e, v) = infer::pad_of(g, n)?;
            Kind::Pad(b, e, v, *mode)
        }
        Op::Transpose { perm } => Kind::Transpose(infer::transpose_perm(
            shape_of(g, n, 0).len(),
            perm.as_deref(),
        )?),
        Op::Concat { axis } => Kind::Concat(infer::norm_axis(*axis, shape_of(g, n, 0).len())?),
        Op::Softmax { axis, coerce_2d } => Kind::Softmax(
            infer::norm_axis(*axis, shape_of(g, n, 0).len())?,
            *coerce_2d,
        ),
        Op::Clip => {
            let (lo, hi) = infer::clip_of(g, n)?;
            Kind::Clip(lo, hi)
        }
        Op::BatchNorm { .. } => Kind::BatchNorm,
        Op::Gather { axis } => {
            let x = shape_of(g, n, 0);
            let a = infer::norm_axis(*axis, x.len())?;
            let idx = n
                .input(1)
                .and_then(|v| g.konst(v))
                .ok_or("Gather indices must be constant")?
                .to_i64_vec();
            let mut flat = Vec::with_capacity(idx.len());
            for i in idx {
                let j = if i < 0 { i + x[a] as i64 } else { i };
                if j < 0 || j >= x[a] as i64 {
                    return Err(format!("Gather index {i} out of range for dim {}", x[a]));
                }
                flat.push(j as u32);
            }
            let len = flat.len();
            Kind::Gather(
                a,
                Tensor::from_vec(flat, len, dev).map_err(|e| e.to_string())?,
                out_shape(),
            )
        }
        Op::Cast { to } if !to.is_float() => {
            return Err(format!(
                "Cast of a run-time tensor to {to} is not supported"
            ));
        }
        Op::Shape { .. } | Op::ConstantOfShape { .. } => {
            return Err("shape arithmetic was not folded".into());
        }
        Op::QuantizeLinear { .. } => {
            let dt = n
                .input(2)
                .map_or(crate::ir::DType::U8, |z| g.values[z].dtype);
            Kind::Quantize(
                crate::ir::qdq::qrange(dt)
                    .ok_or_else(|| format!("quantizing to {dt} is not supported"))?,
            )
        }
        // Computed directly from their inputs in `eval`; listed, so a new op is a compile
        // error here rather than a silent fall-through.
        Op::Gemm { .. }
        | Op::MatMul
        | Op::Relu
        | Op::LeakyRelu { .. }
        | Op::PRelu
        | Op::Sigmoid
        | Op::HardSigmoid { .. }
        | Op::HardSwish
        | Op::Tanh
        | Op::Erf
        | Op::Add
        | Op::Sub
        | Op::Mul
        | Op::Div
        | Op::GlobalAveragePool
        | Op::GlobalMaxPool
        | Op::Identity
        | Op::Dropout
        | Op::Cast { .. }
        | Op::DequantizeLinear { .. } => Kind::Other,
    })
}

/// Average-pool divisor per output position (ONNX Runtime semantics).
fn avg_divisor(w: &Window, h: usize, wd: usize, include_pad: bool) -> Vec<f32> {
    let mut per_axis: Vec<Vec<usize>> = Vec::new();
    for (a, &len) in [h, wd].iter().enumerate() {
        let mut v = Vec::new();
        for o in 0..w.out[a] {
            let start = (o * w.strides[a]) as i64 - w.pad_begin[a] as i64;
            let mut count = 0;
            for k in 0..w.kernel[a] {
                let p = start + (k * w.dilations[a]) as i64;
                let inside = p >= 0 && p < len as i64;
                let in_pad = p >= -(w.pad_begin[a] as i64) && p < (len + w.pad_end[a]) as i64;
                if inside || (include_pad && in_pad) {
                    count += 1;
                }
            }
            v.push(count.max(1));
        }
        per_axis.push(v);
    }
    let mut out = Vec::new();
    for &a in &per_axis[0] {
        for &b in &per_axis[1] {
            out.push((a * b) as f32);
        }
    }
    out
}

fn req(ins: &[Option<Tensor>], i: usize) -> candle_core::Result<&Tensor> {
    ins.get(i)
        .and_then(|t| t.as_ref())
        .ok_or_else(|| candle_core::Error::Msg(format!("missing input {i}")))
}

fn sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

fn idx_tensor(v: Vec<usize>, dev: &Device) -> candle_core::Result<Tensor> {
    let v: Vec<u32> = v.into_iter().map(|i| i as u32).collect();
    let n = v.len();
    Tensor::from_vec(v, n, dev)
}

fn to4(x: &Tensor, one_d: bool) -> candle_core::Result<Tensor> {
    if one_d {
        x.unsqueeze(2)
    } else {
        Ok(x.clone())
    }
}

fn from4(y: Tensor, one_d: bool) -> candle_core::Result<Tensor> {
    if one_d {
        y.squeeze(2)
    } else {
        Ok(y)
    }
}

/// Per-channel broadcast shape [1, C, 1, ...] for a rank-r input.
fn chan(t: &Tensor, rank: usize) -> candle_core::Result<Tensor> {
    let mut s = vec![1; rank];
    s[1] = t.elem_count();
    t.reshape(s)
}

fn eval(n: &Node, kind: &Kind, ins: &[Option<Tensor>]) -> candle_core::Result<Tensor> {
    let x = req(ins, 0)?;
    let dev = x.device();
    Ok(match (&n.op, kind) {
        (Op::Conv(_), Kind::Conv(geom, one_d)) => {
            let w = to4(req(ins, 1)?, *one_d)?;
            let y = conv::conv2d(
                &to4(x, *one_d)?,
                &w,
                ins.get(2).and_then(|b| b.as_ref()),
                geom,
            )?;
            from4(y, *one_d)?
        }
        (Op::MaxPool(_), Kind::MaxPool(win, one_d)) => {
            let xp = conv::pad_spatial(&to4(x, *one_d)?, win, f32::NEG_INFINITY)?;
            let xp = conv::extend_for_windows(xp, win, f32::NEG_INFINITY)?;
            let views = conv::windows(&xp, win)?;
            let mut y = views[0].clone();
            for v in &views[1..] {
                y = y.maximum(v)?;
            }
            from4(y, *one_d)?
        }
        (Op::AveragePool(_), Kind::AvgPool(win, one_d, div)) => {
            let xp = conv::pad_spatial(&to4(x, *one_d)?, win, 0.0)?;
            let xp = conv::extend_for_windows(xp, win, 0.0)?;
            let views = conv::windows(&xp, win)?;
            let mut y = views[0].clone();
            for v in &views[1..] {
                y = (y + v)?;
            }
            from4(y.broadcast_div(div)?, *one_d)?
        }
        (Op::GlobalAveragePool, _) => {
            let d = x.dims().to_vec();
            let y = x.flatten_from(2)?.mean_keepdim(2)?;
            let mut s = d[..2].to_vec();
            s.extend(std::iter::repeat_n(1, d.len() - 2));
            y.reshape(s)?
        }
        (Op::GlobalMaxPool, _) => {
            let d = x.dims().to_vec();
            let y = x.flatten_from(2)?.max_keepdim(2)?;
            let mut s = d[..2].to_vec();
            s.extend(std::iter::repeat_n(1, d.len() - 2));
            y.reshape(s)?
        }
        (Op::BatchNorm { epsilon }, _) => {
            let r = x.rank();
            let (scale, bias, mean, var) = (req(ins, 1)?, req(ins, 2)?, req(ins, 3)?, req(ins, 4)?);
            let inv = ((var + f64::from(*epsilon))?.sqrt()?.recip()? * scale)?;
            let shift = (bias - (mean * &inv)?)?;
            if r >= 2 {
                fused::channel_affine(x, inv.to_vec1()?, shift.to_vec1()?)?
            } else {
                x.broadcast_mul(&chan(&inv, r)?)?
                    .broadcast_add(&chan(&shift, r)?)?
            }
        }
        (Op::Relu, _) => fused::relu(x)?,
        (Op::Clip, Kind::Clip(lo, hi)) => {
            let mut y = x.clone();
            if lo.is_finite() {
                y = y.maximum(*lo)?;
            }
            if hi.is_finite() {
                y = y.minimum(*hi)?;
            }
            y
        }
        (Op::LeakyRelu { alpha }, _) => (x.relu()? - (x.neg()?.relu()? * f64::from(*alpha))?)?,
        (Op::PRelu, _) => {
            let slope = req(ins, 1)?;
            x.relu()?
                .broadcast_sub(&x.neg()?.relu()?.broadcast_mul(slope)?)?
        }
        (Op::Sigmoid, _) => sigmoid(x)?,
        (Op::HardSigmoid { alpha, beta }, _) => x
            .affine(f64::from(*alpha), f64::from(*beta))?
            .clamp(0f32, 1f32)?,
        (Op::HardSwish, _) => (x * x.affine(1.0 / 6.0, 0.5)?.clamp(0f32, 1f32)?)?,
        (Op::Tanh, _) => x.tanh()?,
        (Op::Erf, _) => x.erf()?,
        (Op::Add, _) => x.broadcast_add(req(ins, 1)?)?,
        (Op::Sub, _) => x.broadcast_sub(req(ins, 1)?)?,
        (Op::Mul, _) => x.broadcast_mul(req(ins, 1)?)?,
        (Op::Div, _) => x.broadcast_div(req(ins, 1)?)?,
        (_, Kind::Reshape(s)) => x.reshape(s.clone())?,
        // A float16 target rounds (round half to even, as ONNX casts); f32 and f64 keep x.
        (Op::Cast { to: DType::F16 }, _) => x
            .to_dtype(candle_core::DType::F16)?
            .to_dtype(candle_core::DType::F32)?,
        (Op::Identity | Op::Dropout | Op::Cast { .. }, _) => x.clone(),
        (Op::QuantizeLinear { axis } | Op::DequantizeLinear { axis }, _) => {
            // Integer tensors run as f32 holding integer values (exact up to 2^24).
            let scale = req(ins, 1)?.flatten_all()?.to_vec1::<f32>()?;
            let zp = match ins.get(2).and_then(|t| t.as_ref()) {
                Some(t) => Some(
                    t.to_dtype(candle_core::DType::F32)?
                        .flatten_all()?
                        .to_vec1::<f32>()?,
                ),
                None => None,
            };
            let shape = x.dims().to_vec();
            let (a, per) =
                crate::ir::qdq::resolve(&shape, *axis, scale.len(), zp.as_ref().map(Vec::len))
                    .map_err(candle_core::Error::Msg)?;
            let zp = zp.unwrap_or_default();
            let range = match (&n.op, kind) {
                (Op::QuantizeLinear { .. }, Kind::Quantize(range)) => Some(*range),
                _ => None,
            };
            fused::qdq(x, a, per, scale, zp, range)?
        }
        (
            Op::Gemm {
                alpha,
                beta,
                trans_a,
                trans_b,
            },
            _,
        ) => {
            let a = if *trans_a { x.t()? } else { x.clone() };
            let b = req(ins, 1)?;
            let b = if *trans_b { b.t()? } else { b.clone() };
            let mut y = a.contiguous()?.matmul(&b.contiguous()?)?;
            if *alpha != 1.0 {
                y = (y * f64::from(*alpha))?;
            }
            if let Some(c) = ins.get(2).and_then(|c| c.as_ref()) {
                let c = if *beta != 1.0 {
                    (c * f64::from(*beta))?
                } else {
                    c.clone()
                };
                y = y.broadcast_add(&c)?;
            }
            y
        }
        (Op::MatMul, _) => {
            let b = req(ins, 1)?;
            let (ra, rb) = (x.rank(), b.rank());
            let a2 = if ra == 1 { x.unsqueeze(0)? } else { x.clone() };
            let b2 = if rb == 1 { b.unsqueeze(1)? } else { b.clone() };
            let mut y = if a2.rank() == 2 && b2.rank() == 2 {
                a2.contiguous()?.matmul(&b2.contiguous()?)?
            } else {
                a2.contiguous()?.broadcast_matmul(&b2.contiguous()?)?
            };
            if rb == 1 {
                y = y.squeeze(y.rank() - 1)?;
            }
            if ra == 1 {
                y = y.squeeze(y.rank() - if rb == 1 { 1 } else { 2 })?;
            }
            y
        }
        (Op::Concat { .. }, Kind::Concat(a)) => {
            let parts: Vec<&Tensor> = ins.iter().flatten().collect();
            Tensor::cat(&parts, *a)?
        }
        (Op::Softmax { .. }, Kind::Softmax(axis, coerce)) => {
            let d = x.dims().to_vec();
            let (t, ax) = if *coerce {
                let outer: usize = d[..*axis].iter().product();
                (x.reshape((outer, d[*axis..].iter().product::<usize>()))?, 1)
            } else {
                (x.clone(), *axis)
            };
            let m = t.max_keepdim(ax)?;
            let e = t.broadcast_sub(&m)?.exp()?;
            let y = e.broadcast_div(&e.sum_keepdim(ax)?)?;
            y.reshape(d)?
        }
        (Op::Slice, Kind::Slice(spec)) => {
            let mut y = x.clone();
            for s in spec {
                y = if s.step == 1 {
                    y.narrow(s.axis, s.start as usize, s.len)?
                } else {
                    y.index_select(&idx_tensor(s.indices(), dev)?, s.axis)?
                };
            }
            y
        }
        (Op::Pad { .. }, Kind::Pad(b, e, v, mode)) => {
            let mut y = x.clone();
            for a in 0..b.len() {
                if b[a] == 0 && e[a] == 0 {
                    continue;
                }
                y = match mode {
                    PadMode::Constant => conv::pad_axis(&y, a, b[a], e[a], *v)?,
                    _ => {
                        let len = y.dim(a)?;
                        let src: Vec<usize> = (0..len + b[a] + e[a])
                            .map(|i| infer::pad_source(i as i64 - b[a] as i64, len, *mode))
                            .collect();
                        y.index_select(&idx_tensor(src, dev)?, a)?
                    }
                };
            }
            y
        }
        (Op::Transpose { .. }, Kind::Transpose(p)) => x.permute(p.clone())?.contiguous()?,
        (Op::Gather { .. }, Kind::Gather(a, idx, out)) => {
            x.index_select(idx, *a)?.reshape(out.clone())?
        }
        (op, _) => {
            return Err(candle_core::Error::Msg(format!(
                "no lowering for {}",
                op.name()
            )))
        }
    })
}

/// Argmax over the last axis of a [N, K] tensor (the first of ties, as everywhere in zq).
pub fn argmax_rows(y: &Tensor) -> candle_core::Result<Vec<usize>> {
    let v: Vec<Vec<f32>> = y.flatten_from(1)?.to_vec2()?;
    Ok(v.iter().map(|r| zq_quant::argmax(r)).collect())
}

/// d<y, r>/dx for unit tests of differentiable ops.
#[cfg(test)]
pub(crate) fn grad_along(
    x: &candle_core::Var,
    y: &Tensor,
    r: &Tensor,
) -> candle_core::Result<Tensor> {
    let g = (y * r)?.sum_all()?.backward()?;
    g.get(x.as_tensor())
        .cloned()
        .ok_or_else(|| candle_core::Error::Msg("no gradient reached x".into()))
}
