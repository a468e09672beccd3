//! A reverse-mode engine for distillation: forward to every BatchNormalization input, backward to
//! the model input, on f32 buffers allocated once.
//!
//! Distillation runs the same batch shape hundreds of times and needs the gradient at the input
//! only. Candle's general autograd pays for that with an allocation, a zero-fill and an
//! accumulation per op and step. Here each image is an independent task: a worker thread takes a
//! share of the batch and runs every op on one image at a time (forward, then backward in reverse),
//! so the activations of an image stay in cache and the two cores never wait on each other within
//! a pass. Only the ops between the input and the last BatchNormalization input are run.
//!
//! The ops of common CNN classifiers are covered (convolution of any group, stride, dilation and
//! padding; BatchNormalization; ReLU; Clip; residual Add; per-channel or scalar Add, Sub, Mul, Div
//! by a constant; Identity and Dropout). A graph with anything else on the way to a
//! BatchNormalization input is left to the general executor ([`Tape::new`] says which op).

use std::collections::HashMap;

use rayon::prelude::*;
use zq_kernels::gemm::{sgemm, MatMut, MatRef};
use zq_kernels::simd::{vectorize, Kernel};
use zq_kernels::team::{with_team, Team};

use super::wino::{Wino, WinoShape};
use crate::exec::conv::Geo;
use crate::exec::{Kind, Plan};
use crate::ir::{Op, PadMode, ValueId};

/// One op of the tape and the slot it writes.
#[derive(Debug)]
struct Step {
    op: TOp,
    y: usize,
}

/// What an op computes from its input slots (indices into an image's buffers). Every slot is
/// channels-last: `[positions, channels]`.
#[derive(Debug)]
enum TOp {
    /// `w` is `[groups][Kg][Mg]` with `Kg` ordered (ki, kj, input channel of the group).
    Conv {
        x: usize,
        geo: Geo,
        w: Vec<f32>,
        bias: Option<Vec<f32>>,
        /// Winograd forward and input-gradient convolutions, where they apply.
        wino: Option<Box<Wino>>,
        wino_grad: Option<Box<Wino>>,
        /// Depthwise convolutions (one input and one output channel per group): the weights
        /// `[kh * kw][C]`, so the kernel runs along the channels of a channels-last position.
        dw: Option<Vec<f32>>,
        /// Swing convolution (strided convolutions only, see [`Tape::set_swing`]): the input is
        /// read reflect-padded by 1 and cropped back at offset `[dy, dx]`; `[1, 1]` or `None`
        /// is the plain convolution.
        swing: Option<[usize; 2]>,
        /// A following ReLU fused in (applied with the bias, in the same pass).
        relu: bool,
    },
    /// `y[c] = x[c] * scale[c] + shift[c]`, then ReLU when `relu` (a following ReLU fused in).
    Affine {
        x: usize,
        scale: Vec<f32>,
        shift: Vec<f32>,
        relu: bool,
    },
    Relu {
        x: usize,
    },
    Clip {
        x: usize,
        lo: f32,
        hi: f32,
    },
    /// `y = a + b`, then ReLU when `relu`.
    Add {
        a: usize,
        b: usize,
        relu: bool,
    },
    /// Pooling over windows that are the same in every channel plane: output position `i` reads
    /// plane offsets `idx[ptr[i]..ptr[i+1]]`; the maximum, or the sum times `wgt[i]`.
    Pool {
        x: usize,
        max: bool,
        ptr: Vec<u32>,
        idx: Vec<u32>,
        wgt: Vec<f32>,
    },
    /// An elementwise activation.
    Unary {
        x: usize,
        act: Act,
    },
    /// `y = a * b`; `b` is either the same shape as `a` or one value per channel (`[N, C, 1, 1]`).
    Mul {
        a: usize,
        b: usize,
    },
    /// Softmax over all of an image's values (a classifier's `[N, C]` scores, or axis 1 of an
    /// opset < 13 Softmax, which flattens the rest).
    Softmax {
        x: usize,
    },
    /// Data movement within an image (Slice, Pad, Transpose, reshapes): `y[i] = x[map[i]]`, or
    /// `fill` where `map[i] == NONE`.
    Gather {
        x: usize,
        map: Vec<u32>,
        fill: f32,
    },
}

const NONE: u32 = u32::MAX;

/// Elementwise activations: value and derivative from the input.
#[derive(Debug, Clone)]
enum Act {
    LeakyRelu(f32),
    /// Slope per channel.
    PRelu(Vec<f32>),
    HardSigmoid(f32, f32),
    HardSwish,
    Sigmoid,
    Tanh,
}

impl Act {
    /// `(f(v), f'(v))` for channel `c`.
    #[inline(always)]
    fn eval(&self, v: f32, c: usize) -> (f32, f32) {
        match self {
            Act::LeakyRelu(a) => {
                if v > 0.0 {
                    (v, 1.0)
                } else {
                    (a * v, *a)
                }
            }
            Act::PRelu(s) => {
                if v > 0.0 {
                    (v, 1.0)
                } else {
                    (s[c] * v, s[c])
                }
            }
            Act::HardSigmoid(a, b) => {
                let t = a * v + b;
                if t <= 0.0 {
                    (0.0, 0.0)
                } else if t >= 1.0 {
                    (1.0, 0.0)
                } else {
                    (t, *a)
                }
            }
            Act::HardSwish => {
                let t = v / 6.0 + 0.5;
                if t <= 0.0 {
                    (0.0, 0.0)
                } else if t >= 1.0 {
                    (v, 1.0)
                } else {
                    (v * t, t + v / 6.0)
                }
            }
            Act::Sigmoid => {
                let s = 1.0 / (1.0 + (-v).exp());
                (s, s * (1.0 - s))
            }
            Act::Tanh => {
                let t = v.tanh();
                (t, 1.0 - t * t)
            }
        }
    }
}

/// The windows of a pooling node on one channel plane (`[h, w]` into `[oh, ow]`), in CSR form.
fn pool_windows(win: &crate::ir::infer::Window, h: usize, w: usize) -> (Vec<u32>, Vec<u32>) {
    let (oh, ow) = (win.out[0], win.out[1]);
    let mut ptr = Vec::with_capacity(oh * ow + 1);
    let mut idx = Vec::new();
    ptr.push(0);
    for oy in 0..oh {
        for ox in 0..ow {
            for ki in 0..win.kernel[0] {
                let iy = (oy * win.strides[0] + ki * win.dilations[0]) as isize
                    - win.pad_begin[0] as isize;
                if iy < 0 || iy >= h as isize {
                    continue;
                }
                for kj in 0..win.kernel[1] {
                    let ix = (ox * win.strides[1] + kj * win.dilations[1]) as isize
                        - win.pad_begin[1] as isize;
                    if ix >= 0 && ix < w as isize {
                        idx.push((iy as usize * w + ix as usize) as u32);
                    }
                }
            }
            ptr.push(idx.len() as u32);
        }
    }
    (ptr, idx)
}

/// Fold each ReLU into the Affine or Add that feeds it, when nothing else reads that value (and it
/// is not tapped): one pass instead of two, and the ReLU's own output serves as its mask.
fn fuse_relu(steps: Vec<Step>, tapped: &[usize]) -> Vec<Step> {
    let mut readers: HashMap<usize, usize> = HashMap::new();
    for st in &steps {
        for s in st.op.inputs() {
            *readers.entry(s).or_default() += 1;
        }
    }
    let mut out: Vec<Step> = Vec::with_capacity(steps.len());
    for st in steps {
        if let TOp::Relu { x } = st.op {
            if readers.get(&x) == Some(&1) && !tapped.contains(&x) {
                if let Some(prev) = out.iter_mut().rev().find(|p| p.y == x) {
                    if let TOp::Affine { relu, .. }
                    | TOp::Add { relu, .. }
                    | TOp::Conv { relu, .. } = &mut prev.op
                    {
                        if !*relu {
                            *relu = true;
                            prev.y = st.y;
                            continue;
                        }
                    }
                }
            }
        }
        out.push(st);
    }
    out
}

/// Drop the steps whose output no later step reads and no tap is (a Pad folded into the
/// convolution after it).
fn drop_unread(mut steps: Vec<Step>, tapped: &[usize]) -> Vec<Step> {
    loop {
        let read: std::collections::HashSet<usize> =
            steps.iter().flat_map(|st| st.op.inputs()).collect();
        let before = steps.len();
        steps.retain(|st| read.contains(&st.y) || tapped.contains(&st.y));
        if steps.len() == before {
            return steps;
        }
    }
}

impl TOp {
    /// The slots the op reads.
    fn inputs(&self) -> Vec<usize> {
        match self {
            TOp::Conv { x, .. }
            | TOp::Affine { x, .. }
            | TOp::Relu { x, .. }
            | TOp::Clip { x, .. }
            | TOp::Pool { x, .. }
            | TOp::Unary { x, .. }
            | TOp::Gather { x, .. }
            | TOp::Softmax { x } => vec![*x],
            TOp::Add { a, b, .. } | TOp::Mul { a, b, .. } => vec![*a, *b],
        }
    }
}

