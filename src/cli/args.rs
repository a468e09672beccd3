//! clap definitions, kept apart from the commands that run them (man pages are generated from
//! here). Every flag is typed at parse time by a value parser below, so a malformed value is a
//! one-line clap error naming the flag; `settings` turns the parsed flags into the pipelines'
//! options, which validate themselves for library callers too.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::pipeline::quantize::valid_bits;

/// A comma-separated list of numbers (`--mean`, `--std`).
#[derive(Debug, Clone, PartialEq)]
pub struct Floats(pub Vec<f32>);

fn floats(s: &str) -> Result<Floats, String> {
    crate::data::parse_floats(s).map(Floats)
}

/// A weight width: 2..=8 integer bits, or 16 for float16.
fn weight_bits(s: &str) -> Result<u8, String> {
    s.trim()
        .parse::<u8>()
        .ok()
        .filter(|b| valid_bits(*b))
        .ok_or_else(|| format!("'{s}' is not a bit width (2 to 8, or 16 for float16)"))
}

/// `NAME=BITS` for one layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerBits {
    pub name: String,
    pub bits: u8,
}

fn layer_bits(s: &str) -> Result<LayerBits, String> {
    let (name, bits) = s
        .rsplit_once('=')
        .ok_or_else(|| format!("'{s}': expected NAME=BITS"))?;
    Ok(LayerBits {
        name: name.to_string(),
        bits: weight_bits(bits)?,
    })
}

fn layer_abits(s: &str) -> Result<LayerBits, String> {
    let (name, bits) = s
        .rsplit_once('=')
        .ok_or_else(|| format!("'{s}': expected NAME=BITS"))?;
    let bits = bits
        .parse::<u8>()
        .ok()
        .filter(|b| (2..=8).contains(b))
        .ok_or_else(|| format!("'{bits}' is not an activation bit width (2 to 8)"))?;
    Ok(LayerBits {
        name: name.to_string(),
        bits,
    })
}

/// `--refine`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RefineArg {
    None,
    Adaround,
    Genie,
}

/// Candidate widths for `--pareto`, sorted, each once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitList(pub Vec<u8>);

fn bit_list(s: &str) -> Result<BitList, String> {
    let mut bits = s
        .split(',')
        .map(weight_bits)
        .collect::<Result<Vec<_>, _>>()?;
    bits.sort_unstable();
    bits.dedup();
    Ok(BitList(bits))
}

