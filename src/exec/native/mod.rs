//! The native engine: runs QDQ ONNX models on integer kernels.
//!
//! [`compile`] specialises a graph for a batch size and lowers it to a [`Program`] of steps over
//! buffers allocated once (u8 activations in NHWC, f32 values in ONNX layout):
//!
//! * `DequantizeLinear(u8)` of a run-time tensor is not executed: its consumers read the u8
//!   tensor with the DequantizeLinear's scale and zero point.
//! * `DQ(x) , DQ(const int weight) [, DQ(int32 bias)] -> Conv | Gemm | MatMul -> Q` is one
//!   `zq_kernels` call with the requantization fused (`scale = s_x * s_w[c] / s_y`, as ONNX
//!   Runtime's QLinearConv computes it), or with an f32 epilogue when the output is not quantized.
//! * `DQ -> Add -> Q` of two u8 tensors is a requantizing u8 add (ONNX Runtime's QLinearAdd
//!   formula); `DQ -> MaxPool | AveragePool | GlobalAveragePool -> Q` pool u8 NHWC images.
//! * `DQ -> f -> Q` for an elementwise `f` (Relu, Clip, LeakyRelu, Sigmoid, ...) and `DQ -> Q`
//!   are a 256-entry table computed with ONNX's float arithmetic; a table that is a clamp folds
//!   into the producing kernel's output range (Relu on the producer's own scale and zero point).
//! * Data movement (Reshape, Flatten, Squeeze, Unsqueeze, Transpose, Slice, Pad, Identity)
//!   between DQ and Q is an index gather on u8, or a view when nothing moves.
//! * Everything else runs in f32 with the reference executor's op definitions, so any graph
//!   `Plan` runs also runs here (more slowly).
//!
//! Work is split over output pixels and images with rayon; the steps run on a pool thread while
//! the other workers spin for the run, so small steps (batch 1) start without wake-ups.
//! `ZQ_NATIVE_PROFILE=1` prints each step's time (microseconds) to stderr.

mod ops;
mod program;

pub use program::Program;

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use candle_core::Device;
use zq_kernels::int8::{ConvGeometry, DepthwiseWeights, Kernels, PackedWeights};

use crate::error::{Error, Result};
use crate::exec::compiled::infer::{FloatModel, NotCovered};
use crate::exec::{avg_divisor, eval, fold_with_candle, lower};
use crate::ir::{infer, passes, DType, Graph, Node, Op, PadMode, ValueId};
use ops::{AddParams, PoolGeom};
use program::{Buf, ConvStep, Epi, FIn, Group, OutSrc, Step, Weights};

/// An integer constant behind a DequantizeLinear in the graph as read (specialisation folds the
/// DequantizeLinear away; the kernels want the integers).
#[derive(Debug, Clone)]
struct IntConst {
    q: Vec<i64>,
    dtype: DType,
    shape: Vec<usize>,
    scale: Vec<f32>,
    zp: Vec<i64>,
    axis: i64,
}

fn int_consts(g: &Graph) -> HashMap<ValueId, IntConst> {
    let mut m = HashMap::new();
    for n in &g.nodes {
        let Op::DequantizeLinear { axis } = n.op else {
            continue;
        };
        let (Some(x), Some(s)) = (n.input(0).and_then(|v| g.konst(v)), n.input(1)) else {
            continue;
        };
        let Some(s) = g.konst(s) else { continue };
        if x.is_float() {
            continue;
        }
        let zp = match n.input(2) {
            Some(z) => match g.konst(z) {
                Some(z) => z.to_i64_vec(),
                None => continue,
            },
            None => vec![0; s.len()],
        };
        m.insert(
            n.outputs[0],
            IntConst {
                q: x.to_i64_vec(),
                dtype: x.dtype,
                shape: x.shape.clone(),
                scale: s.to_f32_vec(),
                zp,
                axis,
            },
        );
    }
    m
}

/// A u8 tensor (the output of a QuantizeLinear): its buffer, ONNX shape and layout.
#[derive(Debug, Clone)]
struct QVal {
    buf: usize,
    shape: Vec<usize>,
    /// Rank-4 values are stored NHWC.
    nhwc: bool,
}

impl QVal {
    fn len(&self) -> usize {
        self.shape.iter().product()
    }
    /// (channels, pixels) per image for the NCHW <-> storage conversions.
    fn c_hw(&self) -> (usize, usize) {
        if self.nhwc {
            (self.shape[1], self.shape[2] * self.shape[3])
        } else {
            (1, self.len())
        }
    }
}

#[derive(Debug, Clone)]
enum Repr {
    Q(QVal),
    /// DequantizeLinear of the u8 value `src` (per tensor), not materialised.
    Deq {
        src: ValueId,
        scale: f32,
        zp: u8,
    },
    /// f32 in ONNX layout.
    F(usize),
}

struct Cx<'g> {
    g: &'g Graph,
    ints: HashMap<ValueId, IntConst>,
    consumers: HashMap<ValueId, Vec<usize>>,
    outputs: HashSet<ValueId>,
    repr: HashMap<ValueId, Repr>,
    steps: Vec<Step>,
    names: Vec<(String, &'static str)>,
    done: Vec<bool>,
    u8_len: Vec<usize>,
    f32_len: Vec<usize>,
    /// The value a step wrote into each u8 buffer, and that step (for fusing what follows).
    owner: HashMap<usize, (ValueId, usize)>,
    materialized: HashMap<ValueId, usize>,
    /// u8 buffers a zero Pad of the spatial axes wrote: its input, the pads (top, left, bottom,
    /// right), the padding byte and the gather step, for the conv after it to fold in.
    pads: HashMap<usize, (QVal, [usize; 4], u8, usize)>,
    /// Steps a later one made unnecessary (a Pad folded into its conv).
    removed: HashSet<usize>,
    dev: Device,
}

fn unsupported(n: &Node, msg: impl Into<String>) -> Error {
    Error::node(
        &n.name,
        n.op.name(),
        format!("native engine: {}", msg.into()),
    )
}