/// The index map of a data-movement node, found by running it (with the general executor) on
/// each position's own index, twice with an offset: a position copied from the input moves with
/// the offset, a padded one does not. `Err` when the node mixes images.
fn gather_map(
    plan: &Plan,
    i: usize,
    x: ValueId,
    n: usize,
    in_len: usize,
    out_len: usize,
) -> Result<(Vec<u32>, f32), Refusal> {
    let node = &plan.graph.nodes[i];
    let form = |why: String| Refusal::Form {
        op: node.op.name(),
        node: node.name.clone(),
        why,
    };
    let mixes = || Refusal::MixesImages {
        op: node.op.name(),
        node: node.name.clone(),
    };
    if in_len >= 1 << 24 {
        return Err(form("image too large".into()));
    }
    let shape = plan.graph.values[x].shape.clone().unwrap_or_default();
    let run = |value: &dyn Fn(usize, usize) -> f32| -> Result<Vec<f32>, Refusal> {
        let idx: Vec<f32> = (0..n)
            .flat_map(|img| (0..in_len).map(move |k| value(img, k)))
            .collect();
        let t = candle_core::Tensor::from_vec(idx, shape.as_slice(), &plan.device)
            .map_err(|e| form(e.to_string()))?;
        let ins: Vec<Option<candle_core::Tensor>> = node
            .inputs
            .iter()
            .map(|v| {
                v.map(|v| {
                    if v == x {
                        t.clone()
                    } else {
                        plan.consts.get(&v).cloned().unwrap_or_else(|| t.clone())
                    }
                })
            })
            .collect();
        let y =
            crate::exec::eval(node, &plan.steps[i].kind, &ins).map_err(|e| form(e.to_string()))?;
        y.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| form(e.to_string()))
    };
    let (a, b) = (run(&|_, k| k as f32)?, run(&|_, k| k as f32 + 0.5)?);
    if a.len() != n * out_len {
        return Err(mixes());
    }
    let mut fill = None;
    let mut map = Vec::with_capacity(out_len);
    for k in 0..out_len {
        if b[k] != a[k] {
            map.push(a[k] as u32);
        } else {
            if fill.is_some_and(|f: f32| f != a[k]) {
                return Err(form("mixed fill values".into()));
            }
            fill = Some(a[k]);
            map.push(NONE);
        }
    }
    // Every image must move the same way, and only within itself (the batch axis is untouched:
    // a third run marks each input image with its number).
    let owner = run(&|img, _| img as f32)?;
    for img in 0..n {
        let same_map = a[img * out_len..][..out_len] == a[..out_len];
        let own = map
            .iter()
            .zip(&owner[img * out_len..][..out_len])
            .all(|(&k, &o)| k == NONE || o == img as f32);
        if !same_map || !own {
            return Err(mixes());
        }
    }
    Ok((map, fill.unwrap_or(0.0)))
}

/// Per-image shape of a slot: channels and positions per channel.
#[derive(Debug, Clone, Copy)]
struct Slot {
    c: usize,
    hw: usize,
}

/// One image's buffers.
struct Image {
    vals: Vec<Vec<f32>>,

    /// Per tap: per-channel mean and sum of squared deviations.
    moments: Vec<(Vec<f64>, Vec<f64>)>,
}

/// Gradient buffers, one per slot, shared by the images of a worker (the backward pass runs one
/// image at a time).
struct Grads {
    grads: Vec<Vec<f32>>,
    /// Whether `grads[s]` holds a value in the current backward pass (else it is stale).
    live: Vec<bool>,
}

/// A thread's share of the batch, its gradient buffers and its im2col scratch.
struct Worker {
    images: Vec<Image>,
    grads: Grads,
    cols: Vec<f32>,
    /// A swung convolution's input (forward) and its gradient (backward).
    swung: Vec<f32>,
    swung_grad: Vec<f32>,
}

/// Why the tape does not run a graph; distillation then steps through candle's autograd.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// An op the tape has no implementation of.
    #[error("{op} node '{node}' is not supported")]
    Op { op: &'static str, node: String },
    /// A node that moves data between the images of a batch (the tape runs one image per task).
    #[error("{op} node '{node}' mixes images")]
    MixesImages { op: &'static str, node: String },
    /// A supported op in a form the tape does not handle (non-constant parameters, shapes).
    #[error("{op} node '{node}': {why}")]
    Form {
        op: &'static str,
        node: String,
        why: String,
    },
    /// The graph as a whole (its inputs, shapes, taps).
    #[error("{0}")]
    Graph(String),
}

impl Refusal {
    /// The op at fault, where one is.
    pub fn op(&self) -> Option<&'static str> {
        match self {
            Refusal::Op { op, .. } | Refusal::MixesImages { op, .. } | Refusal::Form { op, .. } => {
                Some(op)
            }
            Refusal::Graph(_) => None,
        }
    }
}

/// The statistics the tape reports for one tap: per (image, channel), the mean and the sum of
/// squared deviations about it, over the `hw` positions.
#[derive(Debug, Clone, PartialEq)]
pub struct TapMoments {
    pub n: usize,
    pub c: usize,
    pub hw: usize,
    /// `[N * C]`, image-major.
    pub mean: Vec<f64>,
    /// `[N * C]`: sum over the positions of `(x - mean)^2`.
    pub m2: Vec<f64>,
}

/// The loss gradient at one tap in closed form: `a + b (x - mean)` per (image, channel),
/// `[N * C]` each.
#[derive(Debug, Clone, Copy)]
pub struct TapGradient<'a> {
    pub a: &'a [f32],
    pub b: &'a [f32],
}

/// A graph compiled for [`Tape::forward`] / [`Tape::backward`].
pub struct Tape {
    n: usize,
    slots: Vec<Slot>,
    ops: Vec<Step>,
    taps: Vec<usize>,
    workers: Vec<Worker>,
    /// Threads each worker's convolutions may use: the cores a batch too small to give every
    /// core an image of its own leaves over.
    inner: usize,
    /// The least work (multiply-adds) a convolution is split over those threads for.
    grain: usize,
    /// The ops that are strided convolutions, in graph order ([`Tape::set_swing`]).
    strided: Vec<usize>,
}

/// Per-channel values of a constant that broadcasts against an `[N, C, ...]` activation of rank
/// `rank` as a scalar or along the channel axis only.
fn per_channel(t: &crate::ir::Tensor, c: usize, rank: usize) -> Option<Vec<f32>> {
    let v = t.to_f32_vec();
    if v.len() == 1 {
        return Some(vec![v[0]; c]);
    }
    let d = &t.shape;
    if d.len() > rank || d.len() + 1 < rank {
        return None;
    }
    // Numpy broadcasting aligns shapes on the right: the activation's channel axis (1 of `rank`)
    // is axis `d.len() + 1 - rank` of the constant.
    let ch = d.len() + 1 - rank;
    let only_channel = d
        .iter()
        .enumerate()
        .all(|(i, &k)| if i == ch { k == c } else { k == 1 });
    only_channel.then_some(v)
}

/// A fully connected layer's weight as a pointwise convolution's `[K][M]` and its bias: `B` is
/// `[K, M]` (`[M, K]` when `trans_b`), `C` (when present) is one value or `[M]` (`[1, M]`).
#[allow(clippy::type_complexity)]
fn dense(
    b: Option<&crate::ir::Tensor>,
    c: Option<Option<&crate::ir::Tensor>>,
    alpha: f32,
    beta: f32,
    trans_b: bool,
) -> Result<(usize, usize, Vec<f32>, Option<Vec<f32>>), &'static str> {
    let b = b.ok_or("weight is not constant")?;
    let [r0, r1] = b.shape[..] else {
        return Err("weight is not a matrix");
    };
    let (k, m) = if trans_b { (r1, r0) } else { (r0, r1) };
    let v = b.to_f32_vec();
    let w: Vec<f32> = (0..k * m)
        .map(|i| {
            let (kk, mm) = (i / m, i % m);
            alpha * if trans_b { v[mm * k + kk] } else { v[i] }
        })
        .collect();
    let bias = match c {
        None => None,
        Some(None) => return Err("bias is not constant"),
        Some(Some(t)) => {
            let cv = t.to_f32_vec();
            let per_row = t.shape.iter().rev().skip(1).all(|&d| d == 1);
            let cv = match cv.len() {
                1 => vec![cv[0]; m],
                l if l == m && per_row => cv,
                _ => return Err("bias does not broadcast as one value per output"),
            };
            Some(cv.iter().map(|v| beta * v).collect())
        }
    };
    Ok((k, m, w, bias))
}