fn abit_list(s: &str) -> Result<BitList, String> {
    let mut bits = s
        .split(',')
        .map(|b| {
            b.trim()
                .parse::<u8>()
                .ok()
                .filter(|b| (2..=8).contains(b))
                .ok_or_else(|| format!("'{b}' is not an activation bit width (2 to 8)"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    bits.sort_unstable();
    bits.dedup();
    Ok(BitList(bits))
}

/// zq: zero-shot (data-free) quantization of ONNX neural networks.
///
/// Exit codes: 0 success, 1 a goal was not met (e.g. a quality gate), 2 bad input or error.
#[derive(Debug, Parser)]
#[command(name = "zq", version, propagate_version = true, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Print a machine-readable JSON report on stdout instead of text.
    #[arg(long, global = true)]
    pub json: bool,

    /// No progress bars or informational messages on stderr.
    #[arg(long, short, global = true)]
    pub quiet: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Describe a model: inputs, outputs, ops, quantizable layers, BatchNormalization layers, sizes.
    Inspect(InspectArgs),
    /// Top-1 accuracy of a model on a labelled image folder (DIR/<class>/*.png|jpg).
    Eval(EvalArgs),
    /// Synthesise calibration images from a model's BatchNormalization statistics (ZeroQ).
    ///
    /// Random images are optimised, inside the valid input box given by --mean/--std, until the
    /// per-channel mean and standard deviation of the activations entering every BatchNormalization
    /// layer match the running statistics stored in it. No training data is needed.
    Distill(DistillArgs),
    /// Quantize a model to int8 (or fewer weight bits) without training data; writes QDQ ONNX.
    ///
    /// BatchNormalization is folded into its convolution, activation ranges are calibrated on
    /// ZeroQ images distilled from the model itself (or --data / --calib-dir), weights are
    /// quantized per output channel, and the result is a standard QuantizeLinear/DequantizeLinear
    /// ONNX model that ONNX Runtime runs with integer kernels. Its agreement with the FP32 model
    /// is estimated on held-out distilled images; --min-agreement / --max-kl turn that estimate
    /// into a gate (exit 1, nothing written).
    Quantize(Box<QuantizeArgs>),
    /// Run a model on tensors from files and write each graph output as OUTDIR/<output name>.npy.
    ///
    /// Inputs are .npy files or ONNX TensorProto .pb files (as ONNX's backend tests store
    /// them), one --input NAME=FILE per graph input, of the declared element type and shape
    /// (symbolic dimensions take the file's size). Integer inputs (shapes, axes, indices,
    /// quantized data, zero points) and scalar float inputs (Clip bounds, Pad values, scales)
    /// are bound as constants before the model is compiled; other float inputs are run-time
    /// tensors. Output names become file names with every character other
    /// than ASCII letters, digits, '-', '_' and '.' (and any leading '.') replaced by '_'.
    /// Outputs are written in their declared element type (int4/uint4 as int8/uint8 arrays;
    /// float16 outputs are refused).
    Run(RunArgs),
    /// Measure zq's integer kernels, or a model on zq's engine against ONNX Runtime.
    ///
    /// Without --model: GOPS of every kernel variant this CPU runs (scalar, AVX2, AVX-512 VNNI)
    /// on real layer shapes, single thread, against the measured VNNI peak.
    ///
    /// With --model FILE: milliseconds per image of that model on zq's engine (the native
    /// engine for a quantized model or a float one its f32 tape covers, else zq's executor) and
    /// on ONNX Runtime, both on --threads threads, at each --batch size: the same inputs for both, two warm-up
    /// runs each not counted, then --rounds rounds that alternate between the engines; the
    /// median round and the ratio zq / ONNX Runtime are reported, and how often both predict the
    /// same class. Without ONNX Runtime (--ort-lib or ZQ_ORT_LIB) zq alone is timed.
    Bench(BenchArgs),
}

/// `NAME=FILE` for one graph input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedFile {
    pub name: String,
    pub file: PathBuf,
}

fn named_file(s: &str) -> Result<NamedFile, String> {
    let (name, file) = s
        .rsplit_once('=')
        .ok_or_else(|| format!("'{s}': expected NAME=FILE"))?;
    if name.is_empty() || file.is_empty() {
        return Err(format!("'{s}': expected NAME=FILE"));
    }
    Ok(NamedFile {
        name: name.to_string(),
        file: PathBuf::from(file),
    })
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The ONNX model.
    pub model: PathBuf,
    /// One graph input: its name and a .npy or ONNX TensorProto .pb file (repeat for each input).
    #[arg(long = "input", short = 'i', value_name = "NAME=FILE", value_parser = named_file)]
    pub inputs: Vec<NamedFile>,
    /// Directory for the outputs, <output name>.npy each (created if missing).
    #[arg(
        long = "output-dir",
        short = 'o',
        value_name = "OUTDIR",
        default_value = "."
    )]
    pub output_dir: PathBuf,
    /// Which executor runs the model [default: native for models with QuantizeLinear, else zq].
    #[arg(long, value_enum)]
    pub engine: Option<Engine>,
    /// ONNX Runtime shared library (libonnxruntime.so) for --engine ort.
    #[arg(long, value_name = "PATH", env = crate::exec::ort::ORT_LIB_ENV)]
    pub ort_lib: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Kernels: only the shapes whose "op shape" text contains S (e.g. conv, depthwise, 3136).
    #[arg(long, value_name = "S", default_value = "", conflicts_with = "model")]
    pub filter: String,
    /// Time this ONNX model (QDQ or float) instead of the kernels.
    #[arg(long, value_name = "FILE")]
    pub model: Option<PathBuf>,
    /// Inputs from this image folder, DIR/<class>/*.{png,jpg} [default: pseudo-random pixels].
    #[arg(long, value_name = "DIR", requires = "model")]
    pub data: Option<PathBuf>,
    /// Per-channel mean after scaling pixels to [0,1] [default: ImageNet's 0.485,0.456,0.406].
    #[arg(long, value_name = "M[,M,M]", value_parser = floats, requires = "model")]
    pub mean: Option<Floats>,
    /// Per-channel standard deviation [default: ImageNet's 0.229,0.224,0.225].
    #[arg(long, value_name = "S[,S,S]", value_parser = floats, requires = "model")]
    pub std: Option<Floats>,
    /// Batch sizes to time, comma-separated (each 1 to 4096).
    #[arg(long, value_name = "B[,B..]", value_parser = batch_list, requires = "model")]
    pub batch: Option<BatchList>,
    /// Timed rounds per engine and batch size [default: 5].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000), requires = "model")]
    pub rounds: Option<u32>,
    /// About how long one round runs, in seconds (at least one run of the model) [default: 0.5].
    #[arg(long = "round-time", value_name = "SECONDS", value_parser = seconds, requires = "model")]
    pub round_time: Option<f64>,
    /// Threads for each engine [default: one per core].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024), requires = "model")]
    pub threads: Option<u32>,
    /// zq's engine to time [default: native for a model with QuantizeLinear or a float model the
    /// native engine's f32 tape covers, else zq].
    #[arg(long, value_enum, requires = "model")]
    pub engine: Option<BenchEngine>,
    /// ONNX Runtime shared library (libonnxruntime.so) [default: $ZQ_ORT_LIB].
    #[arg(long, value_name = "PATH", requires = "model")]
    pub ort_lib: Option<PathBuf>,
}