/// Specialise `g` for `batch` and compile it.
pub fn compile(g: &Graph, batch: usize) -> Result<Program> {
    let ints = int_consts(g);
    let folder = |g: &Graph, n: &Node, s: &[Vec<usize>]| fold_with_candle(g, n, s);
    let sg = passes::specialize(g, batch, &folder)?;
    let kernels = Kernels::from_env().map_err(|e| Error::Usage(e.to_string()))?;
    let mut cx = Cx {
        g: &sg,
        ints,
        consumers: sg.consumers(),
        outputs: sg.outputs.iter().copied().collect(),
        repr: HashMap::new(),
        steps: Vec::new(),
        names: Vec::new(),
        done: vec![false; sg.nodes.len()],
        u8_len: Vec::new(),
        f32_len: Vec::new(),
        owner: HashMap::new(),
        materialized: HashMap::new(),
        pads: HashMap::new(),
        removed: HashSet::new(),
        dev: Device::Cpu,
    };
    let mut inputs = Vec::new();
    for gi in &sg.inputs {
        let v = &sg.values[gi.value];
        if !v.dtype.is_float() {
            return Err(Error::Usage(format!(
                "input '{}' is {}; the native engine takes float inputs",
                v.name, v.dtype
            )));
        }
        let shape = cx.shape(gi.value);
        let b = cx.new_f32(shape.iter().product());
        cx.repr.insert(gi.value, Repr::F(b));
        inputs.push((b, shape));
    }
    for i in 0..sg.nodes.len() {
        if cx.done[i] {
            continue;
        }
        if !cx.node(i)? {
            cx.float(i)?;
        }
    }
    let mut outputs = Vec::new();
    for &o in &sg.outputs {
        let shape = cx.shape(o);
        let src = if let Some(t) = sg.konst(o) {
            OutSrc::Const(t.to_f32_vec())
        } else {
            OutSrc::Buf(cx.f32_of(o, None)?)
        };
        outputs.push((src, shape));
    }
    let Cx {
        steps,
        names,
        u8_len,
        f32_len,
        removed,
        ..
    } = cx;
    let (mut steps, names): (Vec<Step>, Vec<_>) = steps
        .into_iter()
        .zip(names)
        .enumerate()
        .filter(|(k, _)| !removed.contains(k))
        .map(|(_, sn)| sn)
        .unzip();
    for (step, (name, op)) in steps.iter_mut().zip(&names) {
        if let Step::Conv(c) = step {
            c.plan()
                .map_err(|m| Error::node(name, op, format!("native engine: {m}")))?;
        }
    }
    let pinned_f32: Vec<usize> = inputs
        .iter()
        .map(|(b, _)| *b)
        .chain(outputs.iter().filter_map(|(s, _)| match s {
            OutSrc::Buf(b) => Some(*b),
            OutSrc::Const(_) => None,
        }))
        .collect();
    let (_, u8_sizes, f32_map, f32_sizes) = allocate(&mut steps, &u8_len, &f32_len, &pinned_f32);
    let inputs = inputs.into_iter().map(|(b, s)| (f32_map[b], s)).collect();
    let outputs = outputs
        .into_iter()
        .map(|(src, s)| {
            (
                match src {
                    OutSrc::Buf(b) => OutSrc::Buf(f32_map[b]),
                    c => c,
                },
                s,
            )
        })
        .collect();
    Ok(Program {
        steps,
        names,
        u8_bufs: u8_sizes.iter().map(|&n| vec![0u8; n]).collect(),
        f32_bufs: f32_sizes.iter().map(|&n| vec![0f32; n]).collect(),
        inputs,
        outputs,
        kernels,
    })
}

/// Map the virtual buffers to physical ones, reusing a buffer once its last reader has run.
/// Returns (virtual -> physical, physical sizes) for u8 and for f32.
fn allocate(
    steps: &mut [Step],
    u8_len: &[usize],
    f32_len: &[usize],
    pinned_f32: &[usize],
) -> (Vec<usize>, Vec<usize>, Vec<usize>, Vec<usize>) {
    const NONE: usize = usize::MAX;
    // Last step reading (or writing) each virtual buffer.
    let mut last_u8 = vec![0usize; u8_len.len()];
    let mut last_f32 = vec![0usize; f32_len.len()];
    for (si, s) in steps.iter_mut().enumerate() {
        s.bufs(&mut |b, _| match *b {
            Buf::U8(v) => last_u8[v] = si,
            Buf::F32(v) => last_f32[v] = si,
        });
    }
    for &p in pinned_f32 {
        last_f32[p] = usize::MAX;
    }
    struct Pool {
        map: Vec<usize>,
        sizes: Vec<usize>,
        free: Vec<usize>,
    }
    impl Pool {
        fn get(&mut self, v: usize, need: usize) -> usize {
            if self.map[v] != usize::MAX {
                return self.map[v];
            }
            // Best fit among the free buffers, else grow the largest free one, else a new one.
            let pick = self
                .free
                .iter()
                .enumerate()
                .filter(|(_, &p)| self.sizes[p] >= need)
                .min_by_key(|(_, &p)| self.sizes[p])
                .or_else(|| {
                    self.free
                        .iter()
                        .enumerate()
                        .max_by_key(|(_, &p)| self.sizes[p])
                })
                .map(|(i, _)| i);
            let p = match pick {
                Some(i) => self.free.swap_remove(i),
                None => {
                    self.sizes.push(0);
                    self.sizes.len() - 1
                }
            };
            self.sizes[p] = self.sizes[p].max(need);
            self.map[v] = p;
            p
        }
    }
    let mut pu = Pool {
        map: vec![NONE; u8_len.len()],
        sizes: Vec::new(),
        free: Vec::new(),
    };
    let mut pf = Pool {
        map: vec![NONE; f32_len.len()],
        sizes: Vec::new(),
        free: Vec::new(),
    };
    for &p in pinned_f32 {
        pf.get(p, f32_len[p]);
    }
    for (si, s) in steps.iter_mut().enumerate() {
        // Reads are assigned already (written by earlier steps, or pinned inputs); writes get
        // a buffer no live value holds.
        s.bufs(&mut |b, _| match b {
            Buf::U8(v) => *v = pu.get(*v, u8_len[*v]),
            Buf::F32(v) => *v = pf.get(*v, f32_len[*v]),
        });
        // Free what this step read for the last time (physical ids now; find them by map).
        for (v, &l) in last_u8.iter().enumerate() {
            if l == si && pu.map[v] != NONE {
                pu.free.push(pu.map[v]);
            }
        }
        for (v, &l) in last_f32.iter().enumerate() {
            if l == si && pf.map[v] != NONE {
                pf.free.push(pf.map[v]);
            }
        }
    }
    (pu.map, pu.sizes, pf.map, pf.sizes)
}

/// Strides of a value's storage, indexed by ONNX axis.
fn storage_strides(shape: &[usize], nhwc: bool) -> Vec<usize> {
    if nhwc && shape.len() == 4 {
        let (c, h, w) = (shape[1], shape[2], shape[3]);
        vec![h * w * c, 1, w * c, c]
    } else {
        crate::ir::tensor::strides(shape)
    }
}

