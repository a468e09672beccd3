//! `zq bench --model`: milliseconds per image of one model on zq's engine and on ONNX Runtime,
//! measured side by side in one process: the same inputs, the same thread count, warm-up runs
//! excluded, and rounds that alternate between the engines so that a change in the machine's
//! load falls on both.

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use crate::data::{load_batch, ImageFolder, Preprocess};
use crate::error::{Error, Result};
use crate::pipeline::eval::{spread, Classifier};

/// Largest batch `zq bench --model` accepts (as `zq eval --batch`).
pub const MAX_BATCH: usize = 4096;

#[derive(Debug, Clone)]
pub struct ModelBenchOptions {
    /// Batch sizes to time, in order.
    pub batches: Vec<usize>,
    /// Timed rounds per engine and batch size.
    pub rounds: usize,
    /// Aim of one round's duration; a round runs the model at least once.
    pub round_seconds: f64,
    /// Image folder the inputs come from (`None`: pseudo-random pixels).
    pub data: Option<PathBuf>,
    pub pre: Preprocess,
}

impl ModelBenchOptions {
    pub fn validate(&self) -> Result<()> {
        if self.batches.is_empty() {
            return Err(Error::Usage("--batch: give at least one batch size".into()));
        }
        if let Some(b) = self.batches.iter().find(|&&b| b == 0 || b > MAX_BATCH) {
            return Err(Error::Usage(format!(
                "--batch {b}: a batch size is 1 to {MAX_BATCH}"
            )));
        }
        if self.rounds == 0 {
            return Err(Error::Usage("--rounds must be at least 1".into()));
        }
        if !(self.round_seconds.is_finite()
            && self.round_seconds > 0.0
            && self.round_seconds <= 600.0)
        {
            return Err(Error::Usage(format!(
                "--round-time {}: expected seconds in (0, 600]",
                self.round_seconds
            )));
        }
        Ok(())
    }
}

/// One engine's time at one batch size.
#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    /// Median over the rounds.
    pub ms_per_image: f64,
    /// Fastest round.
    pub best_ms_per_image: f64,
    /// Every round, in the order run.
    pub rounds_ms_per_image: Vec<f64>,
    /// Model runs per round (chosen from the warm-up so that a round lasts about --round-time).
    pub runs_per_round: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct BatchRow {
    pub batch: usize,
    pub zq: Timing,
    /// ONNX Runtime's time (absent when it is not available).
    pub ort: Option<Timing>,
    /// zq's median ms per image over ONNX Runtime's (below 1: zq is faster).
    pub ratio: Option<f64>,
    /// Fraction of the batch's inputs on which both engines predict the same class.
    pub agreement: Option<f64>,
}