impl Tape {
    /// Compile the part of `plan` that computes `taps` (values of the graph). `Err` names the first
    /// node the tape does not run, so the caller can fall back to the general executor.
    pub fn new(plan: &Plan, taps: &[ValueId]) -> Result<Tape, Refusal> {
        let g = &plan.graph;
        if g.inputs.len() != 1 {
            return Err(Refusal::Graph(format!("{} graph inputs", g.inputs.len())));
        }
        let input = g.inputs[0].value;
        let shape_of = |v: ValueId| -> Result<Vec<usize>, Refusal> {
            g.values[v].shape.clone().ok_or_else(|| {
                Refusal::Graph(format!("value '{}' has no static shape", g.values[v].name))
            })
        };
        let in_shape = shape_of(input)?;
        if in_shape.len() < 2 {
            return Err(Refusal::Graph(format!("input of shape {in_shape:?}")));
        }
        let n = in_shape[0];
        let mut producer: HashMap<ValueId, usize> = HashMap::new();
        for (i, node) in g.nodes.iter().enumerate() {
            for &o in &node.outputs {
                producer.insert(o, i);
            }
        }
        // The nodes the taps depend on.
        let mut needed = vec![false; g.nodes.len()];
        let mut stack: Vec<ValueId> = taps.to_vec();
        while let Some(v) = stack.pop() {
            if let Some(&p) = producer.get(&v) {
                if !needed[p] {
                    needed[p] = true;
                    for i in g.nodes[p].inputs.iter().flatten() {
                        if g.konst(*i).is_none() {
                            stack.push(*i);
                        }
                    }
                }
            } else if v != input && g.konst(v).is_none() {
                return Err(Refusal::Graph(format!(
                    "value '{}' has no producer",
                    g.values[v].name
                )));
            }
        }
        let mut slot_of: HashMap<ValueId, usize> = HashMap::new();
        let mut slots: Vec<Slot> = Vec::new();
        let mut new_slot =
            |v: ValueId, slot_of: &mut HashMap<ValueId, usize>| -> Result<usize, Refusal> {
                let d = shape_of(v)?;
                if d.len() < 2 || d[0] != n {
                    return Err(Refusal::Graph(format!(
                        "value '{}' of shape {d:?} is not a batch of {n}",
                        g.values[v].name
                    )));
                }
                slots.push(Slot {
                    c: d[1],
                    hw: d[2..].iter().product(),
                });
                slot_of.insert(v, slots.len() - 1);
                Ok(slots.len() - 1)
            };
        new_slot(input, &mut slot_of)?;
        let mut ops = Vec::new();
        for (i, node) in g.nodes.iter().enumerate() {
            if !needed[i] {
                continue;
            }
            let form = |why: String| Refusal::Form {
                op: node.op.name(),
                node: node.name.clone(),
                why,
            };
            let konst = |k: usize| node.input(k).and_then(|v| g.konst(v));
            let dynamic: Vec<ValueId> = node
                .inputs
                .iter()
                .flatten()
                .copied()
                .filter(|v| g.konst(*v).is_none())
                .collect();
            let slot = |v: ValueId| {
                slot_of
                    .get(&v)
                    .copied()
                    .ok_or_else(|| form("input not computed".into()))
            };
            let y_val = node.outputs[0];
            let y_shape = shape_of(y_val)?;
            let op = match (&node.op, &plan.steps[i].kind) {
                (Op::Identity | Op::Dropout, _) if dynamic.len() == 1 => {
                    let s = slot(dynamic[0])?;
                    slot_of.insert(y_val, s);
                    continue;
                }
                (Op::Conv(_), Kind::Conv(geom, _)) => {
                    // A zero Pad of the spatial axes in front (TensorFlow's SAME padding as
                    // exported) becomes the convolution's own padding: no padded copy is made,
                    // and the Pad's step is dropped below when nothing else reads it.
                    let xv = node.input(0).unwrap();
                    let pad = producer.get(&xv).and_then(|&j| {
                        match (&g.nodes[j].op, &plan.steps[j].kind) {
                            (Op::Pad { .. }, Kind::Pad(b, e, v, PadMode::Constant))
                                if *v == 0.0
                                    && b.len() == 4
                                    && e.len() == 4
                                    && b[..2] == [0, 0]
                                    && e[..2] == [0, 0] =>
                            {
                                let src = g.nodes[j].input(0)?;
                                slot_of.get(&src).map(|_| (src, [b[2], b[3], e[2], e[3]]))
                            }
                            _ => None,
                        }
                    });
                    let (xv, pad) = match pad {
                        Some((src, p)) => (src, p),
                        None => (xv, [0; 4]),
                    };
                    let x = slot(xv)?;
                    let w = konst(1).ok_or_else(|| form("weight is not constant".into()))?;
                    let xs = shape_of(xv)?;
                    let (c, h, wd) = match xs.len() {
                        3 => (xs[1], 1, xs[2]),
                        4 => (xs[1], xs[2], xs[3]),
                        _ => return Err(form(format!("input {xs:?}"))),
                    };
                    let wdims = match w.shape.len() {
                        3 => [w.shape[0], w.shape[1], 1, w.shape[2]],
                        4 => [w.shape[0], w.shape[1], w.shape[2], w.shape[3]],
                        _ => return Err(form(format!("weight {:?}", w.shape))),
                    };
                    if geom.group == 0 || c != wdims[1] * geom.group || wdims[0] % geom.group != 0 {
                        return Err(form("weight does not fit the input".into()));
                    }
                    let bias = match node.input(2) {
                        None => None,
                        Some(_) => Some(
                            konst(2)
                                .ok_or_else(|| form("bias is not constant".into()))?
                                .to_f32_vec(),
                        ),
                    };
                    let (ph, pw) = (h + pad[0] + pad[2], wd + pad[1] + pad[3]);
                    let mut geo = Geo::new(1, c, ph, pw, wdims, geom);
                    // Output positions reading the Pad's zeros read outside the input instead.
                    (geo.h, geo.w) = (h, wd);
                    geo.p = [geo.p[0] + pad[0], geo.p[1] + pad[1]];
                    if geo.l() * geo.m != y_shape[1..].iter().product::<usize>() {
                        return Err(form(format!("output shape {y_shape:?}")));
                    }
                    let w = w.to_f32_vec();
                    let fits = geo.k == [3, 3]
                        && geo.s == [1, 1]
                        && geo.d == [1, 1]
                        && geo.groups == 1
                        && geo.p[0] <= 2
                        && geo.p[1] <= 2;
                    let (wino, wino_grad) = if fits {
                        let shape = WinoShape {
                            c: geo.c,
                            m: geo.m,
                            h: geo.h,
                            w: geo.w,
                            oh: geo.o[0],
                            ow: geo.o[1],
                            pad: geo.p,
                        };
                        (
                            Some(Box::new(Wino::new(&w, shape))),
                            Wino::input_grad(&w, shape).map(Box::new),
                        )
                    } else {
                        (None, None)
                    };
                    // [M, Cg, kh, kw] -> per group [(ki, kj, cl), ml].
                    let (cg, mg, kh, kw) = (geo.cg(), geo.mg(), geo.k[0], geo.k[1]);
                    let kg = kh * kw * cg;
                    let mut wt = vec![0f32; geo.groups * kg * mg];
                    for grp in 0..geo.groups {
                        for ml in 0..mg {
                            for cl in 0..cg {
                                for ki in 0..kh {
                                    for kj in 0..kw {
                                        let src = (((grp * mg + ml) * cg + cl) * kh + ki) * kw + kj;
                                        let row = (ki * kw + kj) * cg + cl;
                                        wt[(grp * kg + row) * mg + ml] = w[src];
                                    }
                                }
                            }
                        }
                    }
                    let dw = (cg == 1 && mg == 1 && geo.groups > 1).then(|| {
                        let kk = kh * kw;
                        let mut dw = vec![0f32; kk * geo.groups];
                        for ch in 0..geo.groups {
                            for k in 0..kk {
                                dw[k * geo.groups + ch] = wt[ch * kk + k];
                            }
                        }
                        dw
                    });
                    TOp::Conv {
                        x,
                        geo,
                        w: wt,
                        bias,
                        wino,
                        wino_grad,
                        dw,
                        swing: None,
                        relu: false,
                    }
                }
                // A fully connected layer on `[N, K]` rows is a pointwise convolution over one
                // position: the same kernels, forward and backward.
                (Op::Gemm { trans_a: false, .. } | Op::MatMul, _)
                    if dynamic.len() == 1 && node.input(0) == Some(dynamic[0]) =>
                {
                    let (alpha, beta, trans_b) = match node.op {
                        Op::Gemm {
                            alpha,
                            beta,
                            trans_b,
                            ..
                        } => (alpha, beta, trans_b),
                        _ => (1.0, 1.0, false),
                    };
                    let c = match node.op {
                        Op::Gemm { .. } => node.input(2),
                        _ => None,
                    };
                    let (k, m, w, bias) =
                        dense(konst(1), c.map(|_| konst(2)), alpha, beta, trans_b)
                            .map_err(|why| form(why.into()))?;
                    if shape_of(dynamic[0])? != [n, k] || y_shape != [n, m] {
                        return Err(form(format!("rows of shape {y_shape:?}")));
                    }
                    TOp::Conv {
                        x: slot(dynamic[0])?,
                        geo: Geo::dense(k, m),
                        w,
                        bias,
                        wino: None,
                        wino_grad: None,
                        dw: None,
                        swing: None,
                        relu: false,
                    }
                }
                (Op::BatchNorm { epsilon }, _) => {
                    let x = slot(node.input(0).unwrap())?;
                    let p = |k: usize| {
                        konst(k)
                            .map(|t| t.to_f32_vec())
                            .ok_or_else(|| form("parameters are not constant".into()))
                    };
                    let (gamma, beta, mean, var) = (p(1)?, p(2)?, p(3)?, p(4)?);
                    let scale: Vec<f32> = gamma
                        .iter()
                        .zip(&var)
                        .map(|(g, v)| g / (v + epsilon).sqrt())
                        .collect();
                    let shift = beta
                        .iter()
                        .zip(&mean)
                        .zip(&scale)
                        .map(|((b, m), s)| b - m * s)
                        .collect();
                    TOp::Affine {
                        x,
                        scale,
                        shift,
                        relu: false,
                    }
                }
                (Op::Relu, _) => TOp::Relu {
                    x: slot(node.input(0).unwrap())?,
                },
                (Op::Softmax { .. }, Kind::Softmax(axis, coerce)) if dynamic.len() == 1 => {
                    let xs = shape_of(dynamic[0])?;
                    let whole = *axis == 1 && (*coerce || xs[2..].iter().all(|&d| d == 1));
                    if !whole {
                        return Err(form(format!("axis {axis} of {xs:?}")));
                    }
                    TOp::Softmax {
                        x: slot(dynamic[0])?,
                    }
                }
                (
                    Op::LeakyRelu { .. }
                    | Op::PRelu
                    | Op::HardSigmoid { .. }
                    | Op::HardSwish
                    | Op::Sigmoid
                    | Op::Tanh,
                    _,
                ) if dynamic.len() == 1 && node.input(0) == Some(dynamic[0]) => {
                    let act = match &node.op {
                        Op::LeakyRelu { alpha } => Act::LeakyRelu(*alpha),
                        Op::PRelu => {
                            let c = y_shape[1];
                            let slope = konst(1)
                                .and_then(|t| per_channel(t, c, y_shape.len()))
                                .ok_or_else(|| form("slope is not per channel".into()))?;
                            Act::PRelu(slope)
                        }
                        Op::HardSigmoid { alpha, beta } => Act::HardSigmoid(*alpha, *beta),
                        Op::HardSwish => Act::HardSwish,
                        Op::Sigmoid => Act::Sigmoid,
                        _ => Act::Tanh,
                    };
                    TOp::Unary {
                        x: slot(dynamic[0])?,
                        act,
                    }
                }
                (Op::MaxPool(_), Kind::MaxPool(win, _))
                | (Op::AveragePool(_), Kind::AvgPool(win, _, _))
                    if dynamic.len() == 1 =>
                {
                    let xs = shape_of(dynamic[0])?;
                    let (h, w) = match xs.len() {
                        3 => (1, xs[2]),
                        4 => (xs[2], xs[3]),
                        _ => return Err(form(format!("input {xs:?}"))),
                    };
                    let (ptr, idx) = pool_windows(win, h, w);
                    let (max, wgt) = match &plan.steps[i].kind {
                        Kind::AvgPool(_, _, div) => {
                            let d: Vec<f32> = div
                                .flatten_all()
                                .and_then(|t| t.to_vec1())
                                .map_err(|e| form(e.to_string()))?;
                            (false, d.iter().map(|v| 1.0 / v).collect())
                        }
                        _ => (true, Vec::new()),
                    };
                    TOp::Pool {
                        x: slot(dynamic[0])?,
                        max,
                        ptr,
                        idx,
                        wgt,
                    }
                }
                (Op::GlobalAveragePool | Op::GlobalMaxPool, _) if dynamic.len() == 1 => {
                    let xs = shape_of(dynamic[0])?;
                    let hw: usize = xs[2..].iter().product();
                    TOp::Pool {
                        x: slot(dynamic[0])?,
                        max: matches!(node.op, Op::GlobalMaxPool),
                        ptr: vec![0, hw as u32],
                        idx: (0..hw as u32).collect(),
                        wgt: vec![1.0 / hw.max(1) as f32],
                    }
                }
                (Op::Mul, _) if dynamic.len() == 2 => {
                    let (sa, sb) = (shape_of(dynamic[0])?, shape_of(dynamic[1])?);
                    let per_ch = |s: &[usize]| {
                        s.len() == y_shape.len()
                            && s[..2] == y_shape[..2]
                            && s[2..].iter().all(|&k| k == 1)
                    };
                    let (a, b) = if sa == y_shape && (sb == y_shape || per_ch(&sb)) {
                        (dynamic[0], dynamic[1])
                    } else if sb == y_shape && per_ch(&sa) {
                        (dynamic[1], dynamic[0])
                    } else {
                        return Err(form("broadcasting product".into()));
                    };
                    TOp::Mul {
                        a: slot(a)?,
                        b: slot(b)?,
                    }
                }
                (Op::Clip, Kind::Clip(lo, hi)) => TOp::Clip {
                    x: slot(node.input(0).unwrap())?,
                    lo: *lo,
                    hi: *hi,
                },
                (Op::Add, _) if dynamic.len() == 2 => {
                    let (a, b) = (dynamic[0], dynamic[1]);
                    if shape_of(a)? != y_shape || shape_of(b)? != y_shape {
                        return Err(form("broadcasting sum".into()));
                    }
                    TOp::Add {
                        a: slot(a)?,
                        b: slot(b)?,
                        relu: false,
                    }
                }
                (Op::Add | Op::Sub | Op::Mul | Op::Div, _) if dynamic.len() == 1 => {
                    let xv = dynamic[0];
                    let on_right = node.input(0) == Some(xv);
                    let cv = node
                        .inputs
                        .iter()
                        .flatten()
                        .find(|v| g.konst(**v).is_some())
                        .and_then(|v| g.konst(*v))
                        .ok_or_else(|| form("no constant operand".into()))?;
                    if shape_of(xv)? != y_shape {
                        return Err(form("broadcasting".into()));
                    }
                    let c = y_shape[1];
                    let v = per_channel(cv, c, y_shape.len())
                        .ok_or_else(|| form("constant is not per channel".into()))?;
                    let ones = vec![1f32; c];
                    let zeros = vec![0f32; c];
                    let (scale, shift) = match (&node.op, on_right) {
                        (Op::Add, _) => (ones, v),
                        (Op::Mul, _) => (v, zeros),
                        (Op::Sub, true) => (ones, v.iter().map(|k| -k).collect()),
                        (Op::Sub, false) => (vec![-1f32; c], v),
                        (Op::Div, true) => (v.iter().map(|k| 1.0 / k).collect(), zeros),
                        _ => return Err(form("constant divided by a tensor".into())),
                    };
                    TOp::Affine {
                        x: slot(xv)?,
                        scale,
                        shift,
                        relu: false,
                    }
                }
                (
                    Op::Slice
                    | Op::Pad { .. }
                    | Op::Transpose { .. }
                    | Op::Reshape { .. }
                    | Op::Flatten { .. }
                    | Op::Squeeze
                    | Op::Unsqueeze,
                    _,
                ) if dynamic.len() == 1 => {
                    let xv = dynamic[0];
                    let in_len: usize = shape_of(xv)?[1..].iter().product();
                    let out_len: usize = y_shape[1..].iter().product();
                    let (map, fill) = gather_map(plan, i, xv, n, in_len, out_len)?;
                    // Channels-first indices to channels-last ones.
                    let (cx, cy) = (shape_of(xv)?[1], y_shape[1]);
                    let (hx, hy) = (in_len / cx.max(1), out_len / cy.max(1));
                    let map = (0..out_len)
                        .map(|i| {
                            let (p, c) = (i / cy, i % cy);
                            let k = map[c * hy + p];
                            if k == NONE {
                                NONE
                            } else {
                                let (c2, p2) = (k as usize / hx, k as usize % hx);
                                (p2 * cx + c2) as u32
                            }
                        })
                        .collect();
                    TOp::Gather {
                        x: slot(xv)?,
                        map,
                        fill,
                    }
                }
                _ => {
                    return Err(Refusal::Op {
                        op: node.op.name(),
                        node: node.name.clone(),
                    })
                }
            };
            let y = new_slot(y_val, &mut slot_of)?;
            ops.push(Step { op, y });
        }
        // Shapes of every op's operands agree with its slots.
        for st in &ops {
            let y = &st.y;
            let len = |s: usize| slots[s].c * slots[s].hw;
            let ok = match &st.op {
                TOp::Conv { x, geo, .. } => {
                    slots[*x].c * slots[*x].hw == geo.c * geo.h * geo.w
                        && slots[*y].c * slots[*y].hw == geo.m * geo.l()
                }
                TOp::Affine { x, scale, .. } => {
                    scale.len() == slots[*x].c && slots[*x].c == slots[*y].c
                }
                TOp::Relu { x } | TOp::Clip { x, .. } | TOp::Softmax { x } => len(*x) == len(*y),
                TOp::Add { a, b, .. } => len(*a) == len(*y) && len(*b) == len(*y),
                TOp::Pool {
                    x,
                    max,
                    ptr,
                    idx,
                    wgt,
                } => {
                    let out = ptr.len() - 1;
                    slots[*x].c == slots[*y].c
                        && slots[*y].hw == out
                        && (*max || wgt.len() == out)
                        && idx.iter().all(|&k| (k as usize) < slots[*x].hw)
                }
                TOp::Unary { x, act } => {
                    len(*x) == len(*y)
                        && match act {
                            Act::PRelu(s) => s.len() == slots[*x].c,
                            _ => true,
                        }
                }
                TOp::Mul { a, b } => {
                    len(*a) == len(*y) && (len(*b) == len(*y) || slots[*b].c == slots[*y].c)
                }
                TOp::Gather { x, map, .. } => {
                    map.len() == len(*y) && map.iter().all(|&k| k == NONE || (k as usize) < len(*x))
                }
            };
            if !ok {
                return Err(Refusal::Graph("operand shapes disagree".into()));
            }
        }
        let tapped: Vec<usize> = taps
            .iter()
            .filter_map(|v| slot_of.get(v).copied())
            .collect();
        let ops = drop_unread(fuse_relu(ops, &tapped), &tapped);
        let strided: Vec<usize> = ops
            .iter()
            .enumerate()
            .filter(|(_, st)| matches!(&st.op, TOp::Conv { geo, .. } if geo.s != [1, 1]))
            .map(|(i, _)| i)
            .collect();
        let swung_len = strided
            .iter()
            .map(|&i| match &ops[i].op {
                TOp::Conv { geo, .. } => geo.c * geo.h * geo.w,
                _ => 0,
            })
            .max()
            .unwrap_or(0);
        let tap_slots = taps
            .iter()
            .map(|v| {
                slot_of.get(v).copied().ok_or_else(|| {
                    Refusal::Graph(format!("tap '{}' is not computed", g.values[*v].name))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let cols = ops
            .iter()
            .map(|st| match &st.op {
                TOp::Conv {
                    geo,
                    wino,
                    wino_grad,
                    ..
                } => {
                    let a = if geo.pointwise() {
                        0
                    } else {
                        geo.kg() * geo.l()
                    };
                    let b = wino.as_ref().map_or(0, |f| f.scratch_len());
                    let c = wino_grad.as_ref().map_or(0, |f| f.scratch_len());
                    a.max(b).max(c)
                }
                _ => 0,
            })
            .max()
            .unwrap_or(0);
        // Slots a fusion removed keep no buffers.
        let mut used = vec![false; slots.len()];
        used[0] = true;
        for st in &ops {
            used[st.y] = true;
            for s in st.op.inputs() {
                used[s] = true;
            }
        }
        let buf = |s: usize| {
            if used[s] {
                vec![0f32; slots[s].c * slots[s].hw]
            } else {
                Vec::new()
            }
        };
        let threads = rayon::current_num_threads().clamp(1, n.max(1));
        let per = n.div_ceil(threads);
        let workers = (0..threads)
            .map(|t| {
                let count = per.min(n.saturating_sub(t * per));
                Worker {
                    images: (0..count)
                        .map(|_| Image {
                            vals: (0..slots.len()).map(buf).collect(),
                            moments: tap_slots
                                .iter()
                                .map(|&s| (vec![0.0; slots[s].c], vec![0.0; slots[s].c]))
                                .collect(),
                        })
                        .collect(),
                    grads: Grads {
                        grads: (0..slots.len()).map(buf).collect(),
                        live: vec![false; slots.len()],
                    },
                    cols: vec![0f32; cols],
                    swung: vec![0f32; swung_len],
                    swung_grad: vec![0f32; swung_len],
                }
            })
            .filter(|w| !w.images.is_empty())
            .collect::<Vec<_>>();
        // Cores left over when the batch is smaller than the pool split each image's Winograd
        // convolutions into bands of tile rows.
        let inner = (rayon::current_num_threads() / workers.len().max(1)).max(1);
        Ok(Tape {
            n,
            slots,
            ops,
            taps: tap_slots,
            workers,
            inner,
            grain: SPLIT_MACS,
            strided,
        })
    }

    /// Threads for each worker's team: the spare ones, when some convolution is worth
    /// splitting; else 1, because a team whose helpers only spin made ResNet-20 at batch 1
    /// about 20% slower.
    fn team_threads(&self) -> usize {
        let splits = self.ops.iter().any(|st| match &st.op {
            TOp::Conv { geo, wino, dw, .. } => {
                let work = if wino.is_some() {
                    geo.l() * geo.c * geo.m * 9
                } else if dw.is_some() {
                    geo.l() * geo.c * geo.k[0] * geo.k[1]
                } else if geo.pointwise() && geo.groups == 1 {
                    geo.l() * geo.c * geo.m
                } else {
                    0
                };
                work >= self.grain
            }
            _ => false,
        });
        if splits {
            self.inner
        } else {
            1
        }
    }

    /// Split every convolution of at least `macs` multiply-adds over the spare threads (tests
    /// use 0 to run the split paths on small models).
    pub fn set_split_grain(&mut self, macs: usize) {
        self.grain = macs;
    }

    /// How many strided convolutions the tape runs (the offsets [`Tape::set_swing`] takes).
    pub fn strided_convs(&self) -> usize {
        self.strided.len()
    }

    /// Genie's swing convolution: from the next forward pass on, strided convolution `k` (in
    /// graph order) reads its input reflect-padded by 1 and cropped back to its size at offset
    /// `offsets[k] = (dy, dx)`, each in `0..=2`, i.e. input row `y` is row `y + dy - 1` reflected
    /// at the borders; the backward pass follows. `None` restores the plain convolutions.
    pub fn set_swing(&mut self, offsets: Option<&[(usize, usize)]>) {
        if let Some(o) = offsets {
            assert_eq!(
                o.len(),
                self.strided.len(),
                "one offset per strided convolution"
            );
            assert!(o.iter().all(|&(a, b)| a <= 2 && b <= 2), "offsets in 0..=2");
        }
        for (k, &i) in self.strided.iter().enumerate() {
            if let TOp::Conv { swing, .. } = &mut self.ops[i].op {
                *swing = offsets.map(|o| [o[k].0, o[k].1]);
            }
        }
    }

    /// Run the batch `x` (`[N, C, ...]` flattened) and return the moments of every tap.
    pub fn forward(&mut self, x: &[f32]) -> Vec<TapMoments> {
        let s0 = self.slots[0];
        let len0 = s0.c * s0.hw;
        assert_eq!(x.len(), self.n * len0, "tape input of the wrong size");
        let (inner, grain) = (self.team_threads(), self.grain);
        let (ops, slots, taps) = (&self.ops, &self.slots, &self.taps);
        let mut first = 0;
        let jobs: Vec<(usize, &mut Worker)> = self
            .workers
            .iter_mut()
            .map(|w| {
                let f = first;
                first += w.images.len();
                (f, w)
            })
            .collect();
        jobs.into_par_iter().for_each(|(f, w)| {
            with_team(inner, grain, |team| {
                for (k, img) in w.images.iter_mut().enumerate() {
                    let src = &x[(f + k) * len0..][..len0];
                    for (i, v) in img.vals[0].iter_mut().enumerate() {
                        *v = src[(i % s0.c) * s0.hw + i / s0.c];
                    }
                    vectorize(Forward {
                        ops,
                        slots,
                        taps,
                        img,
                        cols: &mut w.cols,
                        swung: &mut w.swung,
                        team,
                    });
                }
            })
        });
        taps.iter()
            .enumerate()
            .map(|(t, &s)| {
                let images = self.workers.iter().flat_map(|w| &w.images);
                let mut mean = Vec::with_capacity(self.n * slots[s].c);
                let mut m2 = Vec::with_capacity(self.n * slots[s].c);
                for img in images {
                    mean.extend_from_slice(&img.moments[t].0);
                    m2.extend_from_slice(&img.moments[t].1);
                }
                TapMoments {
                    n: self.n,
                    c: slots[s].c,
                    hw: slots[s].hw,
                    mean,
                    m2,
                }
            })
            .collect()
    }

    /// Values per image of the input.
    pub fn input_len(&self) -> usize {
        self.slots[0].c * self.slots[0].hw
    }

    /// Run the batch `x` and return the value of every tap, `[N, C, ...]` flattened (the layout
    /// of the graph, not the tape's channels-last one).
    pub fn values(&mut self, x: &[f32]) -> Vec<Vec<f32>> {
        self.forward(x);
        let images: Vec<&Image> = self.workers.iter().flat_map(|w| &w.images).collect();
        self.taps
            .iter()
            .map(|&s| {
                let Slot { c, hw } = self.slots[s];
                let mut out = Vec::with_capacity(self.n * c * hw);
                for img in &images {
                    let v = &img.vals[s];
                    out.extend((0..c * hw).map(|i| v[(i % hw) * c + i / hw]));
                }
                out
            })
            .collect()
    }

    /// After [`Tape::forward`]: the gradient at the input (`[N, C, ...]`), given the loss gradient
    /// at every tap.
    pub fn backward(&mut self, coeffs: &[TapGradient]) -> Vec<f32> {
        assert_eq!(coeffs.len(), self.taps.len(), "one gradient per tap");
        let s0 = self.slots[0];
        let len0 = s0.c * s0.hw;
        let (inner, grain) = (self.team_threads(), self.grain);
        let (ops, slots, taps) = (&self.ops, &self.slots, &self.taps);
        let mut out = vec![0f32; self.n * len0];
        let mut chunks = out.chunks_mut(len0);
        let mut first = 0;
        let jobs: Vec<(usize, &mut Worker, Vec<&mut [f32]>)> = self
            .workers
            .iter_mut()
            .map(|w| {
                let f = first;
                first += w.images.len();
                let outs = (0..w.images.len())
                    .map(|_| chunks.next().unwrap())
                    .collect();
                (f, w, outs)
            })
            .collect();
        jobs.into_par_iter().for_each(|(f, w, outs)| {
            with_team(inner, grain, |team| {
                for (k, (img, o)) in w.images.iter_mut().zip(outs).enumerate() {
                    vectorize(Backward {
                        ops,
                        slots,
                        taps,
                        coeffs,
                        b: f + k,
                        img,
                        g: &mut w.grads,
                        cols: &mut w.cols,
                        swung: &mut w.swung_grad,
                        team,
                    });
                    if w.grads.live[0] {
                        for (i, v) in o.iter_mut().enumerate() {
                            *v = w.grads.grads[0][(i % s0.hw) * s0.c + i / s0.hw];
                        }
                    } else {
                        o.fill(0.0);
                    }
                }
            })
        });
        out
    }
}

/// The forward pass of one image and the moments of its taps.
struct Forward<'a> {
    ops: &'a [Step],
    slots: &'a [Slot],
    taps: &'a [usize],
    img: &'a mut Image,
    cols: &'a mut [f32],
    swung: &'a mut [f32],
    team: &'a Team,
}

/// Sum of `f(row)` over the rows of a `[rows, c]` buffer, per channel: blocks of 64 rows in f32
/// (so the loop vectorises over channels), blocks combined in f64.
#[inline(always)]
fn column_sums(x: &[f32], c: usize, f: impl Fn(usize, f32) -> f32) -> Vec<f64> {
    let mut total = vec![0f64; c];
    let mut acc = vec![0f32; c];
    for block in x.chunks(64 * c.max(1)) {
        acc.fill(0.0);
        for row in block.chunks_exact(c.max(1)) {
            for (ch, (a, &v)) in acc.iter_mut().zip(row).enumerate() {
                *a += f(ch, v);
            }
        }
        for (t, &a) in total.iter_mut().zip(&acc) {
            *t += f64::from(a);
        }
    }
    total
}

impl Kernel for Forward<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let Forward {
            ops,
            slots,
            taps,
            img,
            cols,
            swung,
            team,
        } = self;
        forward_image(ops, slots, img, cols, swung, team);
        for (t, &s) in taps.iter().enumerate() {
            let Slot { c, hw } = slots[s];
            let x = &img.vals[s];
            let sums = column_sums(x, c, |_, v| v);
            let mean: Vec<f64> = sums.iter().map(|v| v / hw.max(1) as f64).collect();
            let mf: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
            let sq = column_sums(x, c, |ch, v| (v - mf[ch]) * (v - mf[ch]));
            let (out_mean, out_m2) = &mut img.moments[t];
            for ch in 0..c {
                out_mean[ch] = mean[ch];
                out_m2[ch] = zq_kernels::stats::m2_about_mean(mean[ch], sq[ch], hw);
            }
        }
    }
}

/// The backward pass of image `b`: loss gradients at the taps, then every op in reverse.
struct Backward<'a> {
    ops: &'a [Step],
    slots: &'a [Slot],
    taps: &'a [usize],
    coeffs: &'a [TapGradient<'a>],
    b: usize,
    img: &'a mut Image,
    g: &'a mut Grads,
    cols: &'a mut [f32],
    swung: &'a mut [f32],
    team: &'a Team,
}