impl Cx<'_> {
    fn shape(&self, v: ValueId) -> Vec<usize> {
        self.g.values[v].shape.clone().unwrap_or_default()
    }

    fn new_u8(&mut self, len: usize) -> usize {
        self.u8_len.push(len);
        self.u8_len.len() - 1
    }

    fn new_f32(&mut self, len: usize) -> usize {
        self.f32_len.push(len);
        self.f32_len.len() - 1
    }

    fn push(&mut self, node: usize, s: Step) -> usize {
        let n = &self.g.nodes[node];
        self.steps.push(s);
        self.names.push((n.name.clone(), n.op.name()));
        self.steps.len() - 1
    }

    /// The only node reading `v` (read once), when `v` is not a graph output.
    fn sole_consumer(&self, v: ValueId) -> Option<usize> {
        if self.outputs.contains(&v) {
            return None;
        }
        match self.consumers.get(&v).map(Vec::as_slice) {
            Some(&[c]) => Some(c),
            _ => None,
        }
    }

    /// Per-tensor uint8 parameters of a QuantizeLinear / DequantizeLinear node.
    fn qparams(&self, n: &Node) -> Option<(f32, u8)> {
        let s = self.g.konst(n.input(1)?)?;
        let s = match s.to_f32_vec().as_slice() {
            &[s] if s.is_finite() && s > 0.0 => s,
            _ => return None,
        };
        let z = match n.input(2) {
            None => 0,
            Some(z) => {
                let t = self.g.konst(z)?;
                if t.dtype != DType::U8 || t.len() != 1 {
                    return None;
                }
                u8::try_from(t.to_i64_vec()[0]).ok()?
            }
        };
        Some((s, z))
    }

    /// The QuantizeLinear (per tensor, uint8) that alone consumes `v`: (node, scale, zero point).
    fn q_target(&self, v: ValueId) -> Option<QTarget> {
        let j = self.sole_consumer(v)?;
        let n = &self.g.nodes[j];
        if !matches!(n.op, Op::QuantizeLinear { .. }) || n.input(0) != Some(v) {
            return None;
        }
        let (s, z) = self.qparams(n)?;
        Some((j, s, z))
    }

    /// `v -> Relu | Clip -> Q` with `v` consumed only by the activation and the activation only
    /// by the Q: (the activation node, the Q target, the activation's clamp range).
    fn act_then_q(&self, v: ValueId) -> Option<(usize, QTarget, (f32, f32))> {
        let j = self.sole_consumer(v)?;
        let n = &self.g.nodes[j];
        if n.input(0) != Some(v) || n.outputs.len() != 1 {
            return None;
        }
        let range = match &n.op {
            Op::Relu => (0.0, f32::INFINITY),
            Op::Clip => infer::clip_of(self.g, n).ok()?,
            _ => return None,
        };
        Some((j, self.q_target(n.outputs[0])?, range))
    }

    /// `v` as a DequantizeLinear of a u8 tensor: (the tensor, scale, zero point).
    fn deq(&self, v: Option<ValueId>) -> Option<(QVal, f32, u8)> {
        match self.repr.get(&v?)? {
            Repr::Deq { src, scale, zp } => match self.repr.get(src)? {
                Repr::Q(q) => Some((q.clone(), *scale, *zp)),
                _ => None,
            },
            _ => None,
        }
    }

    /// Record `q`'s output as the u8 tensor `qv`, written by `step` (if a step wrote it).
    fn set_q(&mut self, qnode: usize, qv: QVal, step: Option<usize>) {
        let out = self.g.nodes[qnode].outputs[0];
        if let Some(s) = step {
            self.owner.insert(qv.buf, (out, s));
        }
        self.repr.insert(out, Repr::Q(qv));
        self.done[qnode] = true;
    }

    /// Handle node `i` natively; `false` leaves it to the float fallback.
    fn node(&mut self, i: usize) -> Result<bool> {
        let g = self.g;
        let n = &g.nodes[i];
        match &n.op {
            Op::DequantizeLinear { .. } => {
                let Some(x) = n.input(0) else {
                    return Ok(false);
                };
                if !matches!(self.repr.get(&x), Some(Repr::Q(_))) {
                    return Ok(false);
                }
                let Some((scale, zp)) = self.qparams(n) else {
                    return Ok(false);
                };
                self.repr
                    .insert(n.outputs[0], Repr::Deq { src: x, scale, zp });
                self.done[i] = true;
                Ok(true)
            }
            Op::QuantizeLinear { .. } => self.quantize(i),
            Op::Conv(_) | Op::Gemm { .. } | Op::MatMul => self.linear(i),
            Op::Add => self.add(i),
            Op::MaxPool(_) | Op::AveragePool(_) | Op::GlobalAveragePool | Op::GlobalMaxPool => {
                self.pool(i)
            }
            Op::Relu
            | Op::Clip
            | Op::LeakyRelu { .. }
            | Op::Sigmoid
            | Op::HardSigmoid { .. }
            | Op::HardSwish
            | Op::Tanh
            | Op::Erf => self.unary(i),
            Op::Identity
            | Op::Dropout
            | Op::Flatten { .. }
            | Op::Reshape { .. }
            | Op::Squeeze
            | Op::Unsqueeze
            | Op::Transpose { .. }
            | Op::Slice
            | Op::Pad { .. } => self.movement(i),
            _ => Ok(false),
        }
    }

    /// Whether outputs after the first are unused (then a one-output lowering is exact).
    fn extra_outputs_unused(&self, n: &Node) -> bool {
        n.outputs[1..].iter().all(|o| {
            !self.outputs.contains(o) && self.consumers.get(o).is_none_or(|c| c.is_empty())
        })
    }

    fn quantize(&mut self, i: usize) -> Result<bool> {
        let g = self.g;
        let n = &g.nodes[i];
        let Some((sy, zy)) = self.qparams(n) else {
            return Ok(false);
        };
        let Some(x) = n.input(0) else {
            return Ok(false);
        };
        if self.deq(Some(x)).is_some() {
            return self.table(i, x, i, Ok, Some((f32::NEG_INFINITY, f32::INFINITY)));
        }
        let Some(Repr::F(xb)) = self.repr.get(&x).cloned() else {
            return Ok(false);
        };
        let shape = self.shape(x);
        let len: usize = shape.iter().product();
        let qv = QVal {
            buf: self.new_u8(len),
            shape: shape.clone(),
            nhwc: shape.len() == 4,
        };
        let (c, hw) = qv.c_hw();
        self.push(
            i,
            Step::Quantize {
                x: xb,
                y: qv.buf,
                len,
                c,
                hw,
                scale: sy,
                zp: zy,
            },
        );
        // Quantize takes no folded clamp: record no owner.
        self.set_q(i, qv, None);
        Ok(true)
    }

    /// `DQ(x) -> f -> Q` (node `op` computes `f` from `x`; `qnode` is the QuantizeLinear, which is
    /// `op` itself for a bare `DQ -> Q`) as a table on u8, folded into the producer when possible.
    fn table(
        &mut self,
        op: usize,
        x: ValueId,
        qnode: usize,
        f: impl FnOnce(Vec<f32>) -> std::result::Result<Vec<f32>, String>,
        clip: Option<(f32, f32)>,
    ) -> Result<bool> {
        let Some((qv, sx, zx)) = self.deq(Some(x)) else {
            return Ok(false);
        };
        let Some((sy, zy)) = self.qparams(&self.g.nodes[qnode]) else {
            return Ok(false);
        };
        let g = self.g;
        let n = &g.nodes[op];
        let lut = ops::chain_lut(sx, zx, f, sy, zy).map_err(|m| unsupported(n, m))?;
        // The same table as arithmetic, where it is a clip between two quantizations.
        let fast = clip.and_then(|c| ops::Affine::find((sx, zx), c, (sy, zy), &lut));
        let Some(Repr::Deq { src, .. }) = self.repr.get(&x).cloned() else {
            return Ok(false);
        };
        // Fold into the step that wrote `src` when nothing else reads it or the dequantized value.
        let private = self.sole_consumer(src).is_some_and(|d| {
            self.g.nodes[d].outputs.first() == Some(&x) && self.sole_consumer(x) == Some(op)
        });
        if let Some(&(owner, si)) = self.owner.get(&qv.buf) {
            if private && owner == src && fuse_table(&mut self.steps[si], &lut, fast) {
                self.done[op] = true;
                self.set_q(qnode, qv, Some(si));
                return Ok(true);
            }
        }
        if ops::is_identity(&lut) {
            self.done[op] = true;
            self.set_q(qnode, qv, None);
            return Ok(true);
        }
        let len = qv.len();
        let out = QVal {
            buf: self.new_u8(len),
            ..qv.clone()
        };
        let si = self.push(
            op,
            Step::Lut {
                x: qv.buf,
                y: out.buf,
                len,
                lut: Box::new(lut),
            },
        );
        self.done[op] = true;
        self.set_q(qnode, out, Some(si));
        Ok(true)
    }

    fn unary(&mut self, i: usize) -> Result<bool> {
        let g = self.g;
        let n = &g.nodes[i];
        let (Some(x), y) = (n.input(0), n.outputs[0]) else {
            return Ok(false);
        };
        let Some((qnode, _, _)) = self.q_target(y) else {
            return Ok(false);
        };
        if self.deq(Some(x)).is_none() || !self.extra_outputs_unused(n) {
            return Ok(false);
        }
        let kind = lower(self.g, n, &self.dev).map_err(|m| unsupported(n, m))?;
        let mut consts = Vec::new();
        for v in &n.inputs[1..] {
            consts.push(match v {
                Some(v) => match self.g.konst(*v) {
                    Some(t) => Some(
                        candle_core::Tensor::from_vec(t.to_f32_vec(), t.shape.clone(), &self.dev)
                            .map_err(Error::from)?,
                    ),
                    None => return Ok(false),
                },
                None => None,
            });
        }
        let clip = match &n.op {
            Op::Relu => Some((0.0, f32::INFINITY)),
            Op::Clip => infer::clip_of(g, n).ok(),
            _ => None,
        };
        let dev = self.dev.clone();
        let f = move |xs: Vec<f32>| -> std::result::Result<Vec<f32>, String> {
            let t = candle_core::Tensor::from_vec(xs, 256, &dev).map_err(|e| e.to_string())?;
            let mut ins = vec![Some(t)];
            ins.extend(consts);
            eval(n, &kind, &ins)
                .and_then(|y| y.flatten_all())
                .and_then(|y| y.to_vec1::<f32>())
                .map_err(|e| e.to_string())
        };
        self.table(i, x, qnode, f, clip)
    }

    fn linear(&mut self, i: usize) -> Result<bool> {
        let g = self.g;
        let n = &g.nodes[i];
        let Some((mut qx, sx, zx)) = self.deq(n.input(0)) else {
            return Ok(false);
        };
        // The gather of a Pad folded into this conv, dropped once the conv is compiled.
        let mut fold = None;
        let Some(w) = n.input(1).and_then(|w| self.ints.get(&w)).cloned() else {
            return Ok(false);
        };
        let y = n.outputs[0];
        let yshape = self.shape(y);
        // `-> Q`, or `-> Relu | Clip -> Q` with the activation as a clamp of the requantized
        // output: Q is monotone, so Q(clip(v, lo, hi)) = clamp(Q(v), Q(lo), Q(hi)) exactly.
        let (target, act) = match self.q_target(y) {
            Some(t) => (Some(t), None),
            None => match self.act_then_q(y) {
                Some((j, t, range)) => (Some(t), Some((j, range))),
                None => (None, None),
            },
        };
        // (images, geometry, cout, weights as [cout][k] rows or OIHW, per-channel weight scales)
        let geom;
        let images;
        let cout;
        let group;
        let mut depthwise = false;
        let wscale: Vec<f32>;
        // Integer weights w - zp, in OIHW (conv) or [n][k] (GEMM) order.
        let wq: Vec<i64>;
        let (kh, kw);
        match &n.op {
            Op::Conv(a) => {
                if qx.shape.len() != 4 || !qx.nhwc || w.shape.len() != 4 {
                    return Ok(false);
                }
                let win = match infer::window_of(self.g, n) {
                    Ok(w) if w.kernel.len() == 2 => w,
                    _ => return Ok(false),
                };
                let mut extra = [0; 4];
                if let Some((src, p, step)) = n
                    .input(0)
                    .and_then(|x| self.folded_pad(i, x, &qx, zx))
                    .filter(|(src, _, _)| src.shape.len() == 4)
                {
                    (qx, extra, fold) = (src, p, Some(step));
                }
                let (cin, h, wd) = (qx.shape[1], qx.shape[2], qx.shape[3]);
                group = a.group.max(1);
                cout = w.shape[0];
                (kh, kw) = (w.shape[2], w.shape[3]);
                if cin % group != 0 || cout % group != 0 || w.shape[1] * group != cin {
                    return Ok(false);
                }
                let g = ConvGeometry::new(h, wd, cin / group, kh, kw)
                    .with_stride(win.strides[0], win.strides[1])
                    .with_dilation(win.dilations[0], win.dilations[1])
                    .with_padding(
                        win.pad_begin[0] + extra[0],
                        win.pad_begin[1] + extra[1],
                        win.pad_end[0] + extra[2],
                        win.pad_end[1] + extra[3],
                    )
                    .with_pixel_stride(cin);
                if g.out_h() != win.out[0] || g.out_w() != win.out[1] {
                    return Ok(false);
                }
                if target.is_none() && g.out_pixels() != 1 {
                    // An f32 result would be NHWC; leave it to the float path.
                    return Ok(false);
                }
                depthwise = group > 1 && group == cin && cout == cin;
                let mut g = g;
                if depthwise {
                    // One kernel call over all channels.
                    g.channels = cin;
                }
                geom = g;
                images = qx.shape[0];
                wscale = match per_channel(&w, 0, cout) {
                    Some(s) => s,
                    None => return Ok(false),
                };
                wq = match centered(&w, 0, cout) {
                    Some(q) => q,
                    None => return Ok(false),
                };
            }
            Op::Gemm {
                alpha,
                beta,
                trans_a,
                trans_b,
            } => {
                if *alpha != 1.0 || *trans_a || (n.input(2).is_some() && *beta != 1.0) {
                    return Ok(false);
                }
                let Some(r) = gemm_rows(&qx, &w, *trans_b) else {
                    return Ok(false);
                };
                (geom, cout, wscale, wq) = r;
                (images, group, kh, kw) = (1, 1, 1, 1);
            }
            Op::MatMul => {
                let Some(r) = gemm_rows(&qx, &w, false) else {
                    return Ok(false);
                };
                (geom, cout, wscale, wq) = r;
                (images, group, kh, kw) = (1, 1, 1, 1);
            }
            _ => return Ok(false),
        }
        // Bias: int32 with scale s_x * s_w[j] (what ONNX Runtime's integer kernels add).
        let bias = match n.input(2) {
            None => None,
            Some(b) => {
                let Some(b) = self.ints.get(&b) else {
                    return Ok(false);
                };
                if b.dtype != DType::I32
                    || b.q.len() != cout
                    || b.zp.iter().any(|&z| z != 0)
                    || !(b.scale.len() == 1 || b.scale.len() == cout)
                {
                    return Ok(false);
                }
                for (j, &ws) in wscale.iter().enumerate() {
                    let want = sx * ws;
                    let got = b.scale[if b.scale.len() == 1 { 0 } else { j }];
                    if (got - want).abs() > 1e-5 * want.abs() {
                        return Ok(false);
                    }
                }
                Some(b.q.iter().map(|&v| v as i32).collect::<Vec<i32>>())
            }
        };
        let int4 =
            matches!(w.dtype, DType::I4 | DType::U4) && wq.iter().all(|&v| (-8..=7).contains(&v));
        if wq.iter().any(|&v| !(-128..=127).contains(&v)) {
            return Ok(false);
        }
        let (epi, scales, ybuf, out_q) = match target {
            Some((qn, sy, zy)) => {
                let s: Vec<f32> = wscale.iter().map(|&ws| sx * ws / sy).collect();
                let qv = QVal {
                    buf: self.new_u8(yshape.iter().product()),
                    shape: yshape.clone(),
                    nhwc: yshape.len() == 4,
                };
                let (lo, hi) = match act {
                    Some((j, (lo, hi))) => {
                        self.done[j] = true;
                        (
                            ops::quantize_one(lo, sy, f32::from(zy)),
                            ops::quantize_one(hi, sy, f32::from(zy)),
                        )
                    }
                    None => (0, 255),
                };
                (
                    Epi::U8 { zp: zy, lo, hi },
                    s,
                    Buf::U8(qv.buf),
                    Some((qn, qv)),
                )
            }
            None => {
                let s: Vec<f32> = wscale.iter().map(|&ws| sx * ws).collect();
                let b = self.new_f32(yshape.iter().product());
                (Epi::F32, s, Buf::F32(b), None)
            }
        };
        // A conv whose input channels are not whole 4-byte groups (an RGB stem) reads a copy of
        // its input padded with zero-point channels, so the kernel takes its implicit-GEMM path
        // instead of copying im2col panels; the padded weights are zero.
        let (mut geom, mut wq, mut int4, mut x_buf) = (geom, wq, int4, qx.buf);
        if matches!(n.op, Op::Conv(_))
            && group == 1
            && geom.channels % 4 != 0
            && geom.kernel_h * geom.kernel_w > 1
        {
            let (cin, cp) = (geom.channels, geom.channels.next_multiple_of(4));
            let pixels = images * geom.in_h * geom.in_w;
            if pixels * cp < ops::PAD as usize {
                let mut map = vec![ops::PAD; pixels * cp];
                for p in 0..pixels {
                    for c in 0..cin {
                        map[p * cp + c] = (p * cin + c) as u32;
                    }
                }
                let mut identity = [0u8; 256];
                for (k, v) in identity.iter_mut().enumerate() {
                    *v = k as u8;
                }
                let buf = self.new_u8(pixels * cp);
                self.push(
                    i,
                    Step::Gather {
                        x: qx.buf,
                        y: buf,
                        map,
                        lut: Box::new(identity),
                        pad: zx,
                    },
                );
                let taps = kh * kw;
                let mut w2 = vec![0i64; cout * cp * taps];
                for o in 0..cout {
                    for c in 0..cin {
                        let (d, s) = ((o * cp + c) * taps, (o * cin + c) * taps);
                        w2[d..d + taps].copy_from_slice(&wq[s..s + taps]);
                    }
                }
                (wq, int4, x_buf) = (w2, false, buf);
                geom.channels = cp;
                geom.pixel_stride = cp;
            }
        }
        // Pack per group.
        let (cin_g, cout_g) = (geom.channels, cout / group);
        let mut groups = Vec::new();
        let err = |e: zq_kernels::int8::KernelError| unsupported(n, e.to_string());
        if depthwise {
            let w8: Vec<i8> = wq.iter().map(|&v| v as i8).collect();
            let dw = if int4 {
                let packed = crate::ir::qdq::pack4(&wq);
                DepthwiseWeights::pack_i4(&packed, cout, kh, kw).map_err(err)?
            } else {
                DepthwiseWeights::pack_i8(&w8, cout, kh, kw).map_err(err)?
            };
            groups.push(Group {
                w: Weights::Depthwise(dw),
                bias: bias.clone(),
                scale: scales.clone(),
                cin_off: 0,
                cout_off: 0,
            });
        } else {
            let per = cout_g * cin_g * kh * kw;
            for gi in 0..group {
                let part = &wq[gi * per..(gi + 1) * per];
                let pw = if int4 {
                    let packed = crate::ir::qdq::pack4(part);
                    PackedWeights::pack_conv_i4(&packed, cout_g, cin_g, kh, kw).map_err(err)?
                } else {
                    let w8: Vec<i8> = part.iter().map(|&v| v as i8).collect();
                    PackedWeights::pack_conv_i8(&w8, cout_g, cin_g, kh, kw).map_err(err)?
                };
                let cs = gi * cout_g..(gi + 1) * cout_g;
                groups.push(Group {
                    w: Weights::Gemm(pw),
                    bias: bias.as_ref().map(|b| b[cs.clone()].to_vec()),
                    scale: scales[cs].to_vec(),
                    cin_off: gi * cin_g,
                    cout_off: gi * cout_g,
                });
            }
        }
        let out_pixels = geom.out_pixels();
        let in_image = geom.in_h * geom.in_w * geom.pixel_stride;
        let step = ConvStep {
            x: x_buf,
            y: ybuf,
            geom,
            in_image,
            cout,
            za: zx,
            groups,
            epi,
            residual: None,
            post: None,
            tasks: tasks(images, out_pixels, cout),
            plans: Vec::new(),
        };
        let si = self.push(i, Step::Conv(step));
        self.removed.extend(fold);
        self.done[i] = true;
        match (out_q, ybuf) {
            (Some((qn, qv)), _) => self.set_q(qn, qv, Some(si)),
            (None, Buf::F32(b)) => {
                self.repr.insert(y, Repr::F(b));
            }
            _ => unreachable!(),
        }
        Ok(true)
    }

    fn add(&mut self, i: usize) -> Result<bool> {
        let g = self.g;
        let n = &g.nodes[i];
        let (Some((qa, sa, za)), Some((qb, sb, zb))) = (self.deq(n.input(0)), self.deq(n.input(1)))
        else {
            return Ok(false);
        };
        let Some((qn, sy, zy)) = self.q_target(n.outputs[0]) else {
            return Ok(false);
        };
        if qa.shape != qb.shape || qa.nhwc != qb.nhwc || self.shape(n.outputs[0]) != qa.shape {
            return Ok(false);
        }
        let p = AddParams {
            ra: sa / sy,
            za: f32::from(za),
            rb: sb / sy,
            zb: f32::from(zb),
            zy: f32::from(zy),
            lo: 0.0,
            hi: 255.0,
        };
        // A residual add of a conv's output that nothing else reads runs in the conv, on each
        // task's output while it is in cache, in place.
        for (x, qx, other, pp) in [
            (n.input(0), &qa, &qb, p),
            (n.input(1), &qb, &qa, p.swapped()),
        ] {
            if let Some(si) = x.and_then(|x| self.conv_for_residual(i, x, qx, other)) {
                if let Step::Conv(c) = &mut self.steps[si] {
                    c.residual = Some((other.buf, pp));
                }
                self.done[i] = true;
                let out = QVal {
                    buf: qx.buf,
                    ..qx.clone()
                };
                self.set_q(qn, out, Some(si));
                return Ok(true);
            }
        }
        let len = qa.len();
        let out = QVal {
            buf: self.new_u8(len),
            ..qa.clone()
        };
        let si = self.push(
            i,
            Step::Add {
                a: qa.buf,
                b: qb.buf,
                y: out.buf,
                len,
                p,
                post: None,
            },
        );
        self.done[i] = true;
        self.set_q(qn, out, Some(si));
        Ok(true)
    }

    /// The conv step that wrote `qx` (Add `i`'s input `x`, dequantized) if it can take the add
    /// of `other` in its tasks: a u8 conv with no table or residual yet, whose output only this
    /// add reads, and `other` written by an earlier step.
    fn conv_for_residual(&self, i: usize, x: ValueId, qx: &QVal, other: &QVal) -> Option<usize> {
        let &(qv, si) = self.owner.get(&qx.buf)?;
        let &(_, sb) = self.owner.get(&other.buf)?;
        let Some(Repr::Deq { src, .. }) = self.repr.get(&x) else {
            return None;
        };
        let private = *src == qv
            && self.sole_consumer(x) == Some(i)
            && self.sole_consumer(qv).is_some()
            && other.buf != qx.buf;
        match &self.steps[si] {
            Step::Conv(c)
                if private
                    && sb < si
                    && c.y == Buf::U8(qx.buf)
                    && c.post.is_none()
                    && c.residual.is_none()
                    && qx.nhwc
                    && other.nhwc =>
            {
                Some(si)
            }
            _ => None,
        }
    }

    fn pool(&mut self, i: usize) -> Result<bool> {
        let g = self.g;
        let n = &g.nodes[i];
        let Some((qx, sx, zx)) = self.deq(n.input(0)) else {
            return Ok(false);
        };
        let Some((qn, sy, zy)) = self.q_target(n.outputs[0]) else {
            return Ok(false);
        };
        if qx.shape.len() != 4 || !qx.nhwc || !self.extra_outputs_unused(n) {
            return Ok(false);
        }
        let (c, h, w) = (qx.shape[1], qx.shape[2], qx.shape[3]);
        let (kernel, stride, dilation, pad, out, divisor) = match &n.op {
            Op::GlobalAveragePool | Op::GlobalMaxPool => {
                ([h, w], [1, 1], [1, 1], [0, 0], [1, 1], vec![(h * w) as f32])
            }
            Op::MaxPool(_) | Op::AveragePool(_) => {
                let win = match infer::window_of(self.g, n) {
                    Ok(w) if w.kernel.len() == 2 => w,
                    _ => return Ok(false),
                };
                let div = match &n.op {
                    Op::AveragePool(p) => avg_divisor(&win, h, w, p.count_include_pad),
                    _ => Vec::new(),
                };
                (
                    [win.kernel[0], win.kernel[1]],
                    [win.strides[0], win.strides[1]],
                    [win.dilations[0], win.dilations[1]],
                    [win.pad_begin[0], win.pad_begin[1]],
                    [win.out[0], win.out[1]],
                    div,
                )
            }
            _ => return Ok(false),
        };
        let yshape = vec![qx.shape[0], c, out[0], out[1]];
        if self.shape(n.outputs[0]) != yshape {
            return Ok(false);
        }
        let geom = PoolGeom {
            c,
            in_h: h,
            in_w: w,
            out_h: out[0],
            out_w: out[1],
            kernel,
            stride,
            dilation,
            pad,
        };
        let qv = QVal {
            buf: self.new_u8(yshape.iter().product()),
            shape: yshape,
            nhwc: true,
        };
        let images = qx.shape[0];
        let step = match &n.op {
            Op::MaxPool(_) | Op::GlobalMaxPool => {
                let lut = ops::chain_lut(sx, zx, Ok, sy, zy).map_err(|m| unsupported(n, m))?;
                Step::MaxPool {
                    x: qx.buf,
                    y: qv.buf,
                    images,
                    geom,
                    lut: Box::new(lut),
                }
            }
            _ => Step::AvgPool {
                x: qx.buf,
                y: qv.buf,
                images,
                geom,
                divisor,
                sx: (sx, zx),
                sy: (sy, zy),
                clamp: (0, 255),
            },
        };
        let si = self.push(i, step);
        self.done[i] = true;
        self.set_q(qn, qv, Some(si));
        Ok(true)
    }

    fn movement(&mut self, i: usize) -> Result<bool> {
        let g = self.g;
        let n = &g.nodes[i];
        let Some((qx, sx, zx)) = self.deq(n.input(0)) else {
            return Ok(false);
        };
        let y = n.outputs[0];
        let Some((qn, sy, zy)) = self.q_target(y) else {
            return Ok(false);
        };
        if !self.extra_outputs_unused(n) {
            return Ok(false);
        }
        let ish = qx.shape.clone();
        let osh = self.shape(y);
        let olen: usize = osh.iter().product();
        if olen >= ops::PAD as usize || qx.len() >= ops::PAD as usize {
            return Ok(false);
        }
        let Some(map) = logical_map(self.g, n, &ish, &osh) else {
            return Ok(false);
        };
        let lut = ops::chain_lut(sx, zx, Ok, sy, zy).map_err(|m| unsupported(n, m))?;
        let pad = match &n.op {
            Op::Pad { .. } => match infer::pad_of(self.g, n) {
                Ok((_, _, v)) => ops::quantize_one(v, sy, f32::from(zy)),
                Err(_) => return Ok(false),
            },
            _ => 0,
        };
        let onhwc = osh.len() == 4;
        // Storage index of every output element, in storage order.
        let istr = storage_strides(&ish, qx.nhwc);
        let ostr = storage_strides(&osh, onhwc);
        let lstr_i = crate::ir::tensor::strides(&ish);
        let lstr_o = crate::ir::tensor::strides(&osh);
        let mut phys = vec![ops::PAD; olen];
        for (o, &src) in map.iter().enumerate() {
            let mut op = 0;
            for (a, &st) in lstr_o.iter().enumerate() {
                op += (o / st) % osh[a] * ostr[a];
            }
            phys[op] = if src < 0 {
                ops::PAD
            } else {
                let src = src as usize;
                let mut ip = 0;
                for (a, &st) in lstr_i.iter().enumerate() {
                    ip += (src / st) % ish[a] * istr[a];
                }
                ip as u32
            };
        }
        let moves = phys.len() != qx.len() || phys.iter().enumerate().any(|(k, &p)| p != k as u32);
        // A gather of a gather nothing else reads (Slice -> Slice -> Pad) is one gather.
        let x = n.input(0).expect("checked by deq");
        if let Some(Repr::Deq { src, .. }) = self.repr.get(&x).cloned() {
            let private = self.sole_consumer(src).is_some_and(|d| {
                g.nodes[d].outputs.first() == Some(&x) && self.sole_consumer(x) == Some(i)
            });
            if let Some(&(owner, si)) = self.owner.get(&qx.buf).filter(|_| private) {
                let composable = match &self.steps[si] {
                    Step::Gather { map, pad: p1, .. } => {
                        owner == src
                            && (lut[usize::from(*p1)] == pad || map.iter().all(|&v| v != ops::PAD))
                    }
                    _ => false,
                };
                if composable {
                    let out = QVal {
                        buf: self.new_u8(olen),
                        shape: osh,
                        nhwc: onhwc,
                    };
                    if let Step::Gather {
                        y: y1,
                        map,
                        lut: l1,
                        pad: p1,
                        ..
                    } = &mut self.steps[si]
                    {
                        *map = phys
                            .iter()
                            .map(|&j| if j == ops::PAD { j } else { map[j as usize] })
                            .collect();
                        for v in l1.iter_mut() {
                            *v = lut[usize::from(*v)];
                        }
                        *p1 = pad;
                        *y1 = out.buf;
                    }
                    self.done[i] = true;
                    self.set_q(qn, out, Some(si));
                    return Ok(true);
                }
            }
        }
        self.done[i] = true;
        if !moves && ops::is_identity(&lut) {
            let view = QVal {
                buf: qx.buf,
                shape: osh,
                nhwc: onhwc,
            };
            self.set_q(qn, view, None);
            return Ok(true);
        }
        let out = QVal {
            buf: self.new_u8(olen),
            shape: osh,
            nhwc: onhwc,
        };
        let spatial = match &n.op {
            Op::Pad {
                mode: PadMode::Constant,
            } if qx.nhwc && onhwc && ops::is_identity(&lut) => match infer::pad_of(self.g, n) {
                Ok((b, e, _)) if b.len() == 4 && b[..2] == [0, 0] && e[..2] == [0, 0] => {
                    Some([b[2], b[3], e[2], e[3]])
                }
                _ => None,
            },
            _ => None,
        };
        let (src, buf) = (qx.clone(), out.buf);
        let si = self.push(
            i,
            Step::Gather {
                x: qx.buf,
                y: out.buf,
                map: phys,
                lut: Box::new(lut),
                pad,
            },
        );
        if let Some(p) = spatial {
            self.pads.insert(buf, (src, p, pad, si));
        }
        self.set_q(qn, out, Some(si));
        Ok(true)
    }

    /// The unpadded input and the pads of a conv input `x` (dequantized with zero point `zx`)
    /// that a zero Pad of the spatial axes wrote for this conv `i` alone: the conv can pad
    /// itself, with `zx`, and skip the copy.
    fn folded_pad(
        &self,
        i: usize,
        x: ValueId,
        qx: &QVal,
        zx: u8,
    ) -> Option<(QVal, [usize; 4], usize)> {
        let (src, p, fill, step) = self.pads.get(&qx.buf)?;
        let Some(Repr::Deq { src: qv, .. }) = self.repr.get(&x) else {
            return None;
        };
        let private = self.sole_consumer(x) == Some(i) && self.sole_consumer(*qv).is_some();
        (private && *fill == zx).then(|| (src.clone(), *p, *step))
    }

    /// An f32 buffer (ONNX layout) holding `v`: dequantized for a DequantizeLinear output, the
    /// integers themselves for a QuantizeLinear output (the reference executor's convention).
    fn f32_of(&mut self, v: ValueId, node: Option<usize>) -> Result<usize> {
        if let Some(&b) = self.materialized.get(&v) {
            return Ok(b);
        }
        let (qv, scale, zp) = match self.repr.get(&v).cloned() {
            Some(Repr::F(b)) => return Ok(b),
            Some(Repr::Q(q)) => (q, 1.0, 0),
            Some(Repr::Deq { src, scale, zp }) => match self.repr.get(&src) {
                Some(Repr::Q(q)) => (q.clone(), scale, zp),
                _ => return Err(Error::Internal(format!("value {v}: bad representation"))),
            },
            None => {
                return Err(Error::Internal(format!(
                    "native engine: value '{}' was not computed",
                    self.g.values[v].name
                )))
            }
        };
        let len = qv.len();
        let b = self.new_f32(len);
        let (c, hw) = qv.c_hw();
        let step = Step::Dequantize {
            x: qv.buf,
            y: b,
            len,
            c,
            hw,
            scale,
            zp,
        };
        // Name the step after the node that needed it (or the producer of a graph output).
        let at = node.unwrap_or_else(|| {
            self.g
                .nodes
                .iter()
                .position(|n| n.outputs.contains(&v))
                .unwrap_or(0)
        });
        self.push(at, step);
        self.materialized.insert(v, b);
        Ok(b)
    }

    fn float(&mut self, i: usize) -> Result<()> {
        let g = self.g;
        let n = &g.nodes[i];
        if !self.extra_outputs_unused(n) {
            return Err(unsupported(
                n,
                "only the first output of this op is supported",
            ));
        }
        let kind = lower(g, n, &self.dev).map_err(|m| Error::node(&n.name, n.op.name(), m))?;
        let mut inputs = Vec::new();
        for v in &n.inputs {
            inputs.push(match v {
                None => None,
                Some(v) => Some(match g.konst(*v) {
                    Some(t) => FIn::Const(
                        candle_core::Tensor::from_vec(t.to_f32_vec(), t.shape.clone(), &self.dev)
                            .map_err(Error::from)?,
                    ),
                    None => FIn::Buf(self.f32_of(*v, Some(i))?, self.shape(*v)),
                }),
            });
        }
        let y = n.outputs[0];
        let shape = self.shape(y);
        let b = self.new_f32(shape.iter().product());
        self.push(
            i,
            Step::Float {
                node: Box::new(n.clone()),
                kind: Box::new(kind),
                inputs,
                y: b,
                shape,
            },
        );
        self.repr.insert(y, Repr::F(b));
        self.done[i] = true;
        Ok(())
    }
}

