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
use zq_quant::kernels::gemm::{sgemm, MatMut, MatRef};
use zq_quant::kernels::simd::{vectorize, Kernel};
use zq_synth::{Coeffs, Moments};

use super::conv::{col2im, im2col, Geo};
use super::wino::{Wino, WinoShape};
use super::{Kind, Plan};
use crate::ir::{Op, ValueId};

/// One op on per-image slots (indices into an image's buffers).
#[derive(Debug)]
enum TOp {
    /// `w` is `[M, Kg]` row-major, group g owning rows `g*Mg..(g+1)*Mg`.
    Conv {
        x: usize,
        y: usize,
        geo: Geo,
        w: Vec<f32>,
        bias: Option<Vec<f32>>,
        /// Winograd forward and input-gradient convolutions, where they apply.
        wino: Option<Box<Wino>>,
        wino_grad: Option<Box<Wino>>,
    },
    /// `y[c] = x[c] * scale[c] + shift[c]`, then ReLU when `relu` (a following ReLU fused in).
    Affine {
        x: usize,
        y: usize,
        scale: Vec<f32>,
        shift: Vec<f32>,
        relu: bool,
    },
    Relu {
        x: usize,
        y: usize,
    },
    Clip {
        x: usize,
        y: usize,
        lo: f32,
        hi: f32,
    },
    /// `y = a + b`, then ReLU when `relu`.
    Add {
        a: usize,
        b: usize,
        y: usize,
        relu: bool,
    },
    /// Data movement within an image (Slice, Pad, Transpose, reshapes): `y[i] = x[map[i]]`, or
    /// `fill` where `map[i] == NONE`.
    Gather {
        x: usize,
        y: usize,
        map: Vec<u32>,
        fill: f32,
    },
}

const NONE: u32 = u32::MAX;

/// Fold each ReLU into the Affine or Add that feeds it, when nothing else reads that value (and it
/// is not tapped): one pass instead of two, and the ReLU's own output serves as its mask.
fn fuse_relu(ops: Vec<TOp>, tapped: &[usize]) -> Vec<TOp> {
    let mut readers: HashMap<usize, usize> = HashMap::new();
    for op in &ops {
        for s in op.inputs() {
            *readers.entry(s).or_default() += 1;
        }
    }
    let mut out: Vec<TOp> = Vec::with_capacity(ops.len());
    for op in ops {
        if let TOp::Relu { x, y } = op {
            if readers.get(&x) == Some(&1) && !tapped.contains(&x) {
                if let Some(prev) = out.iter_mut().rev().find(|p| p.out() == x) {
                    if let TOp::Affine { relu, .. } | TOp::Add { relu, .. } = prev {
                        if !*relu {
                            *relu = true;
                            *prev.out_mut() = y;
                            continue;
                        }
                    }
                }
            }
        }
        out.push(op);
    }
    out
}

impl TOp {
    /// The slots the op reads.
    fn inputs(&self) -> Vec<usize> {
        match self {
            TOp::Conv { x, .. }
            | TOp::Affine { x, .. }
            | TOp::Relu { x, .. }
            | TOp::Clip { x, .. }
            | TOp::Gather { x, .. } => vec![*x],
            TOp::Add { a, b, .. } => vec![*a, *b],
        }
    }

    /// The slots the op reads and writes.
    fn operands(&self) -> Vec<usize> {
        let mut v = self.inputs();
        v.push(self.out());
        v
    }

    fn out(&self) -> usize {
        match self {
            TOp::Conv { y, .. }
            | TOp::Affine { y, .. }
            | TOp::Relu { y, .. }
            | TOp::Clip { y, .. }
            | TOp::Add { y, .. }
            | TOp::Gather { y, .. } => *y,
        }
    }

