//! Shape inference and host evaluation of shape arithmetic, for concrete shapes.
//!
//! The parameter resolvers here (`conv_geometry`, `slice_spec`, `reshape_target`, ...) are the one
//! place ONNX's index rules are written down; the executors lower ops through them too.

use super::tensor::{broadcast_index, broadcast_shapes, strides, DType, Data, Tensor};
use super::{AutoPad, Graph, Node, Op, PadMode};

pub type R<T> = Result<T, String>;

/// Normalise a possibly negative axis against a rank.
pub fn norm_axis(axis: i64, rank: usize) -> R<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r {
        return Err(format!("axis {axis} is out of range for rank {rank}"));
    }
    Ok(a as usize)
}

/// Spatial geometry of a sliding-window op along each spatial axis.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub kernel: Vec<usize>,
    pub strides: Vec<usize>,
    pub dilations: Vec<usize>,
    pub pad_begin: Vec<usize>,
    pub pad_end: Vec<usize>,
    pub out: Vec<usize>,
}

/// Resolve pads (incl. auto_pad) and output sizes. `ceil_mode` follows ONNX Runtime / PyTorch: the
/// last window must start inside the input or the leading padding.
pub fn conv_geometry(
    input: &[usize],
    kernel: &[usize],
    strides: &[usize],
    dilations: &[usize],
    pads: &[usize],
    auto_pad: AutoPad,
    ceil_mode: bool,
) -> R<Window> {
    let n = input.len();
    if kernel.len() != n {
        return Err(format!(
            "kernel has {} spatial dims but the input has {n}",
            kernel.len()
        ));
    }
    let pick = |v: &[usize], what: &str| -> R<Vec<usize>> {
        if v.is_empty() {
            Ok(vec![1; n])
        } else if v.len() == n {
            if v.contains(&0) {
                Err(format!("{what} must be positive, got {v:?}"))
            } else {
                Ok(v.to_vec())
            }
        } else {
            Err(format!("{what} has {} values, expected {n}", v.len()))
        }
    };
    let strides = pick(strides, "strides")?;
    let dilations = pick(dilations, "dilations")?;
    let mut pb = vec![0; n];
    let mut pe = vec![0; n];
    match auto_pad {
        AutoPad::NotSet => {
            if !pads.is_empty() {
                if pads.len() != 2 * n {
                    return Err(format!(
                        "pads has {} values, expected {}",
                        pads.len(),
                        2 * n
                    ));
                }
                pb.copy_from_slice(&pads[..n]);
                pe.copy_from_slice(&pads[n..]);
            }
        }
        AutoPad::Valid => {}
        AutoPad::SameUpper | AutoPad::SameLower => {
            for i in 0..n {
                let eff = (kernel[i] - 1) * dilations[i] + 1;
                let out = input[i].div_ceil(strides[i]);
                let total = ((out - 1) * strides[i] + eff).saturating_sub(input[i]);
                let small = total / 2;
                if auto_pad == AutoPad::SameUpper {
                    pb[i] = small;
                    pe[i] = total - small;
                } else {
                    pb[i] = total - small;
                    pe[i] = small;
                }
            }
        }
    }
    let mut out = vec![0; n];
    for i in 0..n {
        if kernel[i] == 0 {
            return Err("kernel size 0".into());
        }
        let eff = (kernel[i] - 1) * dilations[i] + 1;
        let padded = input[i] + pb[i] + pe[i];
        if padded < eff {
            return Err(format!(
                "kernel extent {eff} is larger than the padded input {padded} on spatial axis {i}"
            ));
        }
        let span = padded - eff;
        let mut o = if ceil_mode {
            span.div_ceil(strides[i]) + 1
        } else {
            span / strides[i] + 1
        };
        if ceil_mode && (o - 1) * strides[i] >= input[i] + pb[i] {
            o -= 1;
        }
        out[i] = o;
    }
    Ok(Window {
        kernel: kernel.to_vec(),
        strides,
        dilations,
        pad_begin: pb,
        pad_end: pe,
        out,
    })
}

/// One sliced axis: element `i` of the output is element `start + i*step` of the input.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceAxis {
    pub axis: usize,
    pub start: i64,
    pub step: i64,
    pub len: usize,
}

