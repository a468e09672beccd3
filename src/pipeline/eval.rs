//! `zq eval`: top-1 accuracy on an image folder, optionally against a reference model.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use serde::Serialize;

use crate::data::{load_batch, ImageFolder, Preprocess};
use crate::error::{Error, Result};
use crate::exec::ort::OrtModel;
use crate::exec::{argmax_rows, Plan};
use crate::onnx::read_model;

/// Something that maps a batch of NCHW inputs to [N, K] scores.
pub trait Classifier {
    /// Input [C, H, W] the model expects.
    fn input_chw(&self) -> [usize; 3];
    /// Run a batch; returns the predicted class of each input.
    fn predict(&mut self, data: Vec<f32>, n: usize) -> Result<Vec<usize>>;
    /// Get ready for batches of `n` (compile for that size) outside the timed runs.
    fn prepare(&mut self, _n: usize) -> Result<()> {
        Ok(())
    }
}

/// zq's own executor, with one specialised plan per batch size.
pub struct ZqClassifier {
    graph: crate::ir::Graph,
    plans: HashMap<usize, Plan>,
    chw: [usize; 3],
}

/// The [C, H, W] of a model's single image input (batch dimension free).
pub fn chw_of(g: &crate::ir::Graph, path: &Path) -> Result<[usize; 3]> {
    use crate::ir::Dim;
    let inp = g.inputs.first().ok_or_else(|| Error::Model {
        path: path.into(),
        msg: "no inputs".into(),
    })?;
    let fixed: Vec<usize> = inp.dims[1..]
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => Ok(*n),
            Dim::Sym(s) => Err(Error::Model {
                path: path.into(),
                msg: format!(
                    "input dimension '{s}' is symbolic; zq needs a fixed C x H x W image input"
                ),
            }),
        })
        .collect::<Result<_>>()?;
    if g.inputs.len() != 1 || fixed.len() != 3 {
        return Err(Error::Model {
            path: path.into(),
            msg: format!(
                "zq needs one N x C x H x W image input, the model has {} input(s) of rank {}",
                g.inputs.len(),
                inp.dims.len()
            ),
        });
    }
    if crate::ir::passes::checked_elements(&fixed).is_none() {
        return Err(Error::Model {
            path: path.into(),
            msg: format!(
                "input of {:?} per image has more than {} elements",
                fixed,
                crate::ir::passes::MAX_ELEMENTS
            ),
        });
    }
    Ok([fixed[0], fixed[1], fixed[2]])
}

impl ZqClassifier {
    pub fn open(path: &Path) -> Result<Self> {
        Self::new(read_model(path)?.graph, path)
    }

    /// A classifier for a graph in memory (`path` names it in errors).
    pub fn new(graph: crate::ir::Graph, path: &Path) -> Result<Self> {
        let chw = chw_of(&graph, path)?;
        // Specialise once now so a broken model fails before any image is read.
        let plan = Plan::new(&graph, 1)?;
        let mut plans = HashMap::new();
        plans.insert(1, plan);
        Ok(ZqClassifier { graph, plans, chw })
    }

    /// The model's first output for `n` inputs, as a flat [n, K] table, and K.
    pub fn scores(&mut self, data: &[f32], n: usize) -> Result<(Vec<f32>, usize)> {
        let y = self.run(data, n)?;
        let k = y.elem_count() / n.max(1);
        Ok((y.flatten_all()?.to_vec1::<f32>()?, k))
    }

    fn run(&mut self, data: &[f32], n: usize) -> Result<Tensor> {
        if !self.plans.contains_key(&n) {
            self.plans.insert(n, Plan::new(&self.graph, n)?);
        }
        let plan = &self.plans[&n];
        let [c, h, w] = self.chw;
        let x = Tensor::from_slice(data, (n, c, h, w), plan.device())?;
        Ok(plan.run(&[x])?.remove(0))
    }
}

impl Classifier for ZqClassifier {
    fn input_chw(&self) -> [usize; 3] {
        self.chw
    }
    fn predict(&mut self, data: Vec<f32>, n: usize) -> Result<Vec<usize>> {
        let y = self.run(&data, n)?;
        Ok(argmax_rows(&y)?)
    }
}

