//! clap definitions, kept apart from the commands that run them (man pages are generated from here).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

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
    #[arg(long, value_name = "M[,M,M]", default_value = "0.485,0.456,0.406")]
    pub mean: String,
    /// Per-channel standard deviation (one value broadcasts). Raw 0..255 models: --mean 0 --std 0.00392156862745098.
    #[arg(long, value_name = "S[,S,S]", default_value = "0.229,0.224,0.225")]
    pub std: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Engine {
    /// zq's own executor.
    Zq,
    /// ONNX Runtime (needs --ort-lib or ZQ_ORT_LIB).
    Ort,
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
    /// Which executor runs the model(s).
    #[arg(long, value_enum, default_value_t = Engine::Zq)]
    pub engine: Engine,
    /// ONNX Runtime shared library (libonnxruntime.so) for --engine ort; default: $ZQ_ORT_LIB.
    #[arg(long, value_name = "PATH")]
    pub ort_lib: Option<PathBuf>,
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
    /// Adam steps per batch.
    #[arg(long, value_name = "I", default_value_t = 500, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub iters: u32,
    /// Adam learning rate (lowered on plateaus).
    #[arg(long, value_name = "LR", default_value_t = 0.5)]
    pub lr: f32,
    /// Random seed: the same seed on the same machine gives a byte-identical output.
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seed: u64,
    /// Also write every image as a PNG into DIR (de-normalised with --mean/--std).
    #[arg(long, value_name = "DIR")]
    pub png: Option<PathBuf>,
    #[command(flatten)]
    pub pre: PreprocessArgs,
}