impl SliceAxis {
    pub fn indices(&self) -> Vec<usize> {
        (0..self.len as i64)
            .map(|i| (self.start + i * self.step) as usize)
            .collect()
    }
}

/// ONNX Slice semantics (clamping, negative indices and steps).
pub fn slice_spec(
    shape: &[usize],
    starts: &[i64],
    ends: &[i64],
    axes: Option<&[i64]>,
    steps: Option<&[i64]>,
) -> R<Vec<SliceAxis>> {
    if starts.len() != ends.len() {
        return Err(format!(
            "starts has {} values but ends has {}",
            starts.len(),
            ends.len()
        ));
    }
    let rank = shape.len();
    let axes: Vec<usize> = match axes {
        Some(a) => {
            if a.len() != starts.len() {
                return Err("axes and starts differ in length".into());
            }
            a.iter().map(|&x| norm_axis(x, rank)).collect::<R<_>>()?
        }
        None => (0..starts.len()).collect(),
    };
    let mut seen = vec![false; rank];
    let mut out = Vec::new();
    for (k, &axis) in axes.iter().enumerate() {
        if axis >= rank {
            return Err(format!("slice axis {axis} out of range for rank {rank}"));
        }
        if std::mem::replace(&mut seen[axis], true) {
            return Err(format!("slice axis {axis} repeated"));
        }
        let dim = shape[axis] as i64;
        let step = steps.map(|s| s.get(k).copied().unwrap_or(1)).unwrap_or(1);
        if step == 0 {
            return Err("slice step 0".into());
        }
        let fix = |v: i64| if v < 0 { v.saturating_add(dim) } else { v };
        let (mut s, mut e) = (fix(starts[k]), fix(ends[k]));
        if step > 0 {
            s = s.clamp(0, dim);
            e = e.clamp(0, dim);
        } else {
            s = s.clamp(0, (dim - 1).max(0));
            e = e.clamp(-1, dim - 1);
        }
        let len = if step > 0 {
            if e > s {
                (e - s + step - 1) / step
            } else {
                0
            }
        } else if s > e {
            (s - e + (-step) - 1) / (-step)
        } else {
            0
        };
        out.push(SliceAxis {
            axis,
            start: s,
            step,
            len: len as usize,
        });
    }
    Ok(out)
}

/// Resolve a Reshape target (0 = copy, -1 = infer).
pub fn reshape_target(shape: &[usize], target: &[i64], allowzero: bool) -> R<Vec<usize>> {
    let total: usize = shape.iter().product();
    let mut out = Vec::with_capacity(target.len());
    let mut hole = None;
    for (i, &t) in target.iter().enumerate() {
        match t {
            -1 => {
                if hole.replace(i).is_some() {
                    return Err("reshape target has more than one -1".into());
                }
                out.push(1);
            }
            0 if !allowzero => {
                out.push(*shape.get(i).ok_or_else(|| {
                    format!(
                        "reshape target {target:?} copies dim {i} of a rank-{} input",
                        shape.len()
                    )
                })?);
            }
            t if t < 0 => return Err(format!("reshape target has negative dim {t}")),
            t => out.push(t as usize),
        }
    }
    let known: usize = out.iter().product();
    if let Some(h) = hole {
        if known == 0 || !total.is_multiple_of(known) {
            return Err(format!("cannot reshape {shape:?} to {target:?}"));
        }
        out[h] = total / known;
    } else if known != total {
        return Err(format!(
            "cannot reshape {shape:?} ({total} elements) to {out:?}"
        ));
    }
    Ok(out)
}

/// Resolved Pad: begin/end per axis of the input rank.
pub fn pad_spec(rank: usize, pads: &[i64], axes: Option<&[i64]>) -> R<(Vec<usize>, Vec<usize>)> {
    let axes: Vec<usize> = match axes {
        Some(a) => a.iter().map(|&x| norm_axis(x, rank)).collect::<R<_>>()?,
        None => (0..rank).collect(),
    };
    if pads.len() != 2 * axes.len() {
        return Err(format!(
            "pads has {} values, expected {}",
            pads.len(),
            2 * axes.len()
        ));
    }
    let mut b = vec![0; rank];
    let mut e = vec![0; rank];
    for (k, &a) in axes.iter().enumerate() {
        let (pb, pe) = (pads[k], pads[k + axes.len()]);
        if pb < 0 || pe < 0 {
            return Err(format!(
                "negative pads {pads:?} (cropping) are not supported"
            ));
        }
        b[a] = pb as usize;
        e[a] = pe as usize;
    }
    Ok((b, e))
}