    fn out_mut(&mut self) -> &mut usize {
        match self {
            TOp::Conv { y, .. }
            | TOp::Affine { y, .. }
            | TOp::Relu { y, .. }
            | TOp::Clip { y, .. }
            | TOp::Add { y, .. }
            | TOp::Gather { y, .. } => y,
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
) -> Result<(Vec<u32>, f32), String> {
    let node = &plan.graph.nodes[i];
    if in_len >= 1 << 24 {
        return Err(format!(
            "{} node '{}': image too large",
            node.op.name(),
            node.name
        ));
    }
    let shape = plan.graph.values[x].shape.clone().unwrap_or_default();
    let run = |offset: f32| -> Result<Vec<f32>, String> {
        let idx: Vec<f32> = (0..n)
            .flat_map(|_| (0..in_len).map(move |k| k as f32 + offset))
            .collect();
        let t = candle_core::Tensor::from_vec(idx, shape.as_slice(), &plan.device)
            .map_err(|e| e.to_string())?;
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
        let y = super::eval(node, &plan.steps[i].kind, &ins).map_err(|e| e.to_string())?;
        y.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| e.to_string())
    };
    let (a, b) = (run(0.0)?, run(0.5)?);
    if a.len() != n * out_len {
        return Err(format!(
            "{} node '{}' mixes images",
            node.op.name(),
            node.name
        ));
    }
    let mut fill = None;
    let mut map = Vec::with_capacity(out_len);
    for k in 0..out_len {
        if b[k] != a[k] {
            map.push(a[k] as u32);
        } else {
            if fill.is_some_and(|f: f32| f != a[k]) {
                return Err(format!(
                    "{} node '{}': mixed fill values",
                    node.op.name(),
                    node.name
                ));
            }
            fill = Some(a[k]);
            map.push(NONE);
        }
    }
    // Every image must move the same way (the batch axis is untouched).
    for img in 1..n {
        if a[img * out_len..][..out_len] != a[..out_len] {
            return Err(format!(
                "{} node '{}' mixes images",
                node.op.name(),
                node.name
            ));
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
    grads: Vec<Vec<f32>>,
    /// Whether `grads[s]` holds a value in the current backward pass (else it is stale).
    live: Vec<bool>,
    /// Per tap: per-channel mean and sum of squared deviations.
    moments: Vec<(Vec<f64>, Vec<f64>)>,
}

/// A thread's share of the batch and its im2col scratch.
struct Worker {
    images: Vec<Image>,
    cols: Vec<f32>,
}

/// A graph compiled for [`Tape::forward`] / [`Tape::backward`].
pub struct Tape {
    n: usize,
    slots: Vec<Slot>,
    ops: Vec<TOp>,
    taps: Vec<usize>,
    workers: Vec<Worker>,
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
    // Right-aligned: the channel axis of the activation is axis `rank - d.len()` ... in `d`, axis
    // `d.len() - (rank - 1)`.
    let ch = d.len() + 1 - rank;
    let only_channel = d
        .iter()
        .enumerate()
        .all(|(i, &k)| if i == ch { k == c } else { k == 1 });
    only_channel.then_some(v)
}

impl Tape {
    /// Compile the part of `plan` that computes `taps` (values of the graph). `Err` names the first
    /// node the tape does not run, so the caller can fall back to the general executor.
    pub fn new(plan: &Plan, taps: &[ValueId]) -> Result<Tape, String> {
        let g = &plan.graph;
        if g.inputs.len() != 1 {
            return Err(format!("{} graph inputs", g.inputs.len()));
        }
        let input = g.inputs[0].value;
        let shape_of = |v: ValueId| -> Result<Vec<usize>, String> {
            g.values[v]
                .shape
                .clone()
                .ok_or_else(|| format!("value '{}' has no static shape", g.values[v].name))
        };
        let in_shape = shape_of(input)?;
        if in_shape.len() < 2 {
            return Err(format!("input of shape {in_shape:?}"));
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
                return Err(format!("value '{}' has no producer", g.values[v].name));
            }
        }
        let mut slot_of: HashMap<ValueId, usize> = HashMap::new();
        let mut slots: Vec<Slot> = Vec::new();
        let mut new_slot =
            |v: ValueId, slot_of: &mut HashMap<ValueId, usize>| -> Result<usize, String> {
                let d = shape_of(v)?;
                if d.len() < 2 || d[0] != n {
                    return Err(format!(
                        "value '{}' of shape {d:?} is not a batch of {n}",
                        g.values[v].name
                    ));
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
            let what = || format!("{} node '{}'", node.op.name(), node.name);
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
                    .ok_or_else(|| format!("{}: input not computed", what()))
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
                    let x = slot(node.input(0).unwrap())?;
                    let w =
                        konst(1).ok_or_else(|| format!("{}: weight is not constant", what()))?;
                    let xs = shape_of(node.input(0).unwrap())?;
                    let (c, h, wd) = match xs.len() {
                        3 => (xs[1], 1, xs[2]),
                        4 => (xs[1], xs[2], xs[3]),
                        _ => return Err(format!("{}: input {xs:?}", what())),
                    };
                    let wdims = match w.shape.len() {
                        3 => [w.shape[0], w.shape[1], 1, w.shape[2]],
                        4 => [w.shape[0], w.shape[1], w.shape[2], w.shape[3]],
                        _ => return Err(format!("{}: weight {:?}", what(), w.shape)),
                    };
                    if geom.group == 0 || c != wdims[1] * geom.group || wdims[0] % geom.group != 0 {
                        return Err(format!("{}: weight does not fit the input", what()));
                    }
                    let bias = match node.input(2) {
                        None => None,
                        Some(_) => Some(
                            konst(2)
                                .ok_or_else(|| format!("{}: bias is not constant", what()))?
                                .to_f32_vec(),
                        ),
                    };
                    let geo = Geo::new(1, c, h, wd, wdims, geom);
                    if geo.l() * geo.m != y_shape[1..].iter().product::<usize>() {
                        return Err(format!("{}: output shape {y_shape:?}", what()));
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
                    TOp::Conv {
                        x,
                        y: 0,
                        geo,
                        w,
                        bias,
                        wino,
                        wino_grad,
                    }
                }
                (Op::BatchNorm { epsilon }, _) => {
                    let x = slot(node.input(0).unwrap())?;
                    let p = |k: usize| {
                        konst(k)
                            .map(|t| t.to_f32_vec())
                            .ok_or_else(|| format!("{}: parameters are not constant", what()))
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
                        y: 0,
                        scale,
                        shift,
                        relu: false,
                    }
                }
                (Op::Relu, _) => TOp::Relu {
                    x: slot(node.input(0).unwrap())?,
                    y: 0,
                },
                (Op::Clip, Kind::Clip(lo, hi)) => TOp::Clip {
                    x: slot(node.input(0).unwrap())?,
                    y: 0,
                    lo: *lo,
                    hi: *hi,
                },
                (Op::Add, _) if dynamic.len() == 2 => {
                    let (a, b) = (dynamic[0], dynamic[1]);
                    if shape_of(a)? != y_shape || shape_of(b)? != y_shape {
                        return Err(format!("{}: broadcasting sum", what()));
                    }
                    TOp::Add {
                        a: slot(a)?,
                        b: slot(b)?,
                        y: 0,
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
                        .ok_or_else(|| format!("{}: no constant operand", what()))?;
                    if shape_of(xv)? != y_shape {
                        return Err(format!("{}: broadcasting", what()));
                    }
                    let c = y_shape[1];
                    let v = per_channel(cv, c, y_shape.len())
                        .ok_or_else(|| format!("{}: constant is not per channel", what()))?;
                    let ones = vec![1f32; c];
                    let zeros = vec![0f32; c];
                    let (scale, shift) = match (&node.op, on_right) {
                        (Op::Add, _) => (ones, v),
                        (Op::Mul, _) => (v, zeros),
                        (Op::Sub, true) => (ones, v.iter().map(|k| -k).collect()),
                        (Op::Sub, false) => (vec![-1f32; c], v),
                        (Op::Div, true) => (v.iter().map(|k| 1.0 / k).collect(), zeros),
                        _ => return Err(format!("{}: constant divided by a tensor", what())),
                    };
                    TOp::Affine {
                        x: slot(xv)?,
                        y: 0,
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
                    TOp::Gather {
                        x: slot(xv)?,
                        y: 0,
                        map,
                        fill,
                    }
                }
                _ => return Err(format!("{} is not supported", what())),
            };
            let y = new_slot(y_val, &mut slot_of)?;
            let mut op = op;
            *op.out_mut() = y;
            ops.push(op);
        }
        // Shapes of every op's operands agree with its slots.
        for op in &ops {
            let ok = match op {
                TOp::Conv { x, y, geo, .. } => {
                    slots[*x].c * slots[*x].hw == geo.c * geo.h * geo.w
                        && slots[*y].c * slots[*y].hw == geo.m * geo.l()
                }
                TOp::Affine { x, y, scale, .. } => {
                    scale.len() == slots[*x].c && slots[*x].c == slots[*y].c
                }
                TOp::Relu { x, y } | TOp::Clip { x, y, .. } => {
                    slots[*x].c * slots[*x].hw == slots[*y].c * slots[*y].hw
                }
                TOp::Add { a, b, y, .. } => {
                    let len = |s: usize| slots[s].c * slots[s].hw;
                    len(*a) == len(*y) && len(*b) == len(*y)
                }
                TOp::Gather { x, y, map, .. } => {
                    let lx = slots[*x].c * slots[*x].hw;
                    map.len() == slots[*y].c * slots[*y].hw
                        && map.iter().all(|&k| k == NONE || (k as usize) < lx)
                }
            };
            if !ok {
                return Err("operand shapes disagree".into());
            }
        }
        let tapped: Vec<usize> = taps
            .iter()
            .filter_map(|v| slot_of.get(v).copied())
            .collect();
        let ops = fuse_relu(ops, &tapped);
        let tap_slots = taps
            .iter()
            .map(|v| {
                slot_of
                    .get(v)
                    .copied()
                    .ok_or_else(|| format!("tap '{}' is not computed", g.values[*v].name))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let cols = ops
            .iter()
            .map(|op| match op {
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
        for op in &ops {
            for s in op.operands() {
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
                            grads: (0..slots.len()).map(buf).collect(),
                            live: vec![false; slots.len()],
                            moments: tap_slots
                                .iter()
                                .map(|&s| (vec![0.0; slots[s].c], vec![0.0; slots[s].c]))
                                .collect(),
                        })
                        .collect(),
                    cols: vec![0f32; cols],
                }
            })
            .filter(|w| !w.images.is_empty())
            .collect();
        Ok(Tape {
            n,
            slots,
            ops,
            taps: tap_slots,
            workers,
        })
    }

    /// Run the batch `x` (`[N, ...]` flattened) and return the moments of every tap.
    pub fn forward(&mut self, x: &[f32]) -> Vec<Moments> {
        let len0 = self.slots[0].c * self.slots[0].hw;
        assert_eq!(x.len(), self.n * len0, "tape input of the wrong size");
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
            for (k, img) in w.images.iter_mut().enumerate() {
                img.vals[0].copy_from_slice(&x[(f + k) * len0..][..len0]);
                vectorize(Forward {
                    ops,
                    slots,
                    taps,
                    img,
                    cols: &mut w.cols,
                });
            }
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
                Moments {
                    n: self.n,
                    c: slots[s].c,
                    hw: slots[s].hw,
                    mean,
                    m2,
                }
            })
            .collect()
    }

    /// After [`Tape::forward`]: the gradient at the input, given the loss gradient at every tap.
    pub fn backward(&mut self, coeffs: &[Coeffs]) -> Vec<f32> {
        assert_eq!(coeffs.len(), self.taps.len(), "one gradient per tap");
        let len0 = self.slots[0].c * self.slots[0].hw;
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
            for (k, (img, o)) in w.images.iter_mut().zip(outs).enumerate() {
                vectorize(Backward {
                    ops,
                    slots,
                    taps,
                    coeffs,
                    b: f + k,
                    img,
                    out: o,
                    cols: &mut w.cols,
                });
            }
        });
        out
    }
}

/// The forward pass of one image and the moments of its taps.
struct Forward<'a> {
    ops: &'a [TOp],
    slots: &'a [Slot],
    taps: &'a [usize],
    img: &'a mut Image,
    cols: &'a mut [f32],
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
        } = self;
        forward_image(ops, img, cols);
        for (t, &s) in taps.iter().enumerate() {
            let hw = slots[s].hw;
            let (mean, m2) = &mut img.moments[t];
            for (c, p) in img.vals[s].chunks_exact(hw.max(1)).enumerate() {
                (mean[c], m2[c]) = zq_synth::engine::plane_moments(&p[..hw]);
            }
        }
    }
}