/// zq's side of `zq bench --model` (ONNX Runtime is always the other).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchEngine {
    /// zq's integer engine.
    Native,
    /// zq's executor.
    Zq,
}

/// Batch sizes for `zq bench --model`, in the order given, each once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchList(pub Vec<usize>);

fn batch_list(s: &str) -> Result<BatchList, String> {
    let mut out: Vec<usize> = Vec::new();
    for part in s.split(',') {
        let b = part
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|b| (1..=crate::pipeline::bench::MAX_BATCH).contains(b))
            .ok_or_else(|| {
                format!(
                    "'{part}' is not a batch size (1 to {})",
                    crate::pipeline::bench::MAX_BATCH
                )
            })?;
        if !out.contains(&b) {
            out.push(b);
        }
    }
    Ok(BatchList(out))
}

/// A duration in seconds, above 0 and at most 600.
fn seconds(s: &str) -> Result<f64, String> {
    s.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v > 0.0 && *v <= 600.0)
        .ok_or_else(|| format!("'{s}' is not a duration in seconds (above 0, at most 600)"))
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The ONNX model.
    pub model: PathBuf,
}

/// How input images map to the model's input space: pixel/255, then (x - mean) / std per channel.
#[derive(Debug, Args, Clone)]
pub struct PreprocessArgs {
    /// Per-channel mean after scaling pixels to [0,1] (one value broadcasts).
    #[arg(long, value_name = "M[,M,M]", default_value = "0.485,0.456,0.406", value_parser = floats)]
    pub mean: Floats,
    /// Per-channel standard deviation (one value broadcasts). Raw 0..255 models: --mean 0 --std 0.00392156862745098.
    #[arg(long, value_name = "S[,S,S]", default_value = "0.229,0.224,0.225", value_parser = floats)]
    pub std: Floats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Engine {
    /// zq's own executor.
    Zq,
    /// ONNX Runtime (needs --ort-lib or ZQ_ORT_LIB).
    Ort,
    /// zq's native engine: QDQ patterns on int8/int4 kernels, NHWC, the rest in float (`zq
    /// eval` and `zq bench` run a float model its f32 tape covers there: BN folded, Winograd and
    /// GEMM convolutions).
    Native,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The ONNX model.
    pub model: PathBuf,
    /// Image folder: DIR/<class>/*.{png,jpg}; classes sorted by name give the label index.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    #[command(flatten)]
    pub pre: PreprocessArgs,
    /// Evaluate N images spread evenly over the folder (every class represented).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Images per batch.
    #[arg(long, value_name = "B", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub batch: u32,
    /// Also run a reference model and report how often both predict the same class.
    #[arg(long, value_name = "REF.onnx")]
    pub compare: Option<PathBuf>,
    /// Which executor runs the model(s) [default: native for models with QuantizeLinear and for
    /// float models the native engine's f32 tape covers, else zq].
    #[arg(long, value_enum)]
    pub engine: Option<Engine>,
    /// ONNX Runtime shared library (libonnxruntime.so) for --engine ort.
    #[arg(long, value_name = "PATH", env = crate::exec::ort::ORT_LIB_ENV)]
    pub ort_lib: Option<PathBuf>,
}

/// Which BatchNormalization statistics distilled images match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatsArg {
    /// Every image's own statistics (ZeroQ): each image is pulled to the average.
    PerSample,
    /// The batch's statistics (DeepInversion/Genie): images differ as real ones do; their
    /// activation tails are close to real data's, which calibration needs.
    Batch,
}