/// Source index of a padded coordinate for reflect/edge modes.
pub fn pad_source(i: i64, n: usize, mode: PadMode) -> usize {
    let n = n as i64;
    match mode {
        PadMode::Edge | PadMode::Constant => i.clamp(0, n - 1) as usize,
        PadMode::Reflect => {
            if n == 1 {
                return 0;
            }
            let period = 2 * (n - 1);
            let mut j = i.rem_euclid(period);
            if j >= n {
                j = period - j;
            }
            j as usize
        }
    }
}

/// Axes for Squeeze (None = all size-1 dims).
pub fn squeeze_axes(shape: &[usize], axes: Option<&[i64]>) -> R<Vec<usize>> {
    match axes {
        None => Ok((0..shape.len()).filter(|&i| shape[i] == 1).collect()),
        Some(a) => {
            let mut v = a
                .iter()
                .map(|&x| norm_axis(x, shape.len()))
                .collect::<R<Vec<_>>>()?;
            v.sort_unstable();
            v.dedup();
            for &i in &v {
                if shape[i] != 1 {
                    return Err(format!("cannot squeeze axis {i} of size {}", shape[i]));
                }
            }
            Ok(v)
        }
    }
}

pub fn squeezed(shape: &[usize], axes: &[usize]) -> Vec<usize> {
    shape
        .iter()
        .enumerate()
        .filter(|(i, _)| !axes.contains(i))
        .map(|(_, &d)| d)
        .collect()
}

pub fn unsqueezed(shape: &[usize], axes: &[i64]) -> R<Vec<usize>> {
    let r = shape.len() + axes.len();
    let mut ax = axes
        .iter()
        .map(|&a| norm_axis(a, r))
        .collect::<R<Vec<_>>>()?;
    ax.sort_unstable();
    let n = ax.len();
    ax.dedup();
    if ax.len() != n {
        return Err("unsqueeze axes repeated".into());
    }
    let mut out = Vec::with_capacity(r);
    let mut src = shape.iter();
    for i in 0..r {
        if ax.contains(&i) {
            out.push(1);
        } else {
            out.push(*src.next().unwrap());
        }
    }
    Ok(out)
}

pub fn transpose_perm(rank: usize, perm: Option<&[usize]>) -> R<Vec<usize>> {
    match perm {
        None => Ok((0..rank).rev().collect()),
        Some(p) => {
            let mut s = p.to_vec();
            s.sort_unstable();
            if s != (0..rank).collect::<Vec<_>>() {
                return Err(format!("perm {p:?} is not a permutation of rank {rank}"));
            }
            Ok(p.to_vec())
        }
    }
}

/// Output shape of numpy-style MatMul.
pub fn matmul_shape(a: &[usize], b: &[usize]) -> R<Vec<usize>> {
    if a.is_empty() || b.is_empty() {
        return Err("MatMul of a scalar".into());
    }
    let a2 = if a.len() == 1 {
        vec![1, a[0]]
    } else {
        a.to_vec()
    };
    let b2 = if b.len() == 1 {
        vec![b[0], 1]
    } else {
        b.to_vec()
    };
    let (m, k) = (a2[a2.len() - 2], a2[a2.len() - 1]);
    let (k2, n) = (b2[b2.len() - 2], b2[b2.len() - 1]);
    if k != k2 {
        return Err(format!("MatMul inner dims differ: {a:?} x {b:?}"));
    }
    let batch = broadcast_shapes(&a2[..a2.len() - 2], &b2[..b2.len() - 2])
        .ok_or_else(|| format!("MatMul batch dims do not broadcast: {a:?} x {b:?}"))?;
    let mut out = batch;
    if a.len() > 1 {
        out.push(m);
    }
    if b.len() > 1 {
        out.push(n);
    }
    Ok(out)
}

fn need<'a>(g: &'a Graph, n: &Node, i: usize) -> R<&'a [usize]> {
    let v = n.input(i).ok_or_else(|| format!("missing input {i}"))?;
    g.values[v]
        .shape
        .as_deref()
        .ok_or_else(|| format!("shape of input '{}' unknown", g.values[v].name))
}

