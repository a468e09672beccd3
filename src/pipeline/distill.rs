//! `zq distill`: ZeroQ or Genie-D synthetic calibration images for a BatchNormalization model, in batches,
//! written as safetensors (and optionally PNGs) with everything needed to reproduce them.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use zq_synth::{genie, zeroq, TapGrad, TapModel};

use crate::adapters::synth::PlanTaps;
use crate::data::Preprocess;
use crate::error::{Error, Result};
use crate::ir::Graph;

/// What to distil.
#[derive(Debug, Clone)]
pub struct DistillOptions {
    /// Number of images.
    pub num: usize,
    /// Images optimised together (the BN loss uses per-sample statistics, so batches are
    /// independent; the batch size only trades memory for speed).
    pub batch: usize,
    pub iters: usize,
    pub lr: f32,
    pub seed: u64,
    /// The model's preprocessing: it defines the valid input box.
    pub pre: Preprocess,
    /// Per-sample (ZeroQ) or batch BatchNormalization statistics.
    pub stats: zeroq::Stats,
    /// How the learning rate falls (ZeroQ).
    pub schedule: zeroq::Schedule,
    /// ZeroQ (pixels optimised directly) or Genie-D (a generator trained with its latents).
    pub method: Method,
    /// Genie-D's settings (used with [`Method::Genie`]).
    pub genie: GenieOptions,
}

/// How images are distilled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Method {
    /// ZeroQ: pixels optimised with projected Adam.
    #[default]
    ZeroQ,
    /// Genie-D: a per-batch generator and its latents trained against the batch BN statistics,
    /// with swing convolution.
    Genie,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::ZeroQ => "zeroq",
            Method::Genie => "genie",
        }
    }
}

/// Genie-D's hyper-parameters (the reference's by default).
#[derive(Debug, Clone, PartialEq)]
pub struct GenieOptions {
    pub lr_generator: f32,
    pub lr_latent: f32,
    pub latent_dim: usize,
    /// Swing convolution on the model's strided convolutions.
    pub swing: bool,
    /// A learnable per-channel gain and shift at the generator's end (zq's addition).
    pub output_gain: bool,
}

impl Default for GenieOptions {
    fn default() -> Self {
        GenieOptions {
            lr_generator: genie::LR_GENERATOR,
            lr_latent: genie::LR_LATENT,
            latent_dim: genie::LATENT_DIM,
            swing: true,
            output_gain: true,
        }
    }
}

impl DistillOptions {
    /// Check the numbers a user typed, naming the flag.
    pub fn validate(&self) -> Result<()> {
        if self.num == 0 {
            return Err(Error::Usage("--num must be at least 1".into()));
        }
        if self.batch == 0 {
            return Err(Error::Usage("--batch must be at least 1".into()));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::Usage(format!(
                "--lr must be a positive number, got {}",
                self.lr
            )));
        }
        for (flag, v) in [
            ("--genie-lr-generator", self.genie.lr_generator),
            ("--genie-lr-latent", self.genie.lr_latent),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(Error::Usage(format!(
                    "{flag} must be a positive number, got {v}"
                )));
            }
        }
        if self.genie.latent_dim == 0 {
            return Err(Error::Usage("--genie-latent-dim must be at least 1".into()));
        }
        if self.method == Method::Genie && self.stats != zeroq::Stats::Batch {
            return Err(Error::Usage(
                "--method genie matches batch statistics: leave --stats out or say --stats batch"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// Adam's initial learning rate, in pixel units (ZeroQ's reference uses 0.5 on inputs normalised
/// by a std of about 0.25, which is this on pixels).
pub const DEFAULT_LR: f32 = 0.125;

/// Steps per batch when `--iters` is not given.
pub const DEFAULT_ITERS_ZEROQ: u32 = 500;
pub const DEFAULT_ITERS_GENIE: u32 = 100;

/// One BatchNormalization layer's share of the loss (averaged over all images).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LayerLoss {
    pub name: String,
    pub loss_final: f32,
    pub loss_noise: f32,
}

/// Reproducible facts of a run: what went in and the losses that came out. Stored in the output's
/// header, so it holds nothing that varies between identical runs (no timings).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DistillMeta {
    pub format: &'static str,
    pub zq_version: &'static str,
    pub model: String,
    pub model_sha256: String,
    pub shape: [usize; 4],
    pub num: usize,
    pub batch: usize,
    pub iters: usize,
    pub lr: f32,
    pub seed: u64,
    /// "per-sample" (ZeroQ) or "batch": which statistics the losses below match.
    pub stats: &'static str,
    /// "plateau" (ZeroQ's) or "cosine": how the learning rate fell.
    pub schedule: &'static str,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// Per-channel valid input box [lo, hi]: pixels 0 and 1 mapped through the preprocessing.
    pub bounds: Vec<[f32; 2]>,
    /// Sum over BN layers of the ZeroQ statistic loss, averaged over images.
    pub bn_loss_initial: f32,
    pub bn_loss_final: f32,
    /// The same loss for Gaussian noise of the same shape (pixels `N(0.5, 0.25)` through the
    /// preprocessing: the usual yardstick, independent of the input convention).
    pub bn_loss_noise: f32,
    pub layers: Vec<LayerLoss>,
    /// "zeroq" or "genie".
    pub method: &'static str,
    /// Genie-D's settings and whether swing convolution ran (absent for ZeroQ).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub genie: Option<GenieMeta>,
}

/// What a Genie-D run used.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GenieMeta {
    pub lr_generator: f32,
    pub lr_latent: f32,
    pub latent_dim: usize,
    /// Whether swing convolution ran: "on (K strided convolutions)", or "off: <why>".
    pub swing: String,
    /// Whether the generator ended in a learnable per-channel gain and shift.
    pub output_gain: bool,
}