/// Fold a u8 table into the step that produces its input: a clamp into a kernel's output
/// range, any table into a step that already ends in one.
fn fuse_table(step: &mut Step, lut: &[u8; 256], fast: Option<ops::Affine>) -> bool {
    match step {
        // After a residual the table applies to the sum, as for an Add step.
        Step::Conv(ConvStep {
            residual: Some((_, p)),
            post,
            ..
        }) => {
            p.fold_table(post, lut, fast);
            true
        }
        Step::Conv(c) => match (&mut c.epi, ops::as_clamp(lut)) {
            (Epi::U8 { lo, hi, .. }, Some(r)) if c.post.is_none() => {
                (*lo, *hi) = ops::compose_clamp((*lo, *hi), r);
                true
            }
            (Epi::U8 { .. }, _) => {
                ops::then_table(&mut c.post, lut, fast);
                true
            }
            _ => false,
        },
        Step::Add { p, post, .. } => {
            p.fold_table(post, lut, fast);
            true
        }
        Step::AvgPool { clamp, .. } => match ops::as_clamp(lut) {
            Some(r) => {
                *clamp = ops::compose_clamp(*clamp, r);
                true
            }
            None => false,
        },
        Step::Gather { lut: l, pad, .. } => {
            for v in l.iter_mut() {
                *v = lut[usize::from(*v)];
            }
            // Padding goes through the table too.
            *pad = lut[usize::from(*pad)];
            true
        }
        Step::Lut { lut: l, .. } | Step::MaxPool { lut: l, .. } => {
            for v in l.iter_mut() {
                *v = lut[usize::from(*v)];
            }
            true
        }
        _ => false,
    }
}