fn konst<'a>(g: &'a Graph, n: &Node, i: usize, what: &str) -> R<Option<&'a Tensor>> {
    match n.input(i) {
        None => Ok(None),
        Some(v) => match g.values[v].konst.as_deref() {
            Some(t) => Ok(Some(t)),
            None => Err(format!(
                "input '{}' ({what}) must be a constant for a fixed batch size, but is computed at run time",
                g.values[v].name
            )),
        },
    }
}

fn konst_i64(g: &Graph, n: &Node, i: usize, what: &str) -> R<Option<Vec<i64>>> {
    Ok(konst(g, n, i, what)?.map(|t| t.to_i64_vec()))
}

/// Per-op resolved static parameters that both shape inference and executors need.
pub fn slice_of(g: &Graph, n: &Node) -> R<Vec<SliceAxis>> {
    let x = need(g, n, 0)?;
    let starts = konst_i64(g, n, 1, "starts")?.ok_or("Slice needs starts")?;
    let ends = konst_i64(g, n, 2, "ends")?.ok_or("Slice needs ends")?;
    let axes = konst_i64(g, n, 3, "axes")?;
    let steps = konst_i64(g, n, 4, "steps")?;
    slice_spec(x, &starts, &ends, axes.as_deref(), steps.as_deref())
}

pub fn pad_of(g: &Graph, n: &Node) -> R<(Vec<usize>, Vec<usize>, f32)> {
    let x = need(g, n, 0)?;
    let pads = konst_i64(g, n, 1, "pads")?.ok_or("Pad needs pads")?;
    let value = konst(g, n, 2, "constant_value")?
        .map(|t| t.to_f32_vec())
        .unwrap_or_default();
    let axes = konst_i64(g, n, 3, "axes")?;
    let (b, e) = pad_spec(x.len(), &pads, axes.as_deref())?;
    Ok((b, e, value.first().copied().unwrap_or(0.0)))
}

pub fn squeeze_of(g: &Graph, n: &Node) -> R<Vec<usize>> {
    let x = need(g, n, 0)?;
    let axes = konst_i64(g, n, 1, "axes")?;
    squeeze_axes(x, axes.as_deref())
}

pub fn unsqueeze_of(g: &Graph, n: &Node) -> R<Vec<usize>> {
    let x = need(g, n, 0)?;
    let axes = konst_i64(g, n, 1, "axes")?.ok_or("Unsqueeze needs axes")?;
    unsqueezed(x, &axes)
}

pub fn reshape_of(g: &Graph, n: &Node, allowzero: bool) -> R<Vec<usize>> {
    let x = need(g, n, 0)?;
    let t = konst_i64(g, n, 1, "shape")?.ok_or("Reshape needs a shape")?;
    reshape_target(x, &t, allowzero)
}

pub fn clip_of(g: &Graph, n: &Node) -> R<(f32, f32)> {
    let lo = konst(g, n, 1, "min")?.map(|t| t.to_f32_vec());
    let hi = konst(g, n, 2, "max")?.map(|t| t.to_f32_vec());
    let lo = lo
        .and_then(|v| v.first().copied())
        .unwrap_or(f32::NEG_INFINITY);
    let hi = hi.and_then(|v| v.first().copied()).unwrap_or(f32::INFINITY);
    Ok((lo, hi))
}

pub fn window_of(g: &Graph, n: &Node) -> R<Window> {
    let x = need(g, n, 0)?;
    if x.len() < 3 {
        return Err(format!(
            "expected an N x C x spatial input, got shape {x:?}"
        ));
    }
    match &n.op {
        Op::Conv(a) => {
            let w = need(g, n, 1)?;
            let k = a.kernel_shape.clone().unwrap_or_else(|| w[2..].to_vec());
            conv_geometry(
                &x[2..],
                &k,
                &a.strides,
                &a.dilations,
                &a.pads,
                a.auto_pad,
                false,
            )
        }
        Op::MaxPool(a) | Op::AveragePool(a) => conv_geometry(
            &x[2..],
            &a.kernel_shape,
            &a.strides,
            &a.dilations,
            &a.pads,
            a.auto_pad,
            a.ceil_mode,
        ),
        _ => Err("not a windowed op".into()),
    }
}