/// The backward pass of image `b`: loss gradients at the taps, then every op in reverse.
struct Backward<'a> {
    ops: &'a [TOp],
    slots: &'a [Slot],
    taps: &'a [usize],
    coeffs: &'a [Coeffs],
    b: usize,
    img: &'a mut Image,
    out: &'a mut [f32],
    cols: &'a mut [f32],
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
            out: o,
            cols,
        } = self;
        {
            {
                img.live.fill(false);
                for (t, &s) in taps.iter().enumerate() {
                    let (c, hw) = (slots[s].c, slots[s].hw);
                    let base = b * c;
                    let (a, b) = (&coeffs[t].a[base..][..c], &coeffs[t].b[base..][..c]);
                    let mean = &img.moments[t].0;
                    let live = img.live[s];
                    let (vals, grads) = (&img.vals[s], &mut img.grads[s]);
                    for ch in 0..c {
                        let (a, b, m) = (a[ch], b[ch], mean[ch] as f32);
                        let xs = &vals[ch * hw..][..hw];
                        let gs = &mut grads[ch * hw..][..hw];
                        if live {
                            for (g, &v) in gs.iter_mut().zip(xs) {
                                *g += a + b * (v - m);
                            }
                        } else {
                            for (g, &v) in gs.iter_mut().zip(xs) {
                                *g = a + b * (v - m);
                            }
                        }
                    }
                    img.live[s] = true;
                }
                backward_image(ops, slots, img, cols);
                if img.live[0] {
                    o.copy_from_slice(&img.grads[0]);
                } else {
                    o.fill(0.0);
                }
            }
        }
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

