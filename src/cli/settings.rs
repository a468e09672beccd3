//! The settings step: parsed flags (already typed by `args`' value parsers) become the
//! pipelines' options, once, in one place. The options validate themselves (`validate`), so a
//! library caller that builds them directly gets the same one-line errors as the command line.

use crate::data::Preprocess;
use crate::pipeline::{bench, distill, quantize, run};

use super::args::{self, BenchArgs, DistillArgs, PreprocessArgs, QuantizeArgs, RunArgs};

pub fn preprocess(a: &PreprocessArgs) -> Preprocess {
    Preprocess {
        mean: a.mean.0.clone(),
        std: a.std.0.clone(),
    }
}

pub fn distill_options(a: &DistillArgs) -> crate::Result<distill::DistillOptions> {
    let method = match a.method {
        args::MethodArg::Zeroq => distill::Method::ZeroQ,
        args::MethodArg::Genie => distill::Method::Genie,
    };
    let o = distill::DistillOptions {
        num: a.num as usize,
        batch: a.batch.min(a.num) as usize,
        iters: a.iters.unwrap_or(match method {
            distill::Method::ZeroQ => distill::DEFAULT_ITERS_ZEROQ,
            distill::Method::Genie => distill::DEFAULT_ITERS_GENIE,
        }) as usize,
        lr: a.lr,
        seed: a.seed,
        pre: preprocess(&a.pre),
        stats: match (a.stats, method) {
            (Some(s), _) => s.into(),
            (None, distill::Method::ZeroQ) => zq_synth::zeroq::Stats::PerSample,
            (None, distill::Method::Genie) => zq_synth::zeroq::Stats::Batch,
        },
        schedule: a.schedule.into(),
        method,
        genie: distill::GenieOptions {
            lr_generator: a.genie_lr_generator,
            lr_latent: a.genie_lr_latent,
            latent_dim: a.genie_latent_dim as usize,
            swing: !a.no_swing,
            output_gain: !a.genie_no_gain,
        },
    };
    o.validate()?;
    Ok(o)
}

/// `zq quantize`'s options; `model_file_bytes` resolves a percentage `--budget`.
/// `pixels` is the model input's H x W, which sizes the distillation defaults.
pub fn quantize_options(
    a: &QuantizeArgs,
    model_file_bytes: u64,
    pixels: usize,
) -> quantize::QuantizeOptions {
    let d = if a.refine == args::RefineArg::None {
        quantize::calibrate::Budget::for_pixels(pixels)
    } else {
        quantize::calibrate::Budget::for_refinement(pixels)
    };
    let num = a.num.map_or(d.num, |v| v as usize);
    let iters = a.iters.map_or(d.iters, |v| v as usize);
    let calib = match (&a.data, &a.calib_dir) {
        (Some(d), _) => quantize::Calib::File(d.clone()),
        (None, Some(dir)) => quantize::Calib::Images {
            dir: dir.clone(),
            num,
        },
        (None, None) => quantize::Calib::Distill {
            num,
            iters,
            stats: a.stats.into(),
        },
    };
    let refine = |m| {
        let d = zq_quant::refine::RefineOptions::new(m, a.seed);
        zq_quant::refine::RefineOptions {
            iters: a.refine_iters as usize,
            batch: a.refine_batch as usize,
            lr_round: a.refine_lr,
            lr_weight_scale: a.refine_lr_weight_scale,
            lr_act_scale: a.refine_lr_act_scale,
            qdrop: a.refine_qdrop.unwrap_or(d.qdrop),
            ..d
        }
    };
    quantize::QuantizeOptions {
        wbits: a.wbits,
        abits: a.abits,
        abits_scope: match a.abits_scope {
            args::AbitsScope::LayerInputs => quantize::AbitsScope::LayerInputs,
            args::AbitsScope::All => quantize::AbitsScope::All,
        },
        layer_abits: a
            .layer_abits
            .iter()
            .map(|l| (l.name.clone(), l.bits))
            .collect(),
        refine: match a.refine {
            args::RefineArg::None => None,
            args::RefineArg::Adaround => Some(refine(zq_quant::refine::Method::AdaRound)),
            args::RefineArg::Genie => Some(refine(zq_quant::refine::Method::Genie)),
        },
        per_tensor: a.per_tensor,
        clip: match a.clip {
            args::Clip::Minmax => zq_quant::ClipSearch::MinMax,
            args::Clip::Mse => zq_quant::ClipSearch::Mse,
        },
        int4_grid: match a.int4_grid {
            args::Int4Grid::Affine => zq_quant::Grid::Affine,
            args::Int4Grid::Symmetric => zq_quant::Grid::Symmetric,
        },
        layer_bits: a
            .layer_bits
            .iter()
            .map(|l| (l.name.clone(), l.bits))
            .collect(),
        keep_float: a.keep_float.iter().cloned().collect(),
        calib,
        holdout: a.holdout.map_or(d.holdout, |v| v as usize),
        holdout_iters: iters,
        holdout_stats: a.stats.into(),
        seed: a.seed,
        pre: preprocess(&a.pre),
        bn_sigmas: a.bn_sigmas,
        residual_widen: a.residual_widen,
        bias_correction: !a.no_bias_correction,
        pareto: a.pareto.then(|| quantize::ParetoOptions {
            budget: a.budget.map_or(u64::MAX, |b| b.resolve(model_file_bytes)),
            bops_budget: a.bops_budget,
            bits: a.bits.0.clone(),
            abits: a.pareto_abits.as_ref().map_or(Vec::new(), |b| b.0.clone()),
        }),
        format: match a.format {
            args::Format::Onnx => quantize::OutputFormat::Onnx,
            args::Format::Safetensors => quantize::OutputFormat::Safetensors,
        },
        gate: quantize::Gate {
            min_agreement: a.min_agreement,
            max_kl: a.max_kl,
        },
    }
}

pub fn engine(e: args::Engine) -> run::Engine {
    match e {
        args::Engine::Zq => run::Engine::Zq,
        args::Engine::Native => run::Engine::Native,
        args::Engine::Ort => run::Engine::Ort,
    }
}

/// `zq run`'s options (each input name once, the output directory not a file).
pub fn run_options(a: &RunArgs) -> crate::Result<run::RunOptions> {
    let o = run::RunOptions {
        inputs: a
            .inputs
            .iter()
            .map(|i| (i.name.clone(), i.file.clone()))
            .collect(),
        out_dir: a.output_dir.clone(),
        engine: a.engine.map(engine),
        ort_lib: a.ort_lib.clone(),
    };
    o.validate()?;
    Ok(o)
}

/// `zq bench --model`'s options (the flags not given take their documented defaults).
pub fn model_bench_options(a: &BenchArgs) -> crate::Result<bench::ModelBenchOptions> {
    let imagenet = Preprocess::imagenet();
    let o = bench::ModelBenchOptions {
        batches: a.batch.as_ref().map_or(vec![1, 64], |b| b.0.clone()),
        rounds: a.rounds.map_or(5, |r| r as usize),
        round_seconds: a.round_time.unwrap_or(0.5),
        data: a.data.clone(),
        pre: Preprocess {
            mean: a.mean.as_ref().map_or(imagenet.mean, |m| m.0.clone()),
            std: a.std.as_ref().map_or(imagenet.std, |s| s.0.clone()),
        },
    };
    o.validate()?;
    Ok(o)
}