/// The native engine (`exec::native`): one compiled program per batch size, or the f32 tape for a
/// float graph it covers.
pub struct NativeClassifier {
    model: crate::exec::native::NativeModel,
    chw: [usize; 3],
}

impl NativeClassifier {
    pub fn open(path: &Path) -> Result<Self> {
        Self::new(read_model(path)?.graph, path)
    }

    /// A classifier for a graph in memory (`path` names it in errors).
    pub fn new(graph: crate::ir::Graph, path: &Path) -> Result<Self> {
        let chw = chw_of(&graph, path)?;
        Ok(NativeClassifier {
            model: crate::exec::native::NativeModel::new(graph)?,
            chw,
        })
    }

    /// A float graph on the native engine's f32 tape; `None` when the tape does not cover it
    /// (nothing else is compiled).
    pub fn float_on_tape(graph: &crate::ir::Graph, path: &Path) -> Result<Option<Self>> {
        let chw = chw_of(graph, path)?;
        Ok(crate::exec::native::NativeModel::float_on_tape(graph)?
            .map(|model| NativeClassifier { model, chw }))
    }

    /// The model's first output for `n` inputs, as a flat [n, K] table, and K.
    pub fn scores(&mut self, data: &[f32], n: usize) -> Result<(Vec<f32>, usize)> {
        let (y, _) = self.model.run(data, n)?;
        let k = y.len() / n.max(1);
        Ok((y, k))
    }
}

impl Classifier for NativeClassifier {
    fn input_chw(&self) -> [usize; 3] {
        self.chw
    }
    fn predict(&mut self, data: Vec<f32>, n: usize) -> Result<Vec<usize>> {
        let (y, k) = self.scores(&data, n)?;
        Ok(argmax_flat(&y, k))
    }
    fn prepare(&mut self, n: usize) -> Result<()> {
        self.model.prepare(n)
    }
}

/// Argmax of each row of a flat [n, k] table (first maximum wins).
pub fn argmax_flat(y: &[f32], k: usize) -> Vec<usize> {
    y.chunks(k.max(1))
        .map(|r| {
            r.iter()
                .enumerate()
                .fold(0, |b, (i, &v)| if v > r[b] { i } else { b })
        })
        .collect()
}

/// The engine `zq eval` and `zq bench` pick without `--engine`: the native one for a quantized
/// model, and for a float model the f32 tape covers (its fast path); zq's executor for any other
/// float model (the native program would run it op by op, no faster). `true` means native.
pub fn default_classifier(
    graph: crate::ir::Graph,
    path: &Path,
) -> Result<(Box<dyn Classifier>, bool)> {
    if is_quantized(&graph) {
        return Ok((Box::new(NativeClassifier::new(graph, path)?), true));
    }
    // An error here is zq's executor's to report, the same way.
    if let Ok(Some(c)) = NativeClassifier::float_on_tape(&graph, path) {
        return Ok((Box::new(c), true));
    }
    Ok((Box::new(ZqClassifier::new(graph, path)?), false))
}

/// Whether a model holds QuantizeLinear nodes (then `zq eval` runs it natively by default).
pub fn is_quantized(g: &crate::ir::Graph) -> bool {
    g.nodes
        .iter()
        .any(|n| matches!(n.op, crate::ir::Op::QuantizeLinear { .. }))
}

/// ONNX Runtime as the engine.
pub struct OrtClassifier {
    model: OrtModel,
    chw: [usize; 3],
}

impl OrtClassifier {
    /// A session with one intra-op thread per core, exact integer kernels ([`OrtModel::open`]).
    pub fn open(path: &Path, lib: Option<&Path>) -> Result<Self> {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        Self::open_threads(path, lib, threads, true)
    }

    /// A session with `threads` intra-op threads; `precise` as in [`OrtModel::open_with`].
    pub fn open_threads(
        path: &Path,
        lib: Option<&Path>,
        threads: usize,
        precise: bool,
    ) -> Result<Self> {
        let graph = read_model(path)?.graph;
        let chw = chw_of(&graph, path)?;
        Ok(OrtClassifier {
            model: OrtModel::open_with(path, lib, threads, precise)?,
            chw,
        })
    }
}