#[inline(always)]
fn forward_image(ops: &[TOp], img: &mut Image, cols: &mut [f32]) {
    for op in ops {
        match op {
            TOp::Conv {
                x,
                y,
                geo,
                w,
                bias,
                wino,
                ..
            } => {
                let mut out = std::mem::take(&mut img.vals[*y]);
                let xin = &img.vals[*x];
                let (mg, kg, l) = (geo.mg(), geo.kg(), geo.l());
                if let Some(f) = wino {
                    f.run(xin, &mut out, false, cols);
                }
                for grp in 0..geo.groups {
                    if wino.is_some() {
                        break;
                    }
                    let rhs = if geo.pointwise() {
                        MatRef::rows(&xin[grp * kg * l..][..kg * l], kg, l)
                    } else {
                        im2col(xin, geo, grp, &mut cols[..kg * l]);
                        MatRef::rows(&cols[..kg * l], kg, l)
                    };
                    sgemm(
                        MatMut::rows(&mut out[grp * mg * l..][..mg * l], mg, l),
                        MatRef::rows(&w[grp * mg * kg..][..mg * kg], mg, kg),
                        rhs,
                        false,
                        1,
                    );
                }
                if let Some(b) = bias {
                    for (plane, &bv) in out.chunks_exact_mut(l.max(1)).zip(b) {
                        plane.iter_mut().for_each(|v| *v += bv);
                    }
                }
                img.vals[*y] = out;
            }
            TOp::Affine {
                x,
                y,
                scale,
                shift,
                relu,
            } => {
                let mut out = std::mem::take(&mut img.vals[*y]);
                let hw = out.len() / scale.len().max(1);
                for (c, (o, i)) in out
                    .chunks_exact_mut(hw.max(1))
                    .zip(img.vals[*x].chunks_exact(hw.max(1)))
                    .enumerate()
                {
                    let (s, t) = (scale[c], shift[c]);
                    if *relu {
                        for (o, &v) in o.iter_mut().zip(i) {
                            *o = (v * s + t).max(0.0);
                        }
                    } else {
                        for (o, &v) in o.iter_mut().zip(i) {
                            *o = v * s + t;
                        }
                    }
                }
                img.vals[*y] = out;
            }
            TOp::Relu { x, y } => {
                let mut out = std::mem::take(&mut img.vals[*y]);
                for (o, &v) in out.iter_mut().zip(&img.vals[*x]) {
                    *o = v.max(0.0);
                }
                img.vals[*y] = out;
            }
            TOp::Clip { x, y, lo, hi } => {
                let mut out = std::mem::take(&mut img.vals[*y]);
                for (o, &v) in out.iter_mut().zip(&img.vals[*x]) {
                    *o = v.clamp(*lo, *hi);
                }
                img.vals[*y] = out;
            }
            TOp::Add { a, b, y, relu } => {
                let mut out = std::mem::take(&mut img.vals[*y]);
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
                img.vals[*y] = out;
            }
            TOp::Gather { x, y, map, fill } => {
                let mut out = std::mem::take(&mut img.vals[*y]);
                let xin = &img.vals[*x];
                for (o, &k) in out.iter_mut().zip(map) {
                    *o = if k == NONE { *fill } else { xin[k as usize] };
                }
                img.vals[*y] = out;
            }
        }
    }
}

