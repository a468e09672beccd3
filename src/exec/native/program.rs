//! A compiled native program: steps over buffers allocated once, run with both cores.

use std::ops::Range;

use candle_core::{Device, Tensor};
use rayon::prelude::*;
use zq_kernels::int8::{ConvGeometry, ConvPlan, DepthwiseWeights, Kernels, Output, PackedWeights};
use zq_kernels::simd::vectorize;

use super::ops::{self, AddParams, PoolGeom};
use crate::error::{Error, Result};
use crate::exec::{eval, Kind};
use crate::ir::Node;

/// A buffer of the program: u8 (quantized, NHWC for rank-4 values) or f32 (ONNX layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Buf {
    U8(usize),
    F32(usize),
}

#[derive(Debug)]
pub(super) enum Weights {
    Gemm(PackedWeights),
    Depthwise(DepthwiseWeights),
}

/// One group of a convolution (or the whole layer): its weights and epilogue constants.
#[derive(Debug)]
pub(super) struct Group {
    pub w: Weights,
    pub bias: Option<Vec<i32>>,
    /// Per output channel of the group (or one).
    pub scale: Vec<f32>,
    pub cin_off: usize,
    pub cout_off: usize,
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Epi {
    U8 { zp: u8, lo: u8, hi: u8 },
    F32,
}

/// An integer convolution or GEMM (a GEMM is a 1x1 convolution over one image of `m` pixels).
#[derive(Debug)]
pub(super) struct ConvStep {
    pub x: usize,
    pub y: Buf,
    /// Per group: `channels` = input channels of a group, `pixel_stride` = all input channels.
    pub geom: ConvGeometry,
    pub in_image: usize,
    pub cout: usize,
    pub za: u8,
    pub groups: Vec<Group>,
    pub epi: Epi,
    /// A residual added to each task's u8 output while it is in cache (a folded
    /// `DQ(conv), DQ(b) -> Add -> Q`, the conv's buffer then holding the sum): `b`'s buffer.
    pub residual: Option<(usize, ops::AddParams)>,
    /// A table applied to each task's u8 output while it is in cache (a folded `DQ -> f -> Q`),
    /// after the residual.
    pub post: Option<ops::Table>,
    /// (image, output pixels) of each parallel task.
    pub tasks: Vec<(usize, Range<usize>)>,
    /// The kernels' plan of each distinct pixel range of `tasks` (made by [`ConvStep::plan`]
    /// once the geometry is final).
    pub plans: Vec<ConvPlan>,
}

impl ConvStep {
    /// Compute the kernels' plans of the tasks' pixel ranges (the same for every image).
    pub(super) fn plan(&mut self) -> std::result::Result<(), String> {
        self.plans.clear();
        for (_, px) in &self.tasks {
            if !self.plans.iter().any(|p| p.pixels() == *px) {
                let p = ConvPlan::new(&self.geom, px.clone()).map_err(|e| e.to_string())?;
                self.plans.push(p);
            }
        }
        Ok(())
    }