/// The report's words for a run's swing convolution.
fn swing_words(s: genie::Swing) -> String {
    match s {
        genie::Swing::On(k) => format!("on ({k} strided convolutions)"),
        genie::Swing::NoStridedConv => "off: the model has no strided convolution".into(),
        genie::Swing::Unsupported => {
            "off: not supported by the autograd engine (the tape does not run this model)".into()
        }
        genie::Swing::Off => "off: --no-swing".into(),
    }
}

/// The images, NCHW in the model's input space, with their metadata.
pub struct Distilled {
    pub images: Vec<f32>,
    pub meta: DistillMeta,
    pub seconds: f64,
    /// The engine that computed the gradients (`tape`, or `autograd (reason)`).
    pub engine: String,
}

/// Identifies the tensor layout and metadata version of distilled-data files.
pub const FORMAT: &str = "zq.distilled.v2";

/// The valid input box per channel: pixel values 0 and 1 through `(p - mean) / std`.
pub fn input_box(pc: &[(f32, f32)]) -> Vec<(f32, f32)> {
    pc.iter()
        .map(|&(m, s)| {
            let (a, b) = ((0.0 - m) / s, (1.0 - m) / s);
            (a.min(b), a.max(b))
        })
        .collect()
}

/// 2^64 / golden ratio: consecutive batches' seeds land far apart (Fibonacci hashing).
const BATCH_SEED_STEP: u64 = 0x9E37_79B9_7F4A_7C15;

/// The Gaussian-noise reference is drawn from a stream of its own ("noise!" in ASCII), so the
/// same `--seed` never gives the noise the images started from.
const NOISE_SEED_XOR: u64 = 0x6E6F_6973_6521;

/// The seed of batch `b`: distinct streams per batch, fixed by the run's seed.
fn batch_seed(seed: u64, b: usize) -> u64 {
    seed.wrapping_add((b as u64).wrapping_mul(BATCH_SEED_STEP))
}