#[inline(always)]
fn backward_image(ops: &[TOp], slots: &[Slot], img: &mut Image, cols: &mut [f32]) {
    for op in ops.iter().rev() {
        let y = match op {
            TOp::Conv { y, .. }
            | TOp::Affine { y, .. }
            | TOp::Relu { y, .. }
            | TOp::Clip { y, .. }
            | TOp::Add { y, .. }
            | TOp::Gather { y, .. } => *y,
        };
        if !img.live[y] {
            continue; // nothing downstream reaches a tap through this value
        }
        let gy = std::mem::take(&mut img.grads[y]);
        match op {
            TOp::Conv {
                x,
                geo,
                w,
                wino_grad: Some(f),
                ..
            } => {
                let _ = (geo, w);
                let live = img.live[*x];
                f.run(&gy, &mut img.grads[*x], live, cols);
                img.live[*x] = true;
            }
            TOp::Conv { x, geo, w, .. } => {
                let (mg, kg, l) = (geo.mg(), geo.kg(), geo.l());
                let live = img.live[*x];
                let gx = &mut img.grads[*x];
                if !geo.pointwise() && !live {
                    gx.fill(0.0);
                }
                for grp in 0..geo.groups {
                    let wt = MatRef::transposed(&w[grp * mg * kg..][..mg * kg], mg, kg);
                    let rhs = MatRef::rows(&gy[grp * mg * l..][..mg * l], mg, l);
                    if geo.pointwise() {
                        let dst = &mut gx[grp * kg * l..][..kg * l];
                        sgemm(MatMut::rows(dst, kg, l), wt, rhs, live, 1);
                    } else {
                        let dc = &mut cols[..kg * l];
                        sgemm(MatMut::rows(dc, kg, l), wt, rhs, false, 1);
                        col2im(dc, geo, grp, gx);
                    }
                }
                img.live[*x] = true;
            }
            TOp::Affine {
                x,
                y: yo,
                scale,
                relu,
                ..
            } => {
                let live = img.live[*x];
                let hw = slots[*x].hw.max(1);
                let (gx, yv) = (&mut img.grads[*x], &img.vals[*yo]);
                for (c, ((d, g), yy)) in gx
                    .chunks_exact_mut(hw)
                    .zip(gy.chunks_exact(hw))
                    .zip(yv.chunks_exact(hw))
                    .enumerate()
                {
                    let s = scale[c];
                    if *relu {
                        let src = g
                            .iter()
                            .zip(yy)
                            .map(|(&g, &v)| if v > 0.0 { g * s } else { 0.0 });
                        put(d, src, live);
                    } else {
                        put(d, g.iter().map(|g| g * s), live);
                    }
                }
                img.live[*x] = true;
            }
            TOp::Relu { x, .. } => {
                let live = img.live[*x];
                let (vals, grads) = (&img.vals[*x], &mut img.grads[*x]);
                let src = gy
                    .iter()
                    .zip(vals)
                    .map(|(&g, &v)| if v > 0.0 { g } else { 0.0 });
                put(grads, src, live);
                img.live[*x] = true;
            }
            TOp::Clip { x, lo, hi, .. } => {
                let live = img.live[*x];
                let (vals, grads) = (&img.vals[*x], &mut img.grads[*x]);
                let src = gy
                    .iter()
                    .zip(vals)
                    .map(|(&g, &v)| if v >= *lo && v <= *hi { g } else { 0.0 });
                put(grads, src, live);
                img.live[*x] = true;
            }
            TOp::Add { a, b, y: yo, relu } => {
                let mut gy = gy;
                if *relu {
                    for (g, &v) in gy.iter_mut().zip(&img.vals[*yo]) {
                        if v <= 0.0 {
                            *g = 0.0;
                        }
                    }
                }
                for s in [*a, *b] {
                    let live = img.live[s];
                    put(&mut img.grads[s], gy.iter().copied(), live);
                    img.live[s] = true;
                }
                img.grads[y] = gy;
                continue;
            }
            TOp::Gather { x, map, .. } => {
                let gx = &mut img.grads[*x];
                if !img.live[*x] {
                    gx.fill(0.0);
                }
                for (&g, &k) in gy.iter().zip(map) {
                    if k != NONE {
                        gx[k as usize] += g;
                    }
                }
                img.live[*x] = true;
            }
        }
        img.grads[y] = gy;
    }
}