impl Classifier for OrtClassifier {
    fn input_chw(&self) -> [usize; 3] {
        self.chw
    }
    fn predict(&mut self, data: Vec<f32>, n: usize) -> Result<Vec<usize>> {
        let [c, h, w] = self.chw;
        let (shape, y) = self.model.run(data, &[n, c, h, w])?;
        let k: usize = shape[1..].iter().product();
        if shape.first() != Some(&n) || k == 0 {
            return Err(Error::Exec(format!(
                "ONNX Runtime returned shape {shape:?} for a batch of {n}"
            )));
        }
        Ok(y.chunks(k)
            .map(|r| {
                r.iter()
                    .enumerate()
                    .fold(0, |b, (i, &v)| if v > r[b] { i } else { b })
            })
            .collect())
    }
}

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub data: PathBuf,
    pub pre: Preprocess,
    pub limit: Option<usize>,
    pub batch: usize,
}

#[derive(Debug, Serialize)]
pub struct EvalReport {
    pub model: String,
    pub data: String,
    pub engine: String,
    pub n: usize,
    pub correct: usize,
    pub top1: f64,
    pub classes: usize,
    pub ms_per_image: f64,
    pub seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference_top1: Option<f64>,
    /// Fraction of images where model and reference predict the same class.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agreement: Option<f64>,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

/// Evenly spread subset of `len` items of size `limit` (all when limit >= len).
pub fn spread(len: usize, limit: Option<usize>) -> Vec<usize> {
    match limit {
        Some(k) if k < len => (0..k).map(|i| i * len / k).collect(),
        _ => (0..len).collect(),
    }
}

/// Raw counts of one evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalCounts {
    pub n: usize,
    pub correct: usize,
    pub classes: usize,
    /// (agreeing predictions, reference correct) when a reference ran.
    pub reference: Option<(usize, usize)>,
    /// Time spent in the model itself (not decoding images).
    pub model_seconds: f64,
}

/// Evaluate `model` (and optionally `reference`) on an image folder. `start(total)` is called once
/// the folder is listed, `progress(k)` after each batch of k images.
pub fn eval(
    model: &mut dyn Classifier,
    mut reference: Option<&mut dyn Classifier>,
    opts: &EvalOptions,
    start: &mut dyn FnMut(usize),
    progress: &mut dyn FnMut(usize),
) -> Result<EvalCounts> {
    let folder = ImageFolder::open(&opts.data)?;
    let [c, h, w] = model.input_chw();
    if let Some(r) = reference.as_deref() {
        if r.input_chw() != [c, h, w] {
            return Err(Error::Usage(format!(
                "--compare: the reference model takes {:?} inputs but the model takes {:?}",
                r.input_chw(),
                [c, h, w]
            )));
        }
    }
    opts.pre.per_channel(c)?;
    let pick = spread(folder.items.len(), opts.limit);
    let total = pick.len();
    // Compile for the batch sizes that will run before the clock starts.
    for n in [opts.batch.min(total), total % opts.batch.max(1)] {
        if n > 0 {
            model.prepare(n)?;
            if let Some(r) = reference.as_deref_mut() {
                r.prepare(n)?;
            }
        }
    }
    start(total);
    let (mut correct, mut agree, mut ref_correct) = (0, 0, 0);
    let mut model_secs = 0.0;
    for chunk in pick.chunks(opts.batch) {
        let items: Vec<(PathBuf, usize)> = chunk.iter().map(|&i| folder.items[i].clone()).collect();
        let data = load_batch(&items, c, h, w, &opts.pre)?;
        // The reference needs the same batch; copy it only when there is one.
        let ref_data = reference.is_some().then(|| data.clone());
        let t = Instant::now();
        let pred = model.predict(data, items.len())?;
        model_secs += t.elapsed().as_secs_f64();
        for (p, (_, label)) in pred.iter().zip(&items) {
            correct += usize::from(p == label);
        }
        if let (Some(r), Some(data)) = (reference.as_deref_mut(), ref_data) {
            let rp = r.predict(data, items.len())?;
            for ((a, b), (_, label)) in pred.iter().zip(&rp).zip(&items) {
                agree += usize::from(a == b);
                ref_correct += usize::from(b == label);
            }
        }
        progress(items.len());
    }
    Ok(EvalCounts {
        n: total,
        correct,
        classes: folder.classes.len(),
        reference: reference.map(|_| (agree, ref_correct)),
        model_seconds: model_secs,
    })
}