/// Weight scales per output channel along `axis` (a per-tensor scale repeated).
/// A QuantizeLinear node that takes a kernel's output: (node, scale, zero point).
type QTarget = (usize, f32, u8);

fn per_channel(w: &IntConst, axis: usize, n: usize) -> Option<Vec<f32>> {
    let r = w.shape.len() as i64;
    let a = if w.axis < 0 { w.axis + r } else { w.axis };
    match w.scale.len() {
        1 => Some(vec![w.scale[0]; n]),
        l if l == n && a == axis as i64 && w.shape.get(axis) == Some(&n) => Some(w.scale.clone()),
        _ => None,
    }
    .filter(|s| s.iter().all(|v| v.is_finite() && *v > 0.0))
}

/// `q - zp` for every weight, the zero point of its output channel along `axis`.
fn centered(w: &IntConst, axis: usize, n: usize) -> Option<Vec<i64>> {
    let inner: usize = w.shape[axis + 1..].iter().product();
    match w.zp.len() {
        1 => Some(w.q.iter().map(|&q| q - w.zp[0]).collect()),
        l if l == n => Some(
            w.q.iter()
                .enumerate()
                .map(|(e, &q)| q - w.zp[(e / inner) % n])
                .collect(),
        ),
        _ => None,
    }
}