/// Infer output shapes of a node from its input shapes (and constant inputs where the op needs them).
pub fn infer(g: &Graph, n: &Node) -> R<Vec<Vec<usize>>> {
    let x = || need(g, n, 0);
    let one = |s: Vec<usize>| Ok(vec![s]);
    match &n.op {
        Op::Relu
        | Op::Clip
        | Op::LeakyRelu { .. }
        | Op::Sigmoid
        | Op::HardSigmoid { .. }
        | Op::HardSwish
        | Op::Tanh
        | Op::Erf
        | Op::Identity
        | Op::QuantizeLinear { .. }
        | Op::DequantizeLinear { .. }
        | Op::Cast { .. } => one(x()?.to_vec()),
        Op::Dropout => {
            // zq runs inference: a training_mode input must be a constant false.
            if let Some(t) = konst(g, n, 2, "training_mode")? {
                if t.to_i64_vec().iter().any(|&v| v != 0) {
                    return Err(
                        "training_mode=true is not supported (export the model in eval mode)"
                            .into(),
                    );
                }
            }
            let s = x()?.to_vec();
            Ok(vec![s.clone(); n.outputs.len().max(1)])
        }
        Op::Softmax { axis, .. } => {
            let s = x()?;
            norm_axis(*axis, s.len())?;
            one(s.to_vec())
        }
        Op::PRelu => {
            let s = x()?;
            let sl = need(g, n, 1)?;
            let b = broadcast_shapes(s, sl)
                .ok_or_else(|| format!("slope {sl:?} does not broadcast to {s:?}"))?;
            if b != s {
                return Err(format!("slope {sl:?} does not broadcast to {s:?}"));
            }
            one(b)
        }
        Op::Add | Op::Sub | Op::Mul | Op::Div => {
            let (a, b) = (need(g, n, 0)?, need(g, n, 1)?);
            one(broadcast_shapes(a, b)
                .ok_or_else(|| format!("cannot broadcast {a:?} with {b:?}"))?)
        }
        Op::BatchNorm { .. } => {
            let s = x()?;
            if s.len() < 2 {
                return Err(format!("input of rank {} has no channel axis", s.len()));
            }
            for i in 1..5 {
                let p = need(g, n, i)?;
                if p != [s[1]] {
                    return Err(format!(
                        "parameter {i} has shape {p:?}, expected [{}]",
                        s[1]
                    ));
                }
            }
            one(s.to_vec())
        }
        Op::Conv(a) => {
            let s = x()?;
            let w = need(g, n, 1)?;
            if w.len() != s.len() {
                return Err(format!(
                    "weight rank {} differs from input rank {}",
                    w.len(),
                    s.len()
                ));
            }
            let group = a.group.max(1);
            if s[1] != w[1] * group || w[0] % group != 0 {
                return Err(format!(
                    "input has {} channels but weight {w:?} with group {group} expects {}",
                    s[1],
                    w[1] * group
                ));
            }
            if let Some(b) = n.input(2) {
                let bs = g.values[b].shape.as_deref().unwrap_or(&[]);
                if bs != [w[0]] {
                    return Err(format!("bias has shape {bs:?}, expected [{}]", w[0]));
                }
            }
            let win = window_of(g, n)?;
            let mut out = vec![s[0], w[0]];
            out.extend(win.out);
            one(out)
        }
        Op::MaxPool(_) | Op::AveragePool(_) => {
            let s = x()?;
            let win = window_of(g, n)?;
            let mut out = vec![s[0], s[1]];
            out.extend(win.out);
            Ok(vec![out; n.outputs.len().max(1)])
        }
        Op::GlobalAveragePool | Op::GlobalMaxPool => {
            let s = x()?;
            if s.len() < 3 {
                return Err(format!(
                    "expected an N x C x spatial input, got shape {s:?}"
                ));
            }
            let mut out = s[..2].to_vec();
            out.extend(std::iter::repeat_n(1, s.len() - 2));
            one(out)
        }
        Op::Flatten { axis } => {
            let s = x()?;
            let r = s.len() as i64;
            let a = if *axis < 0 { axis + r } else { *axis };
            if a < 0 || a > r {
                return Err(format!("Flatten axis {axis} out of range for rank {r}"));
            }
            let a = a as usize;
            one(vec![s[..a].iter().product(), s[a..].iter().product()])
        }
        Op::Reshape { allowzero } => one(reshape_of(g, n, *allowzero)?),
        Op::Gemm {
            trans_a, trans_b, ..
        } => {
            let (a, b) = (need(g, n, 0)?, need(g, n, 1)?);
            if a.len() != 2 || b.len() != 2 {
                return Err(format!("Gemm needs 2-D inputs, got {a:?} and {b:?}"));
            }
            let (m, k) = if *trans_a { (a[1], a[0]) } else { (a[0], a[1]) };
            let (k2, nn) = if *trans_b { (b[1], b[0]) } else { (b[0], b[1]) };
            if k != k2 {
                return Err(format!("Gemm inner dims differ: {a:?} x {b:?}"));
            }
            if let Some(c) = n.input(2) {
                let cs = g.values[c].shape.as_deref().unwrap_or(&[]);
                if broadcast_shapes(cs, &[m, nn]).as_deref() != Some(&[m, nn][..]) {
                    return Err(format!("Gemm C {cs:?} does not broadcast to [{m}, {nn}]"));
                }
            }
            one(vec![m, nn])
        }
        Op::MatMul => one(matmul_shape(need(g, n, 0)?, need(g, n, 1)?)?),
        Op::Concat { axis } => {
            let first = x()?;
            let a = norm_axis(*axis, first.len())?;
            let mut out = first.to_vec();
            for i in 1..n.inputs.len() {
                let s = need(g, n, i)?;
                if s.len() != first.len()
                    || s.iter()
                        .zip(first)
                        .enumerate()
                        .any(|(d, (p, q))| d != a && p != q)
                {
                    return Err(format!(
                        "cannot concatenate {first:?} with {s:?} on axis {a}"
                    ));
                }
                out[a] += s[a];
            }
            one(out)
        }
        Op::Pad { .. } => {
            let s = x()?;
            let (b, e, _) = pad_of(g, n)?;
            one(s.iter().enumerate().map(|(i, d)| d + b[i] + e[i]).collect())
        }
        Op::Slice => {
            let mut s = x()?.to_vec();
            for ax in slice_of(g, n)? {
                s[ax.axis] = ax.len;
            }
            one(s)
        }
        Op::Transpose { perm } => {
            let s = x()?;
            let p = transpose_perm(s.len(), perm.as_deref())?;
            one(p.iter().map(|&i| s[i]).collect())
        }
        Op::Squeeze => {
            let s = x()?;
            one(squeezed(s, &squeeze_of(g, n)?))
        }
        Op::Unsqueeze => one(unsqueeze_of(g, n)?),
        Op::Shape { start, end } => {
            let r = x()?.len() as i64;
            let (s, e) = shape_range(r, *start, *end);
            one(vec![(e - s).max(0) as usize])
        }
        Op::Gather { axis } => {
            let s = x()?;
            let a = norm_axis(*axis, s.len())?;
            let idx = need(g, n, 1)?;
            let mut out = s[..a].to_vec();
            out.extend_from_slice(idx);
            out.extend_from_slice(&s[a + 1..]);
            one(out)
        }
        Op::ConstantOfShape { .. } => {
            let t = konst_i64(g, n, 0, "shape")?.ok_or("ConstantOfShape needs a shape")?;
            if t.iter().any(|&d| d < 0) {
                return Err(format!("negative dim in {t:?}"));
            }
            one(t.iter().map(|&d| d as usize).collect())
        }
    }
}