impl Kernel for Backward<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let Backward {
            ops,
            slots,
            taps,
            coeffs,
            b,
            img,
            g: gr,
            cols,
            swung,
            team,
        } = self;
        gr.live.fill(false);
        for (t, &s) in taps.iter().enumerate() {
            let c = slots[s].c;
            let base = b * c;
            let (ka, kb) = (&coeffs[t].a[base..][..c], &coeffs[t].b[base..][..c]);
            let mean: Vec<f32> = img.moments[t].0.iter().map(|&m| m as f32).collect();
            let live = gr.live[s];
            let (vals, grads) = (&img.vals[s], &mut gr.grads[s]);
            for (gs, xs) in grads.chunks_exact_mut(c).zip(vals.chunks_exact(c)) {
                let src = xs
                    .iter()
                    .zip(ka.iter().zip(kb).zip(&mean))
                    .map(|(&v, ((&a, &b), &m))| a + b * (v - m));
                put(gs, src, live);
            }
            gr.live[s] = true;
        }
        backward_image(ops, slots, img, gr, cols, swung, team);
    }
}

/// Write (`live == false`) or add `src` into `dst`.
#[inline(always)]
fn put(dst: &mut [f32], src: impl Iterator<Item = f32>, live: bool) {
    if live {
        for (d, s) in dst.iter_mut().zip(src) {
            *d += s;
        }
    } else {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s;
        }
    }
}