type GemmParts = (ConvGeometry, usize, Vec<f32>, Vec<i64>);

/// A GEMM `x [m, k] * W` as a 1x1 convolution over one image of `m` pixels, with the weights as
/// `[n][k]` rows (`W` is `[n, k]` when `trans_b`, else `[k, n]`).
fn gemm_rows(qx: &QVal, w: &IntConst, trans_b: bool) -> Option<GemmParts> {
    if qx.shape.len() != 2 || w.shape.len() != 2 {
        return None;
    }
    let (m, k) = (qx.shape[0], qx.shape[1]);
    let (n, wk) = if trans_b {
        (w.shape[0], w.shape[1])
    } else {
        (w.shape[1], w.shape[0])
    };
    if wk != k {
        return None;
    }
    let naxis = usize::from(!trans_b);
    let scale = per_channel(w, naxis, n)?;
    let c = centered(w, naxis, n)?;
    let rows = if trans_b {
        c
    } else {
        let mut r = vec![0i64; n * k];
        for p in 0..k {
            for j in 0..n {
                r[j * k + p] = c[p * n + j];
            }
        }
        r
    };
    Some((ConvGeometry::new(1, m, k, 1, 1), n, scale, rows))
}

/// Parallel tasks of a convolution: whole images when there are enough of them, else about
/// two pieces per thread of each image's output pixels, each a whole number of the kernel's
/// row tiles (16, 12, 8 or 6 rows as the output has 1, 2, 3 or more 16-channel blocks), so the
/// pieces of a small image stay balanced.
fn tasks(images: usize, pixels: usize, cout: usize) -> Vec<(usize, Range<usize>)> {
    let threads = rayon::current_num_threads().max(1);
    let per_image = (2 * threads).div_ceil(images.max(1)).max(1);
    let tile = match cout.div_ceil(16) {
        0 | 1 => 16,
        2 => 12,
        3 => 8,
        _ => 6,
    };
    let chunk = pixels.div_ceil(per_image).next_multiple_of(tile).max(tile);
    let mut t = Vec::new();
    for img in 0..images {
        let mut s = 0;
        while s < pixels {
            let e = (s + chunk).min(pixels);
            t.push((img, s..e));
            s = e;
        }
    }
    t
}