fn shape_range(r: i64, start: i64, end: Option<i64>) -> (i64, i64) {
    let fix = |v: i64| {
        if v < 0 {
            (v + r).clamp(0, r)
        } else {
            v.clamp(0, r)
        }
    };
    (fix(start), fix(end.unwrap_or(r)))
}

/// Evaluate shape-arithmetic ops on host constants. Returns `None` for ops that are not
/// shape arithmetic (the caller folds those with the numeric executor, or keeps them).
pub fn fold_host(g: &Graph, n: &Node, out_shapes: &[Vec<usize>]) -> R<Option<Vec<Tensor>>> {
    let all_const = n
        .inputs
        .iter()
        .flatten()
        .all(|&v| g.values[v].konst.is_some());
    let c = |i: usize| -> &Tensor { g.values[n.input(i).unwrap()].konst.as_deref().unwrap() };
    let shape0 = out_shapes.first().cloned().unwrap_or_default();
    // Shape only needs the input's shape, not its contents.
    if let Op::Shape { start, end } = &n.op {
        let s = need(g, n, 0)?;
        let (a, b) = shape_range(s.len() as i64, *start, *end);
        let v: Vec<i64> = s[a as usize..b.max(a) as usize]
            .iter()
            .map(|&d| d as i64)
            .collect();
        return Ok(Some(vec![Tensor::i64(vec![v.len()], v)]));
    }
    if !all_const {
        return Ok(None);
    }
    let t = match &n.op {
        Op::Identity | Op::Dropout => c(0).clone(),
        Op::QuantizeLinear { axis } | Op::DequantizeLinear { axis } => {
            let x = c(0);
            let scale = c(1).to_f32_vec();
            let zp_t = n.input(2).map(|_| c(2));
            let zp = zp_t.map(|t| t.to_f32_vec()).unwrap_or_default();
            let (a, per) =
                super::qdq::resolve(&x.shape, *axis, scale.len(), zp_t.map(|_| zp.len()))?;
            if let Op::QuantizeLinear { .. } = n.op {
                let dt = zp_t.map_or(DType::U8, |t| t.dtype);
                let range = super::qdq::qrange(dt)
                    .ok_or_else(|| format!("quantizing to {dt} is not supported"))?;
                let q = super::qdq::quantize(&x.to_f32_vec(), &x.shape, a, per, &scale, &zp, range);
                Tensor::f32(x.shape.clone(), q).cast(dt)
            } else {
                let d = super::qdq::dequantize(&x.to_f32_vec(), &x.shape, a, per, &scale, &zp);
                Tensor::f32(x.shape.clone(), d)
            }
        }
        Op::Cast { to } => c(0).cast(*to),
        Op::Reshape { .. } | Op::Flatten { .. } | Op::Squeeze | Op::Unsqueeze => {
            c(0).reshape(shape0)
        }
        Op::ConstantOfShape { value } => {
            let n_el: usize = shape0.iter().product();
            let data = match &value.data {
                Data::F32(v) => Data::F32(vec![v[0]; n_el]),
                Data::I64(v) => Data::I64(vec![v[0]; n_el]),
            };
            Tensor {
                dtype: value.dtype,
                shape: shape0,
                data,
            }
        }
        Op::Gather { axis } => {
            let x = c(0);
            let a = norm_axis(*axis, x.shape.len())?;
            let dim = x.shape[a] as i64;
            let idx = c(1).to_i64_vec();
            let outer: usize = x.shape[..a].iter().product();
            let inner: usize = x.shape[a + 1..].iter().product();
            let mut flat = Vec::with_capacity(shape0.iter().product());
            for o in 0..outer {
                for &i in &idx {
                    let i = if i < 0 { i + dim } else { i };
                    if i < 0 || i >= dim {
                        return Err(format!("Gather index {i} out of range for dim {dim}"));
                    }
                    let base = (o * x.shape[a] + i as usize) * inner;
                    flat.extend(base..base + inner);
                }
            }
            x.take(shape0, &flat)
        }
        Op::Concat { axis } => {
            let parts: Vec<&Tensor> = n
                .inputs
                .iter()
                .flatten()
                .map(|&v| g.konst(v).unwrap())
                .collect();
            let a = norm_axis(*axis, parts[0].shape.len())?;
            let outer: usize = shape0[..a].iter().product();
            let float = parts.iter().any(|p| p.is_float());
            let mut f = Vec::new();
            let mut i = Vec::new();
            for o in 0..outer {
                for p in &parts {
                    let inner: usize = p.shape[a..].iter().product();
                    if float {
                        f.extend_from_slice(&p.to_f32_vec()[o * inner..(o + 1) * inner]);
                    } else {
                        i.extend_from_slice(&p.to_i64_vec()[o * inner..(o + 1) * inner]);
                    }
                }
            }
            if float {
                Tensor::f32(shape0, f)
            } else {
                Tensor {
                    dtype: parts[0].dtype,
                    shape: shape0,
                    data: Data::I64(i),
                }
            }
        }
        Op::Slice => {
            let x = c(0);
            let spec = slice_of(g, n)?;
            let mut idx: Vec<Vec<usize>> = x.shape.iter().map(|&d| (0..d).collect()).collect();
            for s in &spec {
                idx[s.axis] = s.indices();
            }
            x.take(shape0, &gather_nd(&x.shape, &idx))
        }
        Op::Transpose { perm } => {
            let x = c(0);
            let p = transpose_perm(x.shape.len(), perm.as_deref())?;
            let st = strides(&x.shape);
            let total = x.len();
            let mut flat = Vec::with_capacity(total);
            let mut ix = vec![0usize; p.len()];
            for _ in 0..total {
                flat.push(ix.iter().enumerate().map(|(d, &i)| i * st[p[d]]).sum());
                for d in (0..p.len()).rev() {
                    ix[d] += 1;
                    if ix[d] < shape0[d] {
                        break;
                    }
                    ix[d] = 0;
                }
            }
            x.take(shape0, &flat)
        }
        Op::Add | Op::Sub | Op::Mul | Op::Div if !c(0).is_float() && !c(1).is_float() => {
            let (a, b) = (c(0), c(1));
            let ia = broadcast_index(&a.shape, &shape0);
            let ib = broadcast_index(&b.shape, &shape0);
            let (va, vb) = (a.to_i64_vec(), b.to_i64_vec());
            let mut v = Vec::with_capacity(ia.len());
            for (&i, &j) in ia.iter().zip(&ib) {
                let (p, q) = (va[i], vb[j]);
                v.push(match n.op {
                    Op::Add => p.wrapping_add(q),
                    Op::Sub => p.wrapping_sub(q),
                    Op::Mul => p.wrapping_mul(q),
                    _ => {
                        if q == 0 {
                            return Err("integer division by zero".into());
                        }
                        p.wrapping_div(q)
                    }
                });
            }
            Tensor {
                dtype: a.dtype,
                shape: shape0,
                data: Data::I64(v),
            }
        }
        _ => return Ok(None),
    };
    let mut outs = vec![t];
    // Dropout's optional mask output.
    if let Op::Dropout = n.op {
        if n.outputs.len() > 1 {
            let len = outs[0].len();
            outs.push(Tensor {
                dtype: DType::Bool,
                shape: outs[0].shape.clone(),
                data: Data::I64(vec![1; len]),
            });
        }
    }
    Ok(Some(outs))
}