/// `y = softmax(x)` over the whole slice.
#[inline(always)]
fn softmax(x: &[f32], y: &mut [f32]) {
    let top = x.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    for (o, &v) in y.iter_mut().zip(x) {
        *o = (v - top).exp();
    }
    let sum: f32 = y.iter().sum();
    y.iter_mut().for_each(|v| *v /= sum);
}

/// The adjoint of [`softmax`] at its output `y`: `dx = y * (dy - <dy, y>)`, added into `gx` when
/// `live`.
#[inline(always)]
fn softmax_adjoint(gy: &[f32], y: &[f32], gx: &mut [f32], live: bool) {
    let dot: f32 = gy.iter().zip(y).map(|(g, v)| g * v).sum();
    put(gx, gy.iter().zip(y).map(|(&g, &v)| v * (g - dot)), live);
}

/// Input row/column of output `o` at kernel offset `k` along one axis, if inside the input.
#[inline(always)]
fn tap_pos(geo: &Geo, axis: usize, o: usize, k: usize) -> Option<usize> {
    let len = if axis == 0 { geo.h } else { geo.w };
    let i = (o * geo.s[axis] + k * geo.d[axis]) as isize - geo.p[axis] as isize;
    (i >= 0 && (i as usize) < len).then_some(i as usize)
}