    fn plan_of(&self, px: &Range<usize>) -> std::result::Result<&ConvPlan, String> {
        self.plans
            .iter()
            .find(|p| p.pixels() == *px)
            .ok_or_else(|| format!("no plan for output pixels {px:?}"))
    }
}

/// Where a float fallback op's input comes from.
#[derive(Debug)]
pub(super) enum FIn {
    Buf(usize, Vec<usize>),
    Const(Tensor),
}

#[derive(Debug)]
pub(super) enum Step {
    Conv(ConvStep),
    /// f32 (ONNX layout) -> u8.
    Quantize {
        x: usize,
        y: usize,
        len: usize,
        c: usize,
        hw: usize,
        scale: f32,
        zp: u8,
    },
    /// u8 -> f32 (ONNX layout).
    Dequantize {
        x: usize,
        y: usize,
        len: usize,
        c: usize,
        hw: usize,
        scale: f32,
        zp: u8,
    },
    Lut {
        x: usize,
        y: usize,
        len: usize,
        lut: Box<[u8; 256]>,
    },
    Gather {
        x: usize,
        y: usize,
        map: Vec<u32>,
        lut: Box<[u8; 256]>,
        pad: u8,
    },
    Add {
        a: usize,
        b: usize,
        y: usize,
        len: usize,
        p: AddParams,
        post: Option<ops::Table>,
    },
    MaxPool {
        x: usize,
        y: usize,
        images: usize,
        geom: PoolGeom,
        lut: Box<[u8; 256]>,
    },
    AvgPool {
        x: usize,
        y: usize,
        images: usize,
        geom: PoolGeom,
        divisor: Vec<f32>,
        sx: (f32, u8),
        sy: (f32, u8),
        clamp: (u8, u8),
    },
    /// Any other op, in f32 through the reference executor's op definitions.
    Float {
        node: Box<Node>,
        kind: Box<Kind>,
        inputs: Vec<Option<FIn>>,
        y: usize,
        shape: Vec<usize>,
    },
}

impl Step {
    /// Every buffer the step touches, with whether it writes it.
    pub(super) fn bufs(&mut self, f: &mut dyn FnMut(&mut Buf, bool)) {
        fn u(f: &mut dyn FnMut(&mut Buf, bool), b: &mut usize, w: bool) {
            let mut t = Buf::U8(*b);
            f(&mut t, w);
            if let Buf::U8(v) = t {
                *b = v;
            }
        }
        fn fl(f: &mut dyn FnMut(&mut Buf, bool), b: &mut usize, w: bool) {
            let mut t = Buf::F32(*b);
            f(&mut t, w);
            if let Buf::F32(v) = t {
                *b = v;
            }
        }
        match self {
            Step::Conv(c) => {
                u(f, &mut c.x, false);
                if let Some((b, _)) = &mut c.residual {
                    u(f, b, false);
                }
                f(&mut c.y, true);
            }
            Step::Quantize { x, y, .. } => {
                fl(f, x, false);
                u(f, y, true);
            }
            Step::Dequantize { x, y, .. } => {
                u(f, x, false);
                fl(f, y, true);
            }
            Step::Lut { x, y, .. }
            | Step::Gather { x, y, .. }
            | Step::MaxPool { x, y, .. }
            | Step::AvgPool { x, y, .. } => {
                u(f, x, false);
                u(f, y, true);
            }
            Step::Add { a, b, y, .. } => {
                u(f, a, false);
                u(f, b, false);
                u(f, y, true);
            }
            Step::Float { inputs, y, .. } => {
                for i in inputs.iter_mut().flatten() {
                    if let FIn::Buf(b, _) = i {
                        fl(f, b, false);
                    }
                }
                fl(f, y, true);
            }
        }
    }

    /// Whether the step runs on integers (for reports).
    pub(super) fn is_integer(&self) -> bool {
        !matches!(self, Step::Float { .. })
    }
}

/// A compiled program for one batch size.
#[derive(Debug)]
pub struct Program {
    pub(super) steps: Vec<Step>,
    /// Node name and op of each step (errors name them).
    pub(super) names: Vec<(String, &'static str)>,
    pub(super) u8_bufs: Vec<Vec<u8>>,
    pub(super) f32_bufs: Vec<Vec<f32>>,
    /// The f32 buffer of each graph input, with its shape.
    pub(super) inputs: Vec<(usize, Vec<usize>)>,
    /// Each graph output: an f32 buffer or a constant, with its shape.
    pub(super) outputs: Vec<(OutSrc, Vec<usize>)>,
    pub(super) kernels: &'static Kernels,
}

#[derive(Debug)]
pub(super) enum OutSrc {
    Buf(usize),
    Const(Vec<f32>),
}

/// Split `data` into consecutive pieces of the given lengths.
fn split<T>(mut data: &mut [T], lens: impl Iterator<Item = usize>) -> Vec<&mut [T]> {
    let mut v = Vec::new();
    for l in lens {
        let (a, b) = data.split_at_mut(l);
        v.push(a);
        data = b;
    }
    v
}

/// Rows of `chunk` elements, processed in parallel pieces of about `grain` elements.
fn par_rows(len: usize, grain: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    len.div_ceil(4 * threads).max(grain).max(1)
}

impl Program {
    /// Number of steps and how many of them run on integers.
    pub fn counts(&self) -> (usize, usize) {
        (
            self.steps.len(),
            self.steps.iter().filter(|s| s.is_integer()).count(),
        )
    }