/// SHA-256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Distil `opts.num` images for `g` (read from `path`). `progress(done, total, loss)` is called
/// after every optimisation step, counted over all batches.
pub fn distill(
    g: &Graph,
    path: &Path,
    opts: &DistillOptions,
    progress: &mut dyn FnMut(usize, usize, f32),
) -> Result<Distilled> {
    opts.validate()?;
    let t0 = Instant::now();
    let [c, h, w] = crate::pipeline::eval::chw_of(g, path)?;
    if crate::ir::passes::checked_elements(&[opts.num, c, h, w]).is_none() {
        return Err(Error::Usage(format!(
            "--num {}: {} images of [{c}, {h}, {w}] are more than {} values",
            opts.num,
            opts.num,
            crate::ir::passes::MAX_ELEMENTS
        )));
    }
    let pc = opts.pre.per_channel(c)?;
    let bounds = input_box(&pc);
    let map = zeroq::PixelMap {
        channels: pc.clone(),
        hw: h * w,
    };
    let model_sha256 = sha256_file(path)?;
    let nb = opts.num.div_ceil(opts.batch);
    let total_steps = nb * opts.iters;
    let mut images = Vec::with_capacity(opts.num * c * h * w);
    let (mut l0, mut l1, mut ln) = (0f64, 0f64, 0f64);
    let mut layers: Vec<LayerLoss> = Vec::new();
    let mut plan: Option<PlanTaps> = None;
    let mut engine_name = String::new();
    let mut swing: Option<genie::Swing> = None;
    for b in 0..nb {
        let size = opts.batch.min(opts.num - b * opts.batch);
        if plan.as_ref().map(|p| p.input_shape()[0]) != Some(size) {
            plan = Some(PlanTaps::new(g, size)?);
        }
        let tm = plan.as_ref().unwrap();
        if layers.is_empty() {
            layers = tm
                .bn_targets()
                .iter()
                .map(|t| LayerLoss {
                    name: t.name.clone(),
                    loss_final: 0.0,
                    loss_noise: 0.0,
                })
                .collect();
        }
        let done = b * opts.iters;
        let (mut engine, name) = tm.engine_named();
        engine_name = name;
        let mut step = |i: usize, l: f32| progress(done + i, total_steps, l);
        let r = match opts.method {
            Method::ZeroQ => {
                let cfg = zeroq::ZeroQConfig {
                    iters: opts.iters,
                    lr: opts.lr,
                    seed: batch_seed(opts.seed, b),
                    map: map.clone(),
                    stats: opts.stats,
                    schedule: opts.schedule,
                };
                zeroq::distill(&mut *engine, &cfg, &mut step)?
            }
            Method::Genie => {
                let cfg = genie::GenieConfig {
                    iters: opts.iters,
                    lr_generator: opts.genie.lr_generator,
                    lr_latent: opts.genie.lr_latent,
                    latent_dim: opts.genie.latent_dim,
                    seed: batch_seed(opts.seed, b),
                    map: map.clone(),
                    swing: opts.genie.swing,
                    output_gain: opts.genie.output_gain,
                };
                let r = genie::distill(&mut *engine, &cfg, &mut step)?;
                swing = Some(r.swing);
                r.distilled
            }
        };
        let noise = noise_loss(
            &mut *engine,
            &map,
            batch_seed(opts.seed ^ NOISE_SEED_XOR, b),
            opts.stats,
        )?;
        // Each batch's loss is a mean over its images: weight by size for the mean over all.
        let wgt = size as f64 / opts.num as f64;
        l0 += wgt * f64::from(r.bn_loss_initial);
        l1 += wgt * f64::from(r.bn_loss_final);
        ln += wgt * noise.iter().map(|&v| f64::from(v)).sum::<f64>();
        for (k, l) in layers.iter_mut().enumerate() {
            l.loss_final += (wgt * f64::from(r.per_layer[k])) as f32;
            l.loss_noise += (wgt * f64::from(noise[k])) as f32;
        }
        images.extend_from_slice(&r.images);
    }
    let meta = DistillMeta {
        format: FORMAT,
        zq_version: env!("CARGO_PKG_VERSION"),
        model: path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
        model_sha256,
        shape: [opts.num, c, h, w],
        num: opts.num,
        batch: opts.batch,
        iters: opts.iters,
        lr: opts.lr,
        seed: opts.seed,
        stats: opts.stats.name(),
        schedule: opts.schedule.name(),
        mean: pc.iter().map(|p| p.0).collect(),
        std: pc.iter().map(|p| p.1).collect(),
        bounds: bounds.iter().map(|&(a, b)| [a, b]).collect(),
        bn_loss_initial: l0 as f32,
        bn_loss_final: l1 as f32,
        bn_loss_noise: ln as f32,
        layers,
        method: opts.method.name(),
        genie: swing.map(|sw| GenieMeta {
            lr_generator: opts.genie.lr_generator,
            lr_latent: opts.genie.lr_latent,
            latent_dim: opts.genie.latent_dim,
            swing: swing_words(sw),
            output_gain: opts.genie.output_gain,
        }),
    };
    Ok(Distilled {
        images,
        meta,
        seconds: t0.elapsed().as_secs_f64(),
        engine: engine_name,
    })
}