/// Channels-last im2col of one group: `cols[l][(ki, kj, cl)]`.
#[inline(always)]
fn im2col_hwc(x: &[f32], geo: &Geo, grp: usize, cols: &mut [f32]) {
    let (c, cg, kh, kw) = (geo.c, geo.cg(), geo.k[0], geo.k[1]);
    let kg = kh * kw * cg;
    for oy in 0..geo.o[0] {
        for ox in 0..geo.o[1] {
            let row = &mut cols[(oy * geo.o[1] + ox) * kg..][..kg];
            for ki in 0..kh {
                let iy = tap_pos(geo, 0, oy, ki);
                for kj in 0..kw {
                    let dst = &mut row[(ki * kw + kj) * cg..][..cg];
                    match (iy, tap_pos(geo, 1, ox, kj)) {
                        (Some(iy), Some(ix)) => {
                            dst.copy_from_slice(&x[(iy * geo.w + ix) * c + grp * cg..][..cg])
                        }
                        _ => dst.fill(0.0),
                    }
                }
            }
        }
    }
}

/// Calls `f(output position, kernel tap, input position)` for every tap of a convolution that
/// lies inside the input (taps in the zero padding are skipped), outputs in row-major order and
/// taps `ki * kw + kj` in order within each: the loop nest of the direct kernels below.
#[inline(always)]
fn for_each_tap(geo: &Geo, mut f: impl FnMut(usize, usize, usize)) {
    let (kh, kw) = (geo.k[0], geo.k[1]);
    for oy in 0..geo.o[0] {
        for ox in 0..geo.o[1] {
            for ki in 0..kh {
                let Some(iy) = tap_pos(geo, 0, oy, ki) else {
                    continue;
                };
                for kj in 0..kw {
                    let Some(ix) = tap_pos(geo, 1, ox, kj) else {
                        continue;
                    };
                    f(oy * geo.o[1] + ox, ki * kw + kj, iy * geo.w + ix);
                }
            }
        }
    }
}

/// The adjoint of [`im2col_hwc`]: adds `cols` into `dx`.
#[inline(always)]
fn col2im_hwc(cols: &[f32], geo: &Geo, grp: usize, dx: &mut [f32]) {
    let (c, cg) = (geo.c, geo.cg());
    let kg = geo.k[0] * geo.k[1] * cg;
    for_each_tap(geo, |o, k, i| {
        let src = &cols[o * kg + k * cg..][..cg];
        let dst = &mut dx[i * c + grp * cg..][..cg];
        for (d, &v) in dst.iter_mut().zip(src) {
            *d += v;
        }
    });
}

/// Depthwise convolution of a channels-last image (`dw` is `[kh * kw][C]`), written into `out`
/// (`[positions][C]`): along the channels, so it vectorises.
#[inline(always)]
fn depthwise_hwc(x: &[f32], geo: &Geo, dw: &[f32], out: &mut [f32], team: &Team) {
    let rows = geo.o[0];
    let parts = team.parts_for(geo.l() * geo.c * geo.k[0] * geo.k[1], rows);
    if parts <= 1 {
        depthwise_rows(x, geo, dw, out, 0);
        return;
    }
    let per = rows.div_ceil(parts);
    let bands = out
        .chunks_mut(per * geo.o[1] * geo.c)
        .enumerate()
        .map(|(i, out)| DwRows {
            x,
            geo,
            dw,
            out,
            first: i * per,
        })
        .collect();
    team.for_each(bands, &|b| vectorize(b));
}

/// Work (multiply-adds) from which a convolution of one image is split over a team: below it,
/// handing half to the other core cost more than it saved (ResNet-20's 3x3 convolutions at
/// 32x32x16, 2.4M, ran slower split at batch 1; EfficientNet-Lite1's layers at 120x120 gain).
const SPLIT_MACS: usize = 1 << 23;

/// Output rows from `first` of a depthwise convolution, for one member of a team.
struct DwRows<'a> {
    x: &'a [f32],
    geo: &'a Geo,
    dw: &'a [f32],
    out: &'a mut [f32],
    first: usize,
}

impl Kernel for DwRows<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        depthwise_rows(self.x, self.geo, self.dw, self.out, self.first);
    }
}

/// [`depthwise_hwc`] for the output rows from `first` that `out` holds.
#[inline(always)]
fn depthwise_rows(x: &[f32], geo: &Geo, dw: &[f32], out: &mut [f32], first: usize) {
    let (c, kh, kw) = (geo.c, geo.k[0], geo.k[1]);
    let rows = out.len() / (geo.o[1] * c).max(1);
    // Per output position, its taps' (input, weight) offsets; each block of channels sums them
    // in registers and is stored once (taps in the same order as the adjoint's, from zero).
    let mut taps: Vec<(usize, usize)> = Vec::with_capacity(kh * kw);
    for oy in first..first + rows {
        for ox in 0..geo.o[1] {
            taps.clear();
            for ki in 0..kh {
                let Some(iy) = tap_pos(geo, 0, oy, ki) else {
                    continue;
                };
                for kj in 0..kw {
                    if let Some(ix) = tap_pos(geo, 1, ox, kj) {
                        taps.push(((iy * geo.w + ix) * c, (ki * kw + kj) * c));
                    }
                }
            }
            let o = &mut out[((oy - first) * geo.o[1] + ox) * c..][..c];
            // Wide blocks keep several independent sums in flight (one block of 16 waited on
            // its own additions, tap after tap).
            let mut cb = 0;
            while cb + 64 <= c {
                depthwise_block::<64>(x, dw, &taps, cb, &mut o[cb..cb + 64]);
                cb += 64;
            }
            if cb + 32 <= c {
                depthwise_block::<32>(x, dw, &taps, cb, &mut o[cb..cb + 32]);
                cb += 32;
            }
            if cb + 16 <= c {
                depthwise_block::<16>(x, dw, &taps, cb, &mut o[cb..cb + 16]);
                cb += 16;
            }
            if cb + 8 <= c {
                depthwise_block::<8>(x, dw, &taps, cb, &mut o[cb..cb + 8]);
                cb += 8;
            }
            for (ch, o) in o.iter_mut().enumerate().skip(cb) {
                *o = taps
                    .iter()
                    .fold(0.0, |a, &(xi, wi)| a + x[xi + ch] * dw[wi + ch]);
            }
        }
    }
}

/// `W` channels from `cb` of one depthwise output position: the sum over `taps`.
#[inline(always)]
fn depthwise_block<const W: usize>(
    x: &[f32],
    dw: &[f32],
    taps: &[(usize, usize)],
    cb: usize,
    o: &mut [f32],
) {
    let mut acc = [0f32; W];
    for &(xi, wi) in taps {
        let xs: &[f32; W] = x[xi + cb..][..W].try_into().unwrap();
        let ws: &[f32; W] = dw[wi + cb..][..W].try_into().unwrap();
        for l in 0..W {
            acc[l] += xs[l] * ws[l];
        }
    }
    o.copy_from_slice(&acc);
}

/// The adjoint of [`depthwise_hwc`]: adds the input gradient of `gy` into `gx`.
#[inline(always)]
fn depthwise_hwc_adjoint(gy: &[f32], geo: &Geo, dw: &[f32], gx: &mut [f32]) {
    let c = geo.c;
    for_each_tap(geo, |o, k, i| {
        let (d, g, ws) = (&mut gx[i * c..][..c], &gy[o * c..][..c], &dw[k * c..][..c]);
        for ((d, &gv), &wv) in d.iter_mut().zip(g).zip(ws) {
            *d += gv * wv;
        }
    });
}

/// Columns `first..first + cols` of a row-major `[rows, stride]` matrix.
fn cols_of(data: &[f32], rows: usize, stride: usize, first: usize, cols: usize) -> MatRef<'_> {
    MatRef::strided(&data[first..], rows, cols, stride)
}

fn cols_of_mut(
    data: &mut [f32],
    rows: usize,
    stride: usize,
    first: usize,
    cols: usize,
) -> MatMut<'_> {
    MatMut::strided(&mut data[first..], rows, cols, stride)
}

/// Row `i + off - 1` of an axis of length `n`, reflected at the borders (`off` in 0..=2).
#[inline(always)]
fn reflect(i: usize, off: usize, n: usize) -> usize {
    if n < 2 {
        return 0;
    }
    let j = i as isize + off as isize - 1;
    (if j < 0 {
        -j
    } else if j >= n as isize {
        2 * n as isize - 2 - j
    } else {
        j
    }) as usize
}