    /// Run on the graph inputs (ONNX layout, f32); returns every graph output with its shape.
    pub fn run(&mut self, inputs: &[&[f32]]) -> Result<Vec<(Vec<f32>, Vec<usize>)>> {
        if inputs.len() != self.inputs.len() {
            return Err(Error::Usage(format!(
                "model takes {} inputs, got {}",
                self.inputs.len(),
                inputs.len()
            )));
        }
        for (x, (b, shape)) in inputs.iter().zip(&self.inputs) {
            let buf = &mut self.f32_bufs[*b];
            if x.len() != shape.iter().product::<usize>() {
                return Err(Error::Usage(format!(
                    "input has {} values, the model expects shape {shape:?}",
                    x.len()
                )));
            }
            buf[..x.len()].copy_from_slice(x);
        }
        // Run every step on a pool thread: the kernels' parallel loops then start on this
        // worker's own queue instead of waking the pool from outside at each step.
        let (steps, names, kernels) = (&self.steps, &self.names, self.kernels);
        let (u8s, f32s) = (&mut self.u8_bufs, &mut self.f32_bufs);
        let done = std::sync::atomic::AtomicBool::new(false);
        rayon::scope(|s| -> Result<()> {
            // Keep the other workers awake for the run: each spins, taking any job the steps
            // publish, so a step's pieces start in well under a microsecond instead of after a
            // sleeping thread's wake-up (which cost more than small steps take at batch 1).
            let main = rayon::current_thread_index();
            let done = &done;
            for _ in 1..rayon::current_num_threads() {
                s.spawn(move |_| {
                    // Never spin on the thread that runs the steps (it may pick this job up
                    // while it waits for its own pieces).
                    if rayon::current_thread_index() == main {
                        return;
                    }
                    while !done.load(std::sync::atomic::Ordering::Acquire) {
                        if rayon::yield_now() != Some(rayon::Yield::Executed) {
                            std::hint::spin_loop();
                        }
                    }
                });
            }
            let r = run_steps(kernels, steps, names, u8s, f32s);
            done.store(true, std::sync::atomic::Ordering::Release);
            r
        })?;
        Ok(self
            .outputs
            .iter()
            .map(|(src, shape)| {
                let n = shape.iter().product::<usize>();
                let v = match src {
                    OutSrc::Buf(b) => self.f32_bufs[*b][..n].to_vec(),
                    OutSrc::Const(v) => v.clone(),
                };
                (v, shape.clone())
            })
            .collect())
    }
}

fn run_steps(
    kernels: &Kernels,
    steps: &[Step],
    names: &[(String, &'static str)],
    u8s: &mut [Vec<u8>],
    f32s: &mut [Vec<f32>],
) -> Result<()> {
    let prof = std::env::var_os("ZQ_NATIVE_PROFILE").is_some();
    for (i, step) in steps.iter().enumerate() {
        let t0 = std::time::Instant::now();
        run_step(kernels, step, u8s, f32s).map_err(|m| {
            let (name, op) = &names[i];
            Error::node(name, op, format!("native engine: {m}"))
        })?;
        if prof {
            eprintln!(
                "PROF {i} {} {} {:.1}",
                names[i].1,
                step_kind(step),
                t0.elapsed().as_secs_f64() * 1e6
            );
        }
    }
    Ok(())
}

fn take<T: Default>(v: &mut [T], i: usize) -> T {
    std::mem::take(&mut v[i])
}

fn run_step(
    k: &Kernels,
    step: &Step,
    u8s: &mut [Vec<u8>],
    f32s: &mut [Vec<f32>],
) -> std::result::Result<(), String> {
    match step {
        Step::Conv(c) => {
            let x = &u8s[c.x];
            match c.y {
                Buf::U8(yb) => {
                    let mut y = take(u8s, yb);
                    let b = c.residual.as_ref().map(|(b, _)| u8s[*b].as_slice());
                    let r = conv_u8(k, c, &u8s[c.x], b, &mut y);
                    u8s[yb] = y;
                    r?;
                }
                Buf::F32(yb) => {
                    let mut y = take(f32s, yb);
                    let r = conv_f32(k, c, x, &mut y);
                    f32s[yb] = y;
                    r?;
                }
            }
        }
        Step::Quantize {
            x,
            y,
            len,
            c,
            hw,
            scale,
            zp,
        } => {
            let mut out = take(u8s, *y);
            let xs = &f32s[*x];
            // Split over pixels (of all images), so a single image uses both cores too.
            let c = if *c == 1 || *hw == 1 { 1 } else { *c };
            let pixels = len / c;
            let per = par_rows(pixels, 1024 / c.max(1) + 1);
            out[..pixels * c]
                .par_chunks_mut(per * c)
                .enumerate()
                .for_each(|(t, o)| {
                    vectorize(ops::Quantize {
                        x: xs,
                        y: o,
                        c,
                        hw: if c == 1 { 1 } else { *hw },
                        p0: t * per,
                        scale: *scale,
                        zp: *zp,
                    })
                });
            u8s[*y] = out;
        }
        Step::Dequantize {
            x,
            y,
            len,
            c,
            hw,
            scale,
            zp,
        } => {
            let mut out = take(f32s, *y);
            let xs = &u8s[*x];
            let img = (c * hw).max(1);
            let n = *len;
            let rows = par_rows(n / img, 1);
            out[..n]
                .par_chunks_mut(rows * img)
                .zip(xs[..n].par_chunks(rows * img))
                .for_each(|(o, i)| {
                    vectorize(ops::Dequantize {
                        x: i,
                        y: o,
                        c: *c,
                        hw: *hw,
                        scale: *scale,
                        zp: *zp,
                    })
                });
            f32s[*y] = out;
        }
        Step::Lut { x, y, len, lut } => {
            let mut out = take(u8s, *y);
            let xs = &u8s[*x];
            let n = *len;
            let g = par_rows(n, 2048);
            out[..n]
                .par_chunks_mut(g)
                .zip(xs[..n].par_chunks(g))
                .for_each(|(o, i)| ops::lut_apply(i, o, lut));
            u8s[*y] = out;
        }
        Step::Gather {
            x,
            y,
            map,
            lut,
            pad,
        } => {
            let mut out = take(u8s, *y);
            let xs = &u8s[*x];
            let g = par_rows(map.len(), 2048);
            out[..map.len()]
                .par_chunks_mut(g)
                .zip(map.par_chunks(g))
                .for_each(|(o, m)| ops::gather(xs, o, m, lut, *pad));
            u8s[*y] = out;
        }
        Step::Add {
            a,
            b,
            y,
            len,
            p,
            post,
        } => {
            let mut out = take(u8s, *y);
            let (xa, xb) = (&u8s[*a], &u8s[*b]);
            let n = *len;
            let g = par_rows(n, 2048);
            out[..n]
                .par_chunks_mut(g)
                .zip(xa[..n].par_chunks(g).zip(xb[..n].par_chunks(g)))
                .for_each(|(o, (a, b))| {
                    vectorize(ops::AddU8 { a, b, y: o, p: *p });
                    if let Some(t) = post {
                        t.apply(o);
                    }
                });
            u8s[*y] = out;
        }
        Step::MaxPool {
            x,
            y,
            images,
            geom,
            lut,
        } => {
            let mut out = take(u8s, *y);
            let xs = &u8s[*x];
            let (ii, oi) = (
                geom.in_h * geom.in_w * geom.c,
                geom.out_h * geom.out_w * geom.c,
            );
            out[..images * oi]
                .par_chunks_mut(oi.max(1))
                .zip(xs[..images * ii].par_chunks(ii.max(1)))
                .for_each(|(o, i)| ops::max_pool(geom, i, o, lut));
            u8s[*y] = out;
        }
        Step::AvgPool {
            x,
            y,
            images,
            geom,
            divisor,
            sx,
            sy,
            clamp,
        } => {
            let mut out = take(u8s, *y);
            let xs = &u8s[*x];
            let (ii, oi) = (
                geom.in_h * geom.in_w * geom.c,
                geom.out_h * geom.out_w * geom.c,
            );
            out[..images * oi]
                .par_chunks_mut(oi.max(1))
                .zip(xs[..images * ii].par_chunks(ii.max(1)))
                .for_each(|(o, i)| ops::avg_pool(geom, i, o, divisor, *sx, *sy, *clamp));
            u8s[*y] = out;
        }
        Step::Float {
            node,
            kind,
            inputs,
            y,
            shape,
        } => {
            let dev = Device::Cpu;
            let ins: Vec<Option<Tensor>> = inputs
                .iter()
                .map(|i| {
                    i.as_ref()
                        .map(|i| match i {
                            FIn::Buf(b, s) => {
                                let n = s.iter().product::<usize>();
                                Tensor::from_slice(&f32s[*b][..n], s.as_slice(), &dev)
                            }
                            FIn::Const(t) => Ok(t.clone()),
                        })
                        .transpose()
                })
                .collect::<candle_core::Result<_>>()
                .map_err(|e| e.to_string())?;
            let t = eval(node, kind, &ins).map_err(|e| e.to_string())?;
            if t.dims() != shape.as_slice() {
                return Err(format!(
                    "float op gave shape {:?}, expected {shape:?}",
                    t.dims()
                ));
            }
            let v = t
                .to_dtype(candle_core::DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| e.to_string())?;
            f32s[*y][..v.len()].copy_from_slice(&v);
        }
    }
    Ok(())
}

fn task_lens(c: &ConvStep) -> impl Iterator<Item = usize> + '_ {
    c.tasks.iter().map(|(_, r)| r.len() * c.cout)
}

fn conv_u8(
    k: &Kernels,
    c: &ConvStep,
    x: &[u8],
    residual: Option<&[u8]>,
    y: &mut [u8],
) -> std::result::Result<(), String> {
    let Epi::U8 { zp, lo, hi } = c.epi else {
        return Err("u8 output without u8 epilogue".into());
    };
    let out_pixels = c.geom.out_pixels();
    let pieces = split(y, task_lens(c));
    pieces
        .into_par_iter()
        .zip(c.tasks.par_iter())
        .try_for_each(|(out, (img, px))| {
            let input = &x[img * c.in_image..(img + 1) * c.in_image];
            // The residual's elements of this task, in the output's layout.
            let res = match (residual, &c.residual) {
                (Some(b), Some((_, p))) => {
                    let at = (img * out_pixels + px.start) * c.cout;
                    let b = b
                        .get(at..at + out.len())
                        .ok_or("residual shorter than the conv output")?;
                    Some((b, p))
                }
                _ => None,
            };
            for g in &c.groups {
                let data = &mut out[g.cout_off..];
                let o = match res {
                    // The sum is the kernel's epilogue: the conv output is never stored alone.
                    Some((b, p)) => Output::U8Add {
                        data,
                        stride: c.cout,
                        scale: &g.scale,
                        zero_point: zp,
                        min: lo,
                        max: hi,
                        residual: p.residual(&b[g.cout_off..], c.cout),
                    },
                    None => Output::U8 {
                        data,
                        stride: c.cout,
                        scale: &g.scale,
                        zero_point: zp,
                        min: lo,
                        max: hi,
                    },
                };
                conv_call(k, c, g, &input[g.cin_off..], o, px.clone())?;
            }
            if let Some(t) = &c.post {
                t.apply(out);
            }
            Ok(())
        })
}

fn conv_f32(k: &Kernels, c: &ConvStep, x: &[u8], y: &mut [f32]) -> std::result::Result<(), String> {
    let pieces = split(y, task_lens(c));
    pieces
        .into_par_iter()
        .zip(c.tasks.par_iter())
        .try_for_each(|(out, (img, px))| {
            let input = &x[img * c.in_image..(img + 1) * c.in_image];
            for g in &c.groups {
                let o = Output::F32 {
                    data: &mut out[g.cout_off..],
                    stride: c.cout,
                    scale: &g.scale,
                };
                conv_call(k, c, g, &input[g.cin_off..], o, px.clone())?;
            }
            Ok(())
        })
}

fn conv_call(
    k: &Kernels,
    c: &ConvStep,
    g: &Group,
    input: &[u8],
    out: Output<'_>,
    px: Range<usize>,
) -> std::result::Result<(), String> {
    let plan = c.plan_of(&px)?;
    let r = match &g.w {
        Weights::Gemm(w) => k.conv_planned(input, plan, c.za, w, g.bias.as_deref(), out),
        Weights::Depthwise(w) => k.depthwise_planned(input, plan, c.za, w, g.bias.as_deref(), out),
    };
    r.map_err(|e| e.to_string())
}

fn step_kind(s: &Step) -> &'static str {
    match s {
        Step::Conv(_) => "conv",
        Step::Quantize { .. } => "quantize",
        Step::Dequantize { .. } => "dequantize",
        Step::Lut { .. } => "lut",
        Step::Gather { .. } => "gather",
        Step::Add { .. } => "add",
        Step::MaxPool { .. } => "maxpool",
        Step::AvgPool { .. } => "avgpool",
        Step::Float { .. } => "float",
    }
}