/// Per-layer BN loss of Gaussian pixel noise (`N(0.5, 0.25)`, mapped through the preprocessing)
/// shaped like the model's input batch: the same yardstick whatever the input convention.
fn noise_loss(
    engine: &mut dyn TapGrad,
    map: &zeroq::PixelMap,
    seed: u64,
    stats: zeroq::Stats,
) -> Result<Vec<f32>> {
    let n = engine.input_shape().iter().product();
    let p = zeroq::PixelMap::noise(n, seed);
    let (_, per, _) = zeroq::loss_and_grad(engine, &p, map, stats, false)?;
    Ok(per)
}

/// The safetensors bytes: tensor `images` [N, C, H, W] f32 and one metadata entry, `zq`, holding
/// the JSON of [`DistillMeta`] (one key, so the header is byte-for-byte reproducible).
pub fn to_safetensors(d: &Distilled) -> Result<Vec<u8>> {
    let bytes: Vec<u8> = d.images.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(
        safetensors::Dtype::F32,
        d.meta.shape.to_vec(),
        &bytes,
    )
    .map_err(|e| Error::Exec(format!("safetensors: {e}")))?;
    let meta = serde_json::to_string(&d.meta).map_err(|e| Error::Exec(e.to_string()))?;
    let header = std::collections::HashMap::from([("zq".to_string(), meta)]);
    safetensors::tensor::serialize([("images", view)], Some(header))
        .map_err(|e| Error::Exec(format!("safetensors: {e}")))
}

/// A distilled set read back: images [N, C, H, W] and the metadata JSON (if zq wrote it).
pub struct DistilledFile {
    pub images: Vec<f32>,
    pub shape: [usize; 4],
    pub meta: Option<serde_json::Value>,
}

/// Read a distilled set (or any safetensors file with an f32 `images` [N, C, H, W] tensor).
pub fn read_distilled(path: &Path) -> Result<DistilledFile> {
    let bad = |msg: String| Error::Model {
        path: path.to_path_buf(),
        msg,
    };
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let t = st
        .tensor("images")
        .map_err(|_| bad("has no tensor 'images' (expected one written by zq distill)".into()))?;
    if t.dtype() != safetensors::Dtype::F32 || t.shape().len() != 4 {
        return Err(bad(format!(
            "tensor 'images' must be f32 [N, C, H, W], it is {:?} {:?}",
            t.dtype(),
            t.shape()
        )));
    }
    let s = t.shape();
    let images: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if images.iter().any(|v| !v.is_finite()) {
        return Err(bad("tensor 'images' holds NaN or infinite values".into()));
    }
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let meta = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("zq"))
        .and_then(|j| serde_json::from_str(j).ok());
    Ok(DistilledFile {
        images,
        shape: [s[0], s[1], s[2], s[3]],
        meta,
    })
}

/// Write each image as `DIR/NNNNN.png`, de-normalised with the preprocessing (1 or 3 channels).
pub fn write_pngs(d: &Distilled, dir: &Path) -> Result<Vec<PathBuf>> {
    use image::ImageEncoder;
    let [n, c, h, w] = d.meta.shape;
    if c != 1 && c != 3 {
        return Err(Error::Usage(format!(
            "--png writes 1- or 3-channel images; the model input has {c} channels"
        )));
    }
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let hw = h * w;
    let digits = n.to_string().len().max(4);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let img = &d.images[i * c * hw..(i + 1) * c * hw];
        let mut px = vec![0u8; c * hw];
        for ch in 0..c {
            let (m, s) = (d.meta.mean[ch], d.meta.std[ch]);
            for p in 0..hw {
                let v = (img[ch * hw + p] * s + m) * 255.0;
                px[p * c + ch] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
        let mut buf = Vec::new();
        let color = if c == 1 {
            image::ExtendedColorType::L8
        } else {
            image::ExtendedColorType::Rgb8
        };
        image::codecs::png::PngEncoder::new(&mut buf)
            .write_image(&px, w as u32, h as u32, color)
            .map_err(|e| Error::Exec(format!("PNG encoding: {e}")))?;
        let p = dir.join(format!("{i:0digits$}.png"));
        crate::onnx::write::write_atomic(&p, &buf)?;
        out.push(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_from_preprocessing() {
        let b = input_box(&[(0.5, 0.5), (0.0, -2.0)]);
        assert_eq!(b, vec![(-1.0, 1.0), (-0.5, 0.0)]);
    }

    #[test]
    fn batch_seeds_differ() {
        let s: std::collections::HashSet<u64> = (0..100).map(|b| batch_seed(7, b)).collect();
        assert_eq!(s.len(), 100);
        assert_eq!(batch_seed(7, 0), 7);
    }
}