/// A swung convolution's input: `out[y, x] = x[reflect(y + dy - 1), reflect(x + dx - 1)]`
/// (channels-last `[h * w, c]`).
fn swing_gather(x: &[f32], geo: &Geo, off: [usize; 2], out: &mut [f32]) {
    let (c, h, w) = (geo.c, geo.h, geo.w);
    for y in 0..h {
        let sy = reflect(y, off[0], h);
        for xx in 0..w {
            let sx = reflect(xx, off[1], w);
            out[(y * w + xx) * c..][..c].copy_from_slice(&x[(sy * w + sx) * c..][..c]);
        }
    }
}

/// The adjoint of [`swing_gather`]: adds `g` into `gx`.
fn swing_scatter(g: &[f32], geo: &Geo, off: [usize; 2], gx: &mut [f32]) {
    let (c, h, w) = (geo.c, geo.h, geo.w);
    for y in 0..h {
        let sy = reflect(y, off[0], h);
        for xx in 0..w {
            let sx = reflect(xx, off[1], w);
            let src = &g[(y * w + xx) * c..][..c];
            for (d, &v) in gx[(sy * w + sx) * c..][..c].iter_mut().zip(src) {
                *d += v;
            }
        }
    }
}

/// The offset of a swung convolution, `None` for a plain one.
#[inline(always)]
fn active(swing: &Option<[usize; 2]>) -> Option<[usize; 2]> {
    swing.filter(|o| *o != [1, 1])
}

#[inline(always)]
fn forward_image(
    ops: &[Step],
    slots: &[Slot],
    img: &mut Image,
    cols: &mut [f32],
    swung: &mut [f32],
    team: &Team,
) {
    for Step { op, y } in ops {
        let y = *y;
        let mut out = std::mem::take(&mut img.vals[y]);
        match op {
            TOp::Conv {
                x,
                geo,
                w,
                bias,
                wino,
                dw,
                swing,
                relu,
                ..
            } => {
                let xin: &[f32] = match active(swing) {
                    Some(off) => {
                        let len = geo.c * geo.h * geo.w;
                        swing_gather(&img.vals[*x], geo, off, &mut swung[..len]);
                        &swung[..len]
                    }
                    None => &img.vals[*x],
                };
                let (c, m, l) = (geo.c, geo.m, geo.l());
                let (cg, mg) = (geo.cg(), geo.mg());
                let kg = geo.k[0] * geo.k[1] * cg;
                if let Some(f) = wino {
                    f.run(xin, &mut out, false, cols, team);
                } else if let Some(dw) = dw {
                    depthwise_hwc(xin, geo, dw, &mut out, team);
                } else if geo.pointwise() && geo.groups == 1 {
                    let parts = team.parts_for(l * c * m, l);
                    if parts <= 1 {
                        sgemm(
                            MatMut::rows(&mut out, l, m),
                            MatRef::rows(xin, l, c),
                            MatRef::rows(w, c, m),
                            false,
                            1,
                        );
                    } else {
                        // Bands of output positions, one per thread (`c`, `m` > 0 here).
                        let per = l.div_ceil(parts);
                        let bands = out.chunks_mut(per * m).zip(xin.chunks(per * c)).collect();
                        team.for_each(bands, &|(o, xb): (&mut [f32], &[f32])| {
                            let rows = xb.len() / c;
                            sgemm(
                                MatMut::rows(o, rows, m),
                                MatRef::rows(xb, rows, c),
                                MatRef::rows(w, c, m),
                                false,
                                1,
                            );
                        });
                    }
                } else {
                    for grp in 0..geo.groups {
                        let cs = &mut cols[..l * kg];
                        im2col_hwc(xin, geo, grp, cs);
                        sgemm(
                            cols_of_mut(&mut out, l, m, grp * mg, mg),
                            MatRef::rows(cs, l, kg),
                            MatRef::rows(&w[grp * kg * mg..][..kg * mg], kg, mg),
                            false,
                            1,
                        );
                    }
                }
                match (bias, *relu) {
                    (Some(b), true) => {
                        for row in out.chunks_exact_mut(m) {
                            for (v, &bv) in row.iter_mut().zip(b) {
                                *v = (*v + bv).max(0.0);
                            }
                        }
                    }
                    (Some(b), false) => {
                        for row in out.chunks_exact_mut(m) {
                            for (v, &bv) in row.iter_mut().zip(b) {
                                *v += bv;
                            }
                        }
                    }
                    (None, true) => out.iter_mut().for_each(|v| *v = v.max(0.0)),
                    (None, false) => {}
                }
            }
            TOp::Affine {
                x,
                scale,
                shift,
                relu,
                ..
            } => {
                let c = scale.len().max(1);
                for (o, i) in out.chunks_exact_mut(c).zip(img.vals[*x].chunks_exact(c)) {
                    let it = o.iter_mut().zip(i).zip(scale.iter().zip(shift));
                    if *relu {
                        for ((o, &v), (&s, &t)) in it {
                            *o = (v * s + t).max(0.0);
                        }
                    } else {
                        for ((o, &v), (&s, &t)) in it {
                            *o = v * s + t;
                        }
                    }
                }
            }
            TOp::Relu { x, .. } => {
                for (o, &v) in out.iter_mut().zip(&img.vals[*x]) {
                    *o = v.max(0.0);
                }
            }
            TOp::Clip { x, lo, hi, .. } => {
                let (lo, hi) = (*lo, *hi);
                // Compare and select, which vectorises (`f32::clamp` does not); NaN stays NaN.
                for (o, &v) in out.iter_mut().zip(&img.vals[*x]) {
                    *o = if v < lo {
                        lo
                    } else if v > hi {
                        hi
                    } else {
                        v
                    };
                }
            }
            TOp::Add { a, b, relu, .. } => {
                let it = out.iter_mut().zip(&img.vals[*a]).zip(&img.vals[*b]);
                if *relu {
                    for ((o, &u), &v) in it {
                        *o = (u + v).max(0.0);
                    }
                } else {
                    for ((o, &u), &v) in it {
                        *o = u + v;
                    }
                }
            }
            TOp::Pool {
                x,
                max,
                ptr,
                idx,
                wgt,
                ..
            } => {
                let c = slots[*x].c.max(1);
                let xin = &img.vals[*x];
                for (i, o) in out.chunks_exact_mut(c).enumerate() {
                    let win = &idx[ptr[i] as usize..ptr[i + 1] as usize];
                    if *max {
                        o.fill(f32::NEG_INFINITY);
                        for &p in win {
                            for (o, &v) in o.iter_mut().zip(&xin[p as usize * c..][..c]) {
                                *o = o.max(v);
                            }
                        }
                    } else {
                        o.fill(0.0);
                        for &p in win {
                            for (o, &v) in o.iter_mut().zip(&xin[p as usize * c..][..c]) {
                                *o += v;
                            }
                        }
                        let k = wgt[i];
                        o.iter_mut().for_each(|v| *v *= k);
                    }
                }
            }
            TOp::Unary { x, act, .. } => {
                let c = slots[*x].c.max(1);
                for (o, i) in out.chunks_exact_mut(c).zip(img.vals[*x].chunks_exact(c)) {
                    for (ch, (o, &v)) in o.iter_mut().zip(i).enumerate() {
                        *o = act.eval(v, ch).0;
                    }
                }
            }
            TOp::Mul { a, b, .. } => {
                let (va, vb) = (&img.vals[*a], &img.vals[*b]);
                if vb.len() == out.len() {
                    for ((o, &u), &v) in out.iter_mut().zip(va).zip(vb) {
                        *o = u * v;
                    }
                } else {
                    let c = vb.len().max(1);
                    for (o, p) in out.chunks_exact_mut(c).zip(va.chunks_exact(c)) {
                        for ((o, &u), &v) in o.iter_mut().zip(p).zip(vb) {
                            *o = u * v;
                        }
                    }
                }
            }
            TOp::Softmax { x } => softmax(&img.vals[*x], &mut out),
            TOp::Gather { x, map, fill, .. } => {
                let xin = &img.vals[*x];
                for (o, &k) in out.iter_mut().zip(map) {
                    *o = if k == NONE { *fill } else { xin[k as usize] };
                }
            }
        }
        img.vals[y] = out;
    }
}