/// The second engine: ONNX Runtime, or why it is absent.
pub enum Reference<'a> {
    Ort(&'a mut dyn Classifier),
    Missing(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelBenchReport {
    pub model: String,
    /// Whether the model holds QuantizeLinear nodes.
    pub quantized: bool,
    /// zq's engine that ran it: `native` or `zq` (the reference executor).
    pub engine: String,
    /// Threads each engine ran on.
    pub threads: usize,
    /// The model's input per image, [C, H, W].
    pub input: [usize; 3],
    /// Where the inputs came from: the image folder, or `pseudo-random pixels`.
    pub inputs: String,
    /// Why ONNX Runtime was not timed (absent when it was).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ort_missing: Option<String>,
    pub rounds: usize,
    pub batches: Vec<BatchRow>,
}

/// `n` inputs of `chw` in the model's input space: the first images of the folder (spread over
/// it, repeated when it holds fewer), or reproducible pseudo-random pixels in [0, 1], each
/// mapped through the preprocessing.
fn inputs(chw: [usize; 3], n: usize, opts: &ModelBenchOptions) -> Result<(Vec<f32>, String)> {
    let [c, h, w] = chw;
    let norm = opts.pre.per_channel(c)?;
    if let Some(dir) = &opts.data {
        let folder = ImageFolder::open(dir)?;
        let pick = spread(folder.items.len(), Some(n));
        let items: Vec<(PathBuf, usize)> = (0..n)
            .map(|i| folder.items[pick[i % pick.len()]].clone())
            .collect();
        return Ok((
            load_batch(&items, c, h, w, &opts.pre)?,
            dir.display().to_string(),
        ));
    }
    let per_image = c * h * w;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut x = Vec::with_capacity(n * per_image);
    for i in 0..n * per_image {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let pixel = (state >> 40) as f32 / (1u64 << 24) as f32;
        let (mean, std) = norm[(i / (h * w)) % c];
        x.push((pixel - mean) / std);
    }
    Ok((x, "pseudo-random pixels".into()))
}

/// Seconds of `runs` runs of `c` on `x` (the copy each run consumes made outside the clock),
/// and the last run's predictions.
fn timed(c: &mut dyn Classifier, x: &[f32], n: usize, runs: usize) -> Result<(f64, Vec<usize>)> {
    let mut secs = 0.0;
    let mut pred = Vec::new();
    for _ in 0..runs {
        let data = x.to_vec();
        let t = Instant::now();
        pred = c.predict(data, n)?;
        secs += t.elapsed().as_secs_f64();
    }
    if pred.len() != n {
        return Err(Error::Exec(format!(
            "the engine returned {} predictions for a batch of {n}",
            pred.len()
        )));
    }
    Ok((secs, pred))
}

/// Warm up (compile for `n`, two runs, neither counted); returns the runs per round and the
/// predictions.
fn warm_up(
    c: &mut dyn Classifier,
    x: &[f32],
    n: usize,
    round_seconds: f64,
) -> Result<(usize, Vec<usize>)> {
    c.prepare(n)?;
    timed(c, x, n, 1)?;
    let (secs, pred) = timed(c, x, n, 1)?;
    let runs = (round_seconds / secs.max(1e-9)).ceil().clamp(1.0, 1e6) as usize;
    Ok((runs, pred))
}

fn timing(ms: Vec<f64>, runs: usize) -> Timing {
    let mut sorted = ms.clone();
    sorted.sort_by(f64::total_cmp);
    let k = sorted.len();
    let median = if k % 2 == 1 {
        sorted[k / 2]
    } else {
        0.5 * (sorted[k / 2 - 1] + sorted[k / 2])
    };
    Timing {
        ms_per_image: median,
        best_ms_per_image: sorted[0],
        rounds_ms_per_image: ms,
        runs_per_round: runs,
    }
}

/// What `bench_model` needs to know about the model besides its engines.
pub struct ModelInfo {
    pub path: String,
    pub quantized: bool,
    pub engine: String,
    pub threads: usize,
}

/// Time `zq` (and ONNX Runtime, when given) at each batch size. `progress(batch)` is called as
/// each batch size starts.
pub fn bench_model(
    info: ModelInfo,
    zq: &mut dyn Classifier,
    mut reference: Reference<'_>,
    opts: &ModelBenchOptions,
    progress: &mut dyn FnMut(usize),
) -> Result<ModelBenchReport> {
    opts.validate()?;
    let chw = zq.input_chw();
    if let Reference::Ort(o) = &reference {
        if o.input_chw() != chw {
            return Err(Error::Model {
                path: info.path.clone().into(),
                msg: format!(
                    "ONNX Runtime sees inputs of {:?}, zq {:?}",
                    o.input_chw(),
                    chw
                ),
            });
        }
    }
    let largest = *opts.batches.iter().max().expect("validated: not empty");
    let (x, source) = inputs(chw, largest, opts)?;
    let per_image = chw.iter().product::<usize>();
    let mut rows = Vec::new();
    for &n in &opts.batches {
        progress(n);
        let xn = &x[..n * per_image];
        let (zq_runs, zq_pred) = warm_up(zq, xn, n, opts.round_seconds)?;
        let mut ort = match &mut reference {
            Reference::Ort(o) => {
                let (runs, pred) = warm_up(&mut **o, xn, n, opts.round_seconds)?;
                Some((&mut **o, runs, pred, Vec::new()))
            }
            Reference::Missing(_) => None,
        };
        let mut zq_ms = Vec::new();
        let per_round = |secs: f64, runs: usize| 1000.0 * secs / (runs * n) as f64;
        for round in 0..opts.rounds {
            // Alternate which engine goes first, so neither always runs on a cache the other
            // warmed or a machine the other heated.
            let ort_first = round % 2 == 1;
            if ort_first {
                if let Some((o, runs, _, ms)) = ort.as_mut() {
                    ms.push(per_round(timed(&mut **o, xn, n, *runs)?.0, *runs));
                }
            }
            zq_ms.push(per_round(timed(zq, xn, n, zq_runs)?.0, zq_runs));
            if !ort_first {
                if let Some((o, runs, _, ms)) = ort.as_mut() {
                    ms.push(per_round(timed(&mut **o, xn, n, *runs)?.0, *runs));
                }
            }
        }
        let zq_t = timing(zq_ms, zq_runs);
        let (ort_t, agreement) = match ort {
            Some((_, runs, pred, ms)) => {
                let same = pred.iter().zip(&zq_pred).filter(|(a, b)| a == b).count();
                (Some(timing(ms, runs)), Some(same as f64 / n as f64))
            }
            None => (None, None),
        };
        rows.push(BatchRow {
            batch: n,
            ratio: ort_t.as_ref().map(|o| zq_t.ms_per_image / o.ms_per_image),
            zq: zq_t,
            ort: ort_t,
            agreement,
        });
    }
    Ok(ModelBenchReport {
        model: info.path,
        quantized: info.quantized,
        engine: info.engine,
        threads: info.threads,
        input: chw,
        inputs: source,
        ort_missing: match reference {
            Reference::Missing(why) => Some(why),
            Reference::Ort(_) => None,
        },
        rounds: opts.rounds,
        batches: rows,
    })
}