/// For each output element (ONNX order), the input element it copies (ONNX order), or -1 for
/// padding; `None` for an op this does not cover.
fn logical_map(g: &Graph, n: &Node, ish: &[usize], osh: &[usize]) -> Option<Vec<i64>> {
    let olen: usize = osh.iter().product();
    let ilen: usize = ish.iter().product();
    let lstr_i = crate::ir::tensor::strides(ish);
    let lstr_o = crate::ir::tensor::strides(osh);
    let unravel = |o: usize, a: usize| (o / lstr_o[a]) % osh[a];
    Some(match &n.op {
        Op::Identity
        | Op::Dropout
        | Op::Flatten { .. }
        | Op::Reshape { .. }
        | Op::Squeeze
        | Op::Unsqueeze => {
            if olen != ilen {
                return None;
            }
            (0..olen as i64).collect()
        }
        Op::Transpose { perm } => {
            let p = infer::transpose_perm(ish.len(), perm.as_deref()).ok()?;
            (0..olen)
                .map(|o| {
                    let mut src = 0;
                    for (k, &pk) in p.iter().enumerate() {
                        src += unravel(o, k) * lstr_i[pk];
                    }
                    src as i64
                })
                .collect()
        }
        Op::Slice => {
            let spec = infer::slice_of(g, n).ok()?;
            let mut start = vec![0i64; ish.len()];
            let mut step = vec![1i64; ish.len()];
            for s in &spec {
                start[s.axis] = s.start;
                step[s.axis] = s.step;
            }
            (0..olen)
                .map(|o| {
                    let mut src = 0i64;
                    for a in 0..ish.len() {
                        let i = start[a] + unravel(o, a) as i64 * step[a];
                        src += i * lstr_i[a] as i64;
                    }
                    src
                })
                .collect()
        }
        Op::Pad { mode } => {
            let (b, _, _) = infer::pad_of(g, n).ok()?;
            (0..olen)
                .map(|o| {
                    let mut src = 0i64;
                    for a in 0..ish.len() {
                        let i = unravel(o, a) as i64 - b[a] as i64;
                        let i = if i >= 0 && (i as usize) < ish[a] {
                            i as usize
                        } else if *mode == PadMode::Constant || ish[a] == 0 {
                            return -1;
                        } else {
                            infer::pad_source(i, ish[a], *mode)
                        };
                        src += (i * lstr_i[a]) as i64;
                    }
                    src
                })
                .collect()
        }
        _ => return None,
    })
}