#[inline(always)]
fn backward_image(
    ops: &[Step],
    slots: &[Slot],
    img: &mut Image,
    gr: &mut Grads,
    cols: &mut [f32],
    swung: &mut [f32],
    team: &Team,
) {
    for Step { op, y } in ops.iter().rev() {
        let y = *y;
        if !gr.live[y] {
            continue; // nothing downstream reaches a tap through this value
        }
        let mut gy = std::mem::take(&mut gr.grads[y]);
        let yv = std::mem::take(&mut img.vals[y]);
        match op {
            TOp::Conv {
                x,
                geo,
                w,
                wino_grad,
                dw,
                swing,
                relu,
                ..
            } => {
                // Through the fused ReLU first: its output is the mask.
                if *relu {
                    for (g, &v) in gy.iter_mut().zip(&yv) {
                        if v <= 0.0 {
                            *g = 0.0;
                        }
                    }
                }
                // A swung convolution's input gradient goes to the swung input first, then
                // back through the reflection.
                let off = active(swing);
                let live = gr.live[*x] && off.is_none();
                let gx: &mut [f32] = match off {
                    Some(_) => &mut swung[..geo.c * geo.h * geo.w],
                    None => &mut gr.grads[*x],
                };
                let (c, m, l) = (geo.c, geo.m, geo.l());
                let (cg, mg) = (geo.cg(), geo.mg());
                let kg = geo.k[0] * geo.k[1] * cg;
                if let Some(f) = wino_grad {
                    f.run(&gy, gx, live, cols, team);
                } else if let Some(dw) = dw {
                    if !live {
                        gx.fill(0.0);
                    }
                    depthwise_hwc_adjoint(&gy, geo, dw, gx);
                } else if geo.pointwise() && geo.groups == 1 {
                    sgemm(
                        MatMut::rows(gx, l, c),
                        MatRef::rows(&gy, l, m),
                        MatRef::transposed(w, c, m),
                        live,
                        1,
                    );
                } else {
                    if !live {
                        gx.fill(0.0);
                    }
                    for grp in 0..geo.groups {
                        let dc = &mut cols[..l * kg];
                        sgemm(
                            MatMut::rows(dc, l, kg),
                            cols_of(&gy, l, m, grp * mg, mg),
                            MatRef::transposed(&w[grp * kg * mg..][..kg * mg], kg, mg),
                            false,
                            1,
                        );
                        col2im_hwc(dc, geo, grp, gx);
                    }
                }
                if let Some(off) = off {
                    let dst = &mut gr.grads[*x];
                    if !gr.live[*x] {
                        dst.fill(0.0);
                    }
                    swing_scatter(&swung[..geo.c * geo.h * geo.w], geo, off, dst);
                }
                gr.live[*x] = true;
            }
            TOp::Affine { x, scale, relu, .. } => {
                let live = gr.live[*x];
                let c = scale.len().max(1);
                let gx = &mut gr.grads[*x];
                for ((d, g), yy) in gx
                    .chunks_exact_mut(c)
                    .zip(gy.chunks_exact(c))
                    .zip(yv.chunks_exact(c))
                {
                    if *relu {
                        let src =
                            g.iter()
                                .zip(yy)
                                .zip(scale)
                                .map(|((&g, &v), &s)| if v > 0.0 { g * s } else { 0.0 });
                        put(d, src, live);
                    } else {
                        put(d, g.iter().zip(scale).map(|(&g, &s)| g * s), live);
                    }
                }
                gr.live[*x] = true;
            }
            TOp::Relu { x, .. } => {
                let live = gr.live[*x];
                let (vals, grads) = (&img.vals[*x], &mut gr.grads[*x]);
                let src = gy
                    .iter()
                    .zip(vals)
                    .map(|(&g, &v)| if v > 0.0 { g } else { 0.0 });
                put(grads, src, live);
                gr.live[*x] = true;
            }
            TOp::Clip { x, lo, hi, .. } => {
                let live = gr.live[*x];
                let (vals, grads) = (&img.vals[*x], &mut gr.grads[*x]);
                let src = gy
                    .iter()
                    .zip(vals)
                    .map(|(&g, &v)| if v >= *lo && v <= *hi { g } else { 0.0 });
                put(grads, src, live);
                gr.live[*x] = true;
            }
            TOp::Add { a, b, relu, .. } => {
                if *relu {
                    for (g, &v) in gy.iter_mut().zip(&yv) {
                        if v <= 0.0 {
                            *g = 0.0;
                        }
                    }
                }
                for s in [*a, *b] {
                    let live = gr.live[s];
                    put(&mut gr.grads[s], gy.iter().copied(), live);
                    gr.live[s] = true;
                }
            }
            TOp::Pool {
                x,
                max,
                ptr,
                idx,
                wgt,
                ..
            } => {
                let c = slots[*x].c.max(1);
                let (gx, vx) = (&mut gr.grads[*x], &img.vals[*x]);
                if !gr.live[*x] {
                    gx.fill(0.0);
                }
                let mut best = vec![0f32; c];
                let mut arg = vec![0u32; c];
                for (i, g) in gy.chunks_exact(c).enumerate() {
                    let win = &idx[ptr[i] as usize..ptr[i + 1] as usize];
                    if *max {
                        // The first position holding the maximum takes the gradient.
                        let Some(&p0) = win.first() else { continue };
                        best.copy_from_slice(&vx[p0 as usize * c..][..c]);
                        arg.fill(p0);
                        for &p in &win[1..] {
                            let row = &vx[p as usize * c..][..c];
                            for ((b, a), &v) in best.iter_mut().zip(arg.iter_mut()).zip(row) {
                                if v > *b {
                                    *b = v;
                                    *a = p;
                                }
                            }
                        }
                        for (ch, (&a, &g)) in arg.iter().zip(g).enumerate() {
                            gx[a as usize * c + ch] += g;
                        }
                    } else {
                        let k = wgt[i];
                        for &p in win {
                            for (d, &g) in gx[p as usize * c..][..c].iter_mut().zip(g) {
                                *d += g * k;
                            }
                        }
                    }
                }
                gr.live[*x] = true;
            }
            TOp::Unary { x, act, .. } => {
                let live = gr.live[*x];
                let c = slots[*x].c.max(1);
                let (gx, vx) = (&mut gr.grads[*x], &img.vals[*x]);
                for ((d, p), g) in gx
                    .chunks_exact_mut(c)
                    .zip(vx.chunks_exact(c))
                    .zip(gy.chunks_exact(c))
                {
                    let src = g
                        .iter()
                        .zip(p)
                        .enumerate()
                        .map(|(ch, (&g, &v))| g * act.eval(v, ch).1);
                    put(d, src, live);
                }
                gr.live[*x] = true;
            }
            TOp::Mul { a, b, .. } => {
                let same = img.vals[*b].len() == gy.len();
                let c = img.vals[*b].len().max(1);
                // d a = gy * b
                {
                    let live = gr.live[*a];
                    let (ga, vb) = (&mut gr.grads[*a], &img.vals[*b]);
                    if same {
                        put(ga, gy.iter().zip(vb).map(|(&g, &v)| g * v), live);
                    } else {
                        for (d, g) in ga.chunks_exact_mut(c).zip(gy.chunks_exact(c)) {
                            put(d, g.iter().zip(vb).map(|(&g, &v)| g * v), live);
                        }
                    }
                    gr.live[*a] = true;
                }
                // d b = gy * a (summed over the positions when b is per channel)
                {
                    let live = gr.live[*b];
                    let (gb, va) = (&mut gr.grads[*b], &img.vals[*a]);
                    if same {
                        put(gb, gy.iter().zip(va).map(|(&g, &v)| g * v), live);
                    } else {
                        let mut sums = vec![0f32; c];
                        for (g, p) in gy.chunks_exact(c).zip(va.chunks_exact(c)) {
                            for ((s, &g), &v) in sums.iter_mut().zip(g).zip(p) {
                                *s += g * v;
                            }
                        }
                        put(gb, sums.into_iter(), live);
                    }
                    gr.live[*b] = true;
                }
            }
            TOp::Gather { x, map, .. } => {
                let gx = &mut gr.grads[*x];
                if !gr.live[*x] {
                    gx.fill(0.0);
                }
                for (&g, &k) in gy.iter().zip(map) {
                    if k != NONE {
                        gx[k as usize] += g;
                    }
                }
                gr.live[*x] = true;
            }
            TOp::Softmax { x } => {
                softmax_adjoint(&gy, &yv, &mut gr.grads[*x], gr.live[*x]);
                gr.live[*x] = true;
            }
        }
        gr.grads[y] = gy;
        img.vals[y] = yv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(c: usize, h: usize, w: usize) -> Geo {
        Geo {
            n: 1,
            c,
            h,
            w,
            k: [3, 3],
            s: [2, 2],
            d: [1, 1],
            p: [1, 1],
            o: [h.div_ceil(2), w.div_ceil(2)],
            groups: 1,
            m: 1,
        }
    }

    #[test]
    fn softmax_gradient_matches_finite_differences() {
        let x = [0.3f32, -1.2, 2.0, 0.5, 0.0];
        let w = [0.7f32, -0.4, 1.1, 0.2, -0.9];
        // f(x) = <w, softmax(x)>
        let f = |x: &[f32]| {
            let mut y = [0f32; 5];
            softmax(x, &mut y);
            y.iter().zip(&w).map(|(a, b)| f64::from(a * b)).sum::<f64>()
        };
        let mut y = [0f32; 5];
        softmax(&x, &mut y);
        assert!((y.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let mut g = [5f32; 5];
        softmax_adjoint(&w, &y, &mut g, false);
        for i in 0..5 {
            let (mut a, mut b) = (x, x);
            a[i] += 1e-2;
            b[i] -= 1e-2;
            let fd = (f(&a) - f(&b)) / 2e-2;
            assert!((fd - f64::from(g[i])).abs() < 1e-3, "{i}: {fd} vs {}", g[i]);
        }
        // live: added to what is there
        let mut h = [1f32; 5];
        softmax_adjoint(&w, &y, &mut h, true);
        for i in 0..5 {
            assert!((h[i] - 1.0 - g[i]).abs() < 1e-6);
        }
    }

    #[test]
    fn swing_input_is_a_reflected_crop_and_its_gradient_the_adjoint() {
        for (c, h, w) in [(2, 5, 4), (3, 1, 6), (1, 2, 2)] {
            let g = geo(c, h, w);
            let x: Vec<f32> = (0..c * h * w).map(|i| (i as f32 * 0.37).sin()).collect();
            let y: Vec<f32> = (0..c * h * w).map(|i| (i as f32 * 0.91).cos()).collect();
            for dy in 0..3 {
                for dx in 0..3 {
                    let mut ax = vec![0f32; x.len()];
                    swing_gather(&x, &g, [dy, dx], &mut ax);
                    // Against an explicit reflect pad by 1 (a length-1 axis is left alone) and
                    // a crop at (dy, dx).
                    let pad = |i: isize, n: usize| -> usize {
                        if n == 1 {
                            0
                        } else if i < 0 {
                            1
                        } else if i as usize >= n {
                            n - 2
                        } else {
                            i as usize
                        }
                    };
                    for yy in 0..h {
                        for xx in 0..w {
                            let sy = pad(yy as isize + dy as isize - 1, h);
                            let sx = pad(xx as isize + dx as isize - 1, w);
                            for ch in 0..c {
                                assert_eq!(ax[(yy * w + xx) * c + ch], x[(sy * w + sx) * c + ch]);
                            }
                        }
                    }
                    let mut aty = vec![0f32; x.len()];
                    swing_scatter(&y, &g, [dy, dx], &mut aty);
                    let lhs: f32 = ax.iter().zip(&y).map(|(a, b)| a * b).sum();
                    let rhs: f32 = x.iter().zip(&aty).map(|(a, b)| a * b).sum();
                    assert!(
                        (lhs - rhs).abs() < 1e-5,
                        "{c}x{h}x{w} ({dy},{dx}): {lhs} vs {rhs}"
                    );
                }
            }
        }
    }
}