impl From<StatsArg> for zq_synth::zeroq::Stats {
    fn from(s: StatsArg) -> Self {
        match s {
            StatsArg::PerSample => zq_synth::zeroq::Stats::PerSample,
            StatsArg::Batch => zq_synth::zeroq::Stats::Batch,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScheduleArg {
    /// Half a cosine from --lr to zero over the iterations: converged however few there are.
    Cosine,
    /// ZeroQ's reference: tenfold lower after 100 steps without improvement, down to 1e-4.
    Plateau,
}

impl From<ScheduleArg> for zq_synth::zeroq::Schedule {
    fn from(s: ScheduleArg) -> Self {
        match s {
            ScheduleArg::Cosine => zq_synth::zeroq::Schedule::Cosine,
            ScheduleArg::Plateau => zq_synth::zeroq::Schedule::Plateau,
        }
    }
}

#[derive(Debug, Args)]
pub struct DistillArgs {
    /// The ONNX model (it must contain BatchNormalization layers).
    pub model: PathBuf,
    /// Output safetensors file [default: <model stem>.distilled.safetensors beside the model].
    #[arg(long, short, value_name = "OUT.safetensors")]
    pub output: Option<PathBuf>,
    /// Number of images.
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub num: u32,
    /// Images optimised together.
    #[arg(long, value_name = "B", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub batch: u32,
    /// How images are distilled.
    #[arg(long, value_enum, default_value_t = MethodArg::Zeroq)]
    pub method: MethodArg,
    /// Adam steps per batch [default: 500 for zeroq, 100 for genie].
    #[arg(long, value_name = "I", value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub iters: Option<u32>,
    /// Genie: Adam learning rate of the generator (0.95 times lower every 100 steps).
    #[arg(long, value_name = "LR", default_value_t = zq_synth::genie::LR_GENERATOR)]
    pub genie_lr_generator: f32,
    /// Genie: Adam learning rate of the latent codes (tenfold lower after 100 steps without
    /// improvement).
    #[arg(long, value_name = "LR", default_value_t = zq_synth::genie::LR_LATENT)]
    pub genie_lr_latent: f32,
    /// Genie: dimension of the latent codes.
    #[arg(long, value_name = "D", default_value_t = zq_synth::genie::LATENT_DIM as u32, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub genie_latent_dim: u32,
    /// Genie: no swing convolution (strided convolutions then see their input as it is).
    #[arg(long)]
    pub no_swing: bool,
    /// Genie: end the generator at its last BatchNormalization, as the reference does (by default
    /// zq adds a learnable per-channel gain and shift, so the pixels' mean and spread can move).
    #[arg(long)]
    pub genie_no_gain: bool,
    /// ZeroQ: Adam learning rate in pixel units (pixels span [0,1] whatever --mean/--std say; lowered on
    /// plateaus).
    #[arg(long, value_name = "LR", default_value_t = crate::pipeline::distill::DEFAULT_LR)]
    pub lr: f32,
    /// Random seed: the same seed on the same machine gives a byte-identical output.
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seed: u64,
    /// Also write every image as a PNG into DIR (de-normalised with --mean/--std).
    #[arg(long, value_name = "DIR")]
    pub png: Option<PathBuf>,
    /// Which BatchNormalization statistics to match [default: per-sample for zeroq; genie
    /// matches batch statistics only].
    #[arg(long, value_enum)]
    pub stats: Option<StatsArg>,
    /// ZeroQ: how the learning rate falls over the iterations.
    #[arg(long, value_enum, default_value_t = ScheduleArg::Cosine)]
    pub schedule: ScheduleArg,
    #[command(flatten)]
    pub pre: PreprocessArgs,
}

/// How `zq distill` makes images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MethodArg {
    /// ZeroQ: the pixels themselves optimised with projected Adam.
    Zeroq,
    /// Genie-D: a small generator per batch, trained with its latent codes against the batch's
    /// BN statistics, with swing convolution.
    Genie,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Clip {
    /// Scale from the largest weight magnitude.
    Minmax,
    /// Clip the largest magnitudes where that lowers the weight's squared error.
    Mse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Int4Grid {
    /// A zero point per output channel, all 2^bits levels.
    Affine,
    /// Zero point 0, levels -(2^(bits-1) - 1) ..= 2^(bits-1) - 1.
    Symmetric,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AbitsScope {
    /// The inputs of weighted layers (Conv, Gemm, MatMul), as the literature's WxAy counts them;
    /// residual sums, a conv's output before an Add and pooled features stay at 8 bits.
    LayerInputs,
    /// Every quantized activation.
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// QuantizeLinear/DequantizeLinear ONNX that ONNX Runtime runs with integer kernels.
    Onnx,
    /// Packed integer weights (int8, or int4 two per byte), scales and a JSON plan (docs/formats.md).
    Safetensors,
}

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// The ONNX model.
    pub model: PathBuf,
    /// Output file [default: <model stem>.zq.onnx (or .zq.safetensors) beside the model].
    #[arg(long, short, value_name = "OUT")]
    pub output: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Onnx)]
    pub format: Format,
    /// Mixed precision: choose each layer's weight bits on the Pareto frontier of file size vs.
    /// summed sensitivity (KL of the output when only that layer is quantized), within --budget.
    #[arg(long)]
    pub pareto: bool,
    /// Largest output file for --pareto: 4MB, 3.5MiB, 512KB, 200000 (bytes) or 50% (of the FP32 file).
    #[arg(long, value_name = "SIZE", requires = "pareto")]
    pub budget: Option<crate::cli::size::SizeSpec>,
    /// Largest bit-operation count per image for --pareto (sum of MACs x weight bits x the bits
    /// of the layer's input activation), as in ZeroQ and HAWQ-V3; with or without --budget.
    #[arg(long, value_name = "BOPS", requires = "pareto")]
    pub bops_budget: Option<u64>,
    /// Candidate weight bit widths for --pareto (16: float16 storage, for layers too sensitive for 8).
    #[arg(
        long,
        value_name = "B,B,..",
        default_value = "2,4,6,8",
        requires = "pareto",
        value_parser = bit_list
    )]
    pub bits: BitList,
    /// Candidate activation bits of each layer's input for --pareto with --bops-budget (e.g.
    /// 4,8): the search then picks weight and input bits per layer, adding each layer's
    /// activation sensitivity (KL with only that input quantized) to its weight sensitivity.
    /// Without it every layer's input keeps --abits.
    #[arg(long, value_name = "B,B,..", requires = "bops_budget", value_parser = abit_list)]
    pub pareto_abits: Option<BitList>,
    /// Write the whole frontier (bytes, summed sensitivity, per-layer bits) and the chosen point as JSON.
    #[arg(long, value_name = "F.json", requires = "pareto")]
    pub frontier: Option<PathBuf>,
    /// Draw size vs. sensitivity (frontier, uniform-precision points, budget, chosen point) as SVG.
    #[arg(long, value_name = "F.svg", requires = "pareto")]
    pub plot: Option<PathBuf>,
    /// Weight bits for every quantizable layer (2..8, or 16 for float16 storage; 5..8 bits are
    /// stored in int8, 2..4 in INT4).
    #[arg(long, value_name = "BITS", default_value = "8", value_parser = weight_bits)]
    pub wbits: u8,
    /// Activation bits, 2..8 (per-tensor affine: uint4 at opset 21 for 4, uint8 otherwise, widths
    /// other than 8 and 4 behind a Clip to their levels; ONNX Runtime runs integer kernels
    /// only at 8). Below 8, the network input and the last layer's input stay at 8 and the first
    /// and last layers' weights at 8 or more, unless --layer-bits/--layer-abits say otherwise.
    #[arg(long, value_name = "BITS", default_value_t = 8, value_parser = clap::value_parser!(u8).range(2..=8))]
    pub abits: u8,
    /// Which activations --abits applies to: the inputs of weighted layers (the others, such as
    /// residual sums, stay at 8 bits: they hold no weights and cost no storage), or all.
    #[arg(long, value_enum, default_value_t = AbitsScope::LayerInputs)]
    pub abits_scope: AbitsScope,
    /// Activation bits of one layer's input (repeatable), e.g. --layer-abits conv1=8.
    #[arg(long, value_name = "NAME=BITS", value_parser = layer_abits)]
    pub layer_abits: Vec<LayerBits>,
    /// Block-wise reconstruction on the calibration images after rounding to nearest: adaround
    /// (learned rounding), genie (Genie-M: learned rounding and step sizes, QDrop). Keeps the
    /// first/last-layer 8-bit defaults of --abits.
    #[arg(long, value_enum, default_value_t = RefineArg::None)]
    pub refine: RefineArg,
    /// Optimiser steps per block for --refine.
    #[arg(long, value_name = "I", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub refine_iters: u32,
    /// Images per step for --refine.
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub refine_batch: u32,
    /// Adam learning rate of the soft-rounding variables for --refine.
    #[arg(long, value_name = "LR", default_value_t = 1e-2)]
    pub refine_lr: f64,
    /// Adam learning rate of the weight step sizes (--refine genie).
    #[arg(long, value_name = "LR", default_value_t = 1e-4)]
    pub refine_lr_weight_scale: f64,
    /// Adam learning rate of the activation step sizes (--refine genie).
    #[arg(long, value_name = "LR", default_value_t = 4e-4)]
    pub refine_lr_act_scale: f64,
    /// Probability of keeping each activation in float during reconstruction (QDrop) [default:
    /// 0.5 for genie, 0 for adaround].
    #[arg(long, value_name = "P")]
    pub refine_qdrop: Option<f64>,
    /// One scale per weight tensor instead of one per output channel.
    #[arg(long)]
    pub per_tensor: bool,
    /// How weight scales are chosen.
    #[arg(long, value_enum, default_value_t = Clip::Minmax)]
    pub clip: Clip,
    /// Grid of weights stored in INT4 (2..4 bits): affine gives every output channel a zero
    /// point and all 2^bits levels; symmetric keeps zero point 0 and 2^bits - 1 levels. Weights
    /// of 5..8 bits are always symmetric (what integer kernels take).
    #[arg(long, value_enum, default_value_t = Int4Grid::Symmetric)]
    pub int4_grid: Int4Grid,
    /// Weight bits for one layer (repeatable), e.g. --layer-bits conv1=4.
    #[arg(long, value_name = "NAME=BITS", value_parser = layer_bits)]
    pub layer_bits: Vec<LayerBits>,
    /// Leave one layer in float (repeatable).
    #[arg(long, value_name = "NAME")]
    pub keep_float: Vec<String>,
    /// Calibrate on a distilled set written by `zq distill` instead of distilling inline.
    #[arg(long, value_name = "D.safetensors", conflicts_with = "calib_dir")]
    pub data: Option<PathBuf>,
    /// Calibrate on real images DIR/<class>/*.png (for comparison; zq needs none).
    #[arg(long, value_name = "DIR")]
    pub calib_dir: Option<PathBuf>,
    /// Calibration images to distil (or to take from --calib-dir) [default: by input size: 64
    /// up to 64x64 pixels (256 with --refine), 32 above; see the README's defaults table].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub num: Option<u32>,
    /// Distillation iterations per batch [default: by input size: 200 up to 64x64 pixels, 50
    /// above].
    #[arg(long, value_name = "I", value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub iters: Option<u32>,
    /// Which BatchNormalization statistics inline distillation matches (batch: measured on
    /// ResNet-20, calibration as good as real images; per-sample: ZeroQ's, thin tails).
    #[arg(long, value_enum, default_value_t = StatsArg::Batch)]
    pub stats: StatsArg,
    /// Held-out distilled images for the quality estimate (0: skip the estimate) [default: by
    /// input size: 32 up to 64x64 pixels, 16 above].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub holdout: Option<u32>,
    /// Random seed (distillation); the same seed gives the same model.
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seed: u64,
    /// Exit 1 without writing when the estimated argmax agreement with FP32 is below A (0..1).
    #[arg(long, value_name = "A")]
    pub min_agreement: Option<f64>,
    /// Exit 1 without writing when the estimated mean KL divergence from FP32 is above K.
    #[arg(long, value_name = "K")]
    pub max_kl: Option<f64>,
    /// Widen ranges after a folded BatchNormalization to at least beta +- S * |gamma| (0: off;
    /// helps per-sample-statistics calibration data, not batch-statistics data).
    #[arg(long, value_name = "S", default_value_t = 0.0)]
    pub bn_sigmas: f32,
    /// Widen calibrated ranges on the residual stream (Add outputs and their ReLU) by F (1: off).
    #[arg(long, value_name = "F", default_value_t = 1.0)]
    pub residual_widen: f32,
    /// Keep biases as they are (by default each bias absorbs the mean output shift that weight
    /// rounding causes on the calibration images).
    #[arg(long)]
    pub no_bias_correction: bool,
    #[command(flatten)]
    pub pre: PreprocessArgs,
}