/// Flat indices of the cartesian product of per-axis index lists.
pub fn gather_nd(shape: &[usize], idx: &[Vec<usize>]) -> Vec<usize> {
    let st = strides(shape);
    let mut out = vec![0usize];
    for (d, ix) in idx.iter().enumerate() {
        let mut next = Vec::with_capacity(out.len() * ix.len());
        for &base in &out {
            for &i in ix {
                next.push(base + i * st[d]);
            }
        }
        out = next;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices() {
        let s = slice_spec(&[10], &[0], &[i64::MAX], None, Some(&[2])).unwrap();
        assert_eq!(s[0].indices(), vec![0, 2, 4, 6, 8]);
        let s = slice_spec(&[5], &[-1], &[i64::MIN], None, Some(&[-1])).unwrap();
        assert_eq!(s[0].indices(), vec![4, 3, 2, 1, 0]);
        let s = slice_spec(&[5], &[1], &[-1], None, None).unwrap();
        assert_eq!(s[0].indices(), vec![1, 2, 3]);
    }

    #[test]
    fn geometry() {
        let w = conv_geometry(&[32], &[3], &[2], &[], &[1, 1], AutoPad::NotSet, false).unwrap();
        assert_eq!(w.out, vec![16]);
        let w = conv_geometry(&[15], &[3], &[2], &[], &[1, 1], AutoPad::NotSet, true).unwrap();
        assert_eq!(w.out, vec![8]);
        let w = conv_geometry(&[7], &[3], &[2], &[], &[], AutoPad::SameUpper, false).unwrap();
        assert_eq!((w.out[0], w.pad_begin[0], w.pad_end[0]), (4, 1, 1));
    }

    #[test]
    fn reshape_and_pad() {
        assert_eq!(
            reshape_target(&[2, 3, 4], &[0, -1], false).unwrap(),
            vec![2, 12]
        );
        assert!(reshape_target(&[2, 3, 4], &[5, -1], false).is_err());
        assert_eq!(pad_source(-1, 4, PadMode::Reflect), 1);
        assert_eq!(pad_source(4, 4, PadMode::Reflect), 2);
        assert_eq!(pad_source(5, 4, PadMode::Edge), 3);
    }
}