/// The native engine for one graph: a compiled program per batch size, or for a float graph the
/// tape covers, [`FloatModel`]'s compiled forward pass.
pub struct NativeModel {
    engine: Engine,
}

enum Engine {
    Tape(FloatModel),
    /// The graph, and its programs by batch size.
    Programs(Graph, HashMap<usize, Program>),
}

impl NativeModel {
    /// Compile for batch size 1 at once, so an unsupported model fails before any input is read.
    pub fn new(graph: Graph) -> Result<Self> {
        if let Some(m) = Self::float_on_tape(&graph)? {
            return Ok(m);
        }
        // The program runs what the tape does not (op by op, more slowly).
        let p = compile(&graph, 1)?;
        Ok(NativeModel {
            engine: Engine::Programs(graph, HashMap::from([(1, p)])),
        })
    }

    /// A float graph (no Quantize or Dequantize node) on the f32 tape, compiled for batch size
    /// 1; `None` when the graph is quantized or the tape refuses it (no program is compiled).
    pub fn float_on_tape(graph: &Graph) -> Result<Option<Self>> {
        let quantized = graph.nodes.iter().any(|n| {
            matches!(
                n.op,
                Op::QuantizeLinear { .. } | Op::DequantizeLinear { .. }
            )
        });
        if quantized {
            return Ok(None);
        }
        match FloatModel::new(graph) {
            Ok(f) => Ok(Some(NativeModel {
                engine: Engine::Tape(f),
            })),
            Err(NotCovered::Failed(e)) => Err(e),
            Err(NotCovered::Refused(_)) => Ok(None),
        }
    }

    /// Whether the graph runs on the f32 tape (a float graph it covers), not the program.
    pub fn on_tape(&self) -> bool {
        matches!(self.engine, Engine::Tape(_))
    }

    /// Compile for batch size `n` now (else on first use).
    pub fn prepare(&mut self, n: usize) -> Result<()> {
        match &mut self.engine {
            Engine::Tape(f) => f.prepare(n),
            Engine::Programs(g, programs) => program(g, programs, n).map(|_| ()),
        }
    }

    /// Run `n` inputs (ONNX layout, one graph input); returns the first output and its shape.
    pub fn run(&mut self, x: &[f32], n: usize) -> Result<(Vec<f32>, Vec<usize>)> {
        let mut outs = match &mut self.engine {
            Engine::Tape(f) => f.run(x, n)?,
            Engine::Programs(g, programs) => program(g, programs, n)?.run(&[x])?,
        };
        if outs.is_empty() {
            return Err(Error::Usage("the model has no outputs".into()));
        }
        Ok(outs.swap_remove(0))
    }
}

/// The program for batch size `n`, compiled on first use.
fn program<'a>(
    g: &Graph,
    programs: &'a mut HashMap<usize, Program>,
    n: usize,
) -> Result<&'a mut Program> {
    Ok(match programs.entry(n) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => e.insert(compile(g, n)?),
    })
}
