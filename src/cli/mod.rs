//! The command line: argument definitions (`args`), one function per command, and the printer.

pub mod args;
pub mod man;
pub mod printer;
pub mod size;

use std::process::ExitCode;

use anyhow::Context;

use crate::data::{parse_floats, Preprocess};
use crate::pipeline::{distill, eval, inspect, quantize};
use args::{
    Cli, Command, DistillArgs, Engine, EvalArgs, InspectArgs, PreprocessArgs, QuantizeArgs,
};
use printer::Printer;

/// Run a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let p = Printer::new(cli.json, cli.quiet);
    match cli.command {
        Command::Inspect(a) => cmd_inspect(&p, a),
        Command::Eval(a) => cmd_eval(&p, a),
        Command::Distill(a) => cmd_distill(&p, a),
        Command::Quantize(a) => cmd_quantize(&p, a),
    }
}

pub fn preprocess(a: &PreprocessArgs) -> anyhow::Result<Preprocess> {
    let mean = parse_floats(&a.mean).map_err(|e| anyhow::anyhow!("--mean: {e}"))?;
    let std = parse_floats(&a.std).map_err(|e| anyhow::anyhow!("--std: {e}"))?;
    Ok(Preprocess { mean, std })
}

fn cmd_inspect(p: &Printer, a: InspectArgs) -> anyhow::Result<ExitCode> {
    let r = inspect::inspect(&a.model)?;
    if p.json {
        p.json(&r)?;
    } else {
        printer::print_inspect(&r);
    }
    Ok(ExitCode::SUCCESS)
}

/// Open `path` with `engine`; without one, quantized models (QuantizeLinear present) run on the
/// native engine and float models on zq's. Returns the engine used.
fn open(
    engine: Option<Engine>,
    path: &std::path::Path,
    lib: Option<&std::path::Path>,
) -> anyhow::Result<(Box<dyn eval::Classifier>, Engine)> {
    Ok(match engine {
        Some(Engine::Zq) => (Box::new(eval::ZqClassifier::open(path)?), Engine::Zq),
        Some(Engine::Ort) => (Box::new(eval::OrtClassifier::open(path, lib)?), Engine::Ort),
        Some(Engine::Native) => (
            Box::new(eval::NativeClassifier::open(path)?),
            Engine::Native,
        ),
        None => {
            let g = crate::onnx::read_model(path)?.graph;
            if eval::is_quantized(&g) {
                (
                    Box::new(eval::NativeClassifier::new(g, path)?),
                    Engine::Native,
                )
            } else {
                (Box::new(eval::ZqClassifier::new(g, path)?), Engine::Zq)
            }
        }
    })
}

fn cmd_eval(p: &Printer, a: EvalArgs) -> anyhow::Result<ExitCode> {
    let pre = preprocess(&a.pre)?;
    let lib = a.ort_lib.as_deref();
    let (mut model, engine) = open(a.engine, &a.model, lib)?;
    let mut reference = match &a.compare {
        Some(r) => Some(open(a.engine, r, lib).with_context(|| "--compare")?.0),
        None => None,
    };
    if let Some(0) = a.limit {
        anyhow::bail!("--limit must be at least 1");
    }
    let opts = eval::EvalOptions {
        data: a.data.clone(),
        pre: pre.clone(),
        limit: a.limit,
        batch: a.batch as usize,
    };
    let bar = std::cell::RefCell::new(None);
    let t = std::time::Instant::now();
    let counts = eval::eval(
        model.as_mut(),
        reference
            .as_mut()
            .map(|r| r.as_mut() as &mut dyn eval::Classifier),
        &opts,
        &mut |total| *bar.borrow_mut() = Some(p.progress(total as u64, "images")),
        &mut |k| {
            if let Some(b) = bar.borrow().as_ref() {
                b.inc(k as u64)
            }
        },
    )?;
    if let Some(b) = bar.borrow_mut().take() {
        b.finish_and_clear();
    }
    let seconds = t.elapsed().as_secs_f64();
    let ratio = |k: usize| {
        if counts.n == 0 {
            0.0
        } else {
            k as f64 / counts.n as f64
        }
    };
    let c = model.input_chw()[0];
    let pc = pre.per_channel(c)?;
    let r = eval::EvalReport {
        model: a.model.display().to_string(),
        data: a.data.display().to_string(),
        engine: format!("{engine:?}").to_lowercase(),
        n: counts.n,
        correct: counts.correct,
        top1: ratio(counts.correct),
        classes: counts.classes,
        ms_per_image: 1000.0 * counts.model_seconds / counts.n.max(1) as f64,
        seconds,
        reference: a.compare.as_ref().map(|r| r.display().to_string()),
        reference_top1: counts.reference.map(|(_, rc)| ratio(rc)),
        agreement: counts.reference.map(|(ag, _)| ratio(ag)),
        mean: pc.iter().map(|x| x.0).collect(),
        std: pc.iter().map(|x| x.1).collect(),
    };
    if p.json {
        p.json(&r)?;
    } else {
        println!(
            "{}: top-1 {:.2}% ({} / {} images, {} classes), {:.3} ms/image ({})",
            r.model,
            100.0 * r.top1,
            r.correct,
            r.n,
            r.classes,
            r.ms_per_image,
            r.engine
        );
        if let (Some(rf), Some(rt), Some(ag)) = (&r.reference, r.reference_top1, r.agreement) {
            println!(
                "{rf}: top-1 {:.2}%; agreement with the model {:.2}%",
                100.0 * rt,
                100.0 * ag
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `<model dir>/<model stem><suffix>`: the default output beside the model.
pub fn beside(model: &std::path::Path, suffix: &str) -> std::path::PathBuf {
    let stem = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    model.with_file_name(format!("{stem}{suffix}"))
}

/// Make sure `out` can be written before spending minutes on it: its parent directory exists (or
/// is created) and `out` is not a directory.
pub fn prepare_output(out: &std::path::Path, flag: &str) -> anyhow::Result<()> {
    if out.is_dir() {
        anyhow::bail!("{flag} {} is a directory; give a file name", out.display());
    }
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{flag}: cannot create directory {}", dir.display()))?;
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct DistillReport {
    output: String,
    png_dir: Option<String>,
    #[serde(flatten)]
    meta: distill::DistillMeta,
    /// bn_loss_final / bn_loss_noise.
    ratio_to_noise: f32,
    seconds: f64,
    /// Steady-state time of one optimisation step (the first step, which warms up, excluded).
    seconds_per_iter: f64,
    /// What computed the gradients: `tape`, or `autograd (<op the tape does not run>)`.
    engine: String,
}

fn cmd_distill(p: &Printer, a: DistillArgs) -> anyhow::Result<ExitCode> {
    let pre = preprocess(&a.pre)?;
    let opts = distill::DistillOptions {
        num: a.num as usize,
        batch: a.batch.min(a.num) as usize,
        iters: a.iters as usize,
        lr: a.lr,
        seed: a.seed,
        pre,
        stats: a.stats.into(),
    };
    opts.validate()?;
    let out = a
        .output
        .clone()
        .unwrap_or_else(|| beside(&a.model, ".distilled.safetensors"));
    prepare_output(&out, "-o")?;
    if let Some(d) = &a.png {
        if d.exists() && !d.is_dir() {
            anyhow::bail!("--png {} exists and is not a directory", d.display());
        }
    }
    let model = crate::onnx::read_model(&a.model)?;
    let mut bar = p.stages();
    // Steady-state time per step: from the end of the first step to the end of the last.
    let mut first_last: (Option<std::time::Instant>, Option<std::time::Instant>) = (None, None);
    let d = distill::distill(&model.graph, &a.model, &opts, &mut |done, total, loss| {
        let now = std::time::Instant::now();
        first_last.0.get_or_insert(now);
        first_last.1 = Some(now);
        bar.update("distilling", done, total, &format!("loss {loss:.4}"));
    })?;
    drop(bar);
    let bytes = distill::to_safetensors(&d)?;
    if let Some(dir) = &a.png {
        distill::write_pngs(&d, dir)?;
    }
    crate::onnx::write::write_atomic(&out, &bytes)?;
    let steps = opts.iters * opts.num.div_ceil(opts.batch);
    let seconds_per_iter = match first_last {
        (Some(a), Some(b)) if steps > 1 => (b - a).as_secs_f64() / (steps - 1) as f64,
        _ => d.seconds / steps.max(1) as f64,
    };
    let r = DistillReport {
        output: out.display().to_string(),
        png_dir: a.png.as_ref().map(|d| d.display().to_string()),
        ratio_to_noise: d.meta.bn_loss_final / d.meta.bn_loss_noise,
        seconds: d.seconds,
        seconds_per_iter,
        meta: d.meta,
        engine: d.engine,
    };
    if p.json {
        p.json(&r)?;
    } else {
        println!(
            "{}: {} images {:?}, BN loss {:.4} -> {:.4} ({:.4}x Gaussian noise), {:.1} s ({:.3} s/step)",
            r.output,
            r.meta.num,
            r.meta.shape,
            r.meta.bn_loss_initial,
            r.meta.bn_loss_final,
            r.ratio_to_noise,
            r.seconds,
            r.seconds_per_iter
        );
        if let Some(d) = &r.png_dir {
            println!("PNGs in {d}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(serde::Serialize)]
struct QuantizeSummary {
    output: Option<String>,
    /// false when a gate refused the result (nothing was written).
    written: bool,
    file_bytes: Option<u64>,
    #[serde(flatten)]
    report: quantize::QuantizeReport,
    seconds: f64,
}

fn cmd_quantize(p: &Printer, a: QuantizeArgs) -> anyhow::Result<ExitCode> {
    let t0 = std::time::Instant::now();
    let pre = preprocess(&a.pre)?;
    let mut layer_bits = std::collections::BTreeMap::new();
    for lb in &a.layer_bits {
        let (name, bits) = lb
            .rsplit_once('=')
            .ok_or_else(|| anyhow::anyhow!("--layer-bits {lb}: expected NAME=BITS"))?;
        let bits: u8 = bits
            .parse()
            .map_err(|_| anyhow::anyhow!("--layer-bits {lb}: '{bits}' is not a bit width"))?;
        layer_bits.insert(name.to_string(), bits);
    }
    let out = a.output.clone().unwrap_or_else(|| {
        beside(
            &a.model,
            match a.format {
                args::Format::Onnx => ".zq.onnx",
                args::Format::Safetensors => ".zq.safetensors",
            },
        )
    });
    prepare_output(&out, "-o")?;
    let calib = match (&a.data, &a.calib_dir) {
        (Some(d), _) => quantize::Calib::File(d.clone()),
        (None, Some(dir)) => quantize::Calib::Images {
            dir: dir.clone(),
            num: a.num as usize,
        },
        (None, None) => quantize::Calib::Distill {
            num: a.num as usize,
            iters: a.iters as usize,
            stats: a.stats.into(),
        },
    };
    let opts = quantize::QuantizeOptions {
        wbits: a.wbits,
        per_tensor: a.per_tensor,
        clip: match a.clip {
            args::Clip::Minmax => zq_quant::ClipSearch::MinMax,
            args::Clip::Mse => zq_quant::ClipSearch::Mse,
        },
        layer_bits,
        keep_float: a.keep_float.iter().cloned().collect(),
        calib,
        holdout: a.holdout as usize,
        holdout_iters: a.iters as usize,
        holdout_stats: a.stats.into(),
        seed: a.seed,
        pre,
        bn_sigmas: a.bn_sigmas,
        residual_widen: a.residual_widen,
        bias_correction: !a.no_bias_correction,
        pareto: None,
        format: match a.format {
            args::Format::Onnx => quantize::OutputFormat::Onnx,
            args::Format::Safetensors => quantize::OutputFormat::Safetensors,
        },
        gate: quantize::Gate {
            min_agreement: a.min_agreement,
            max_kl: a.max_kl,
        },
    };
    let model = crate::onnx::read_model(&a.model)?;
    let mut opts = opts;
    if a.pareto {
        let mut bits = Vec::new();
        for b in a.bits.split(',') {
            let v: u8 = b
                .trim()
                .parse()
                .ok()
                .filter(|v| (2..=8).contains(v) || *v == 16)
                .ok_or_else(|| {
                    anyhow::anyhow!("--bits: '{b}' is not a bit width (2 to 8, or 16 for float16)")
                })?;
            if !bits.contains(&v) {
                bits.push(v);
            }
        }
        bits.sort_unstable();
        if a.budget.is_none() && a.bops_budget.is_none() {
            anyhow::bail!("--pareto needs --budget SIZE and/or --bops-budget BOPS");
        }
        opts.pareto = Some(quantize::ParetoOptions {
            budget: a.budget.map_or(u64::MAX, |b| b.resolve(model.file_bytes)),
            bops_budget: a.bops_budget,
            bits,
        });
        if let Some(f) = &a.frontier {
            prepare_output(f, "--frontier")?;
        }
        if let Some(f) = &a.plot {
            let ext = f
                .extension()
                .map(|e| e.to_string_lossy().to_lowercase())
                .unwrap_or_default();
            if ext != "svg" {
                anyhow::bail!(
                    "--plot {}: zq draws SVG (it needs no font); give a .svg file name (a bitmap would need a system font zq does not load)",
                    f.display()
                );
            }
            prepare_output(f, "--plot")?;
        }
    }
    let mut bar = p.stages();
    let q = quantize::quantize(&model.graph, &a.model, &opts, &mut |stage, done, total| {
        bar.update(stage, done, total, "")
    });
    drop(bar);
    let q = q?;
    let failed = q
        .report
        .quality
        .as_ref()
        .map(|qual| opts.gate.failures(qual))
        .unwrap_or_default();
    let written = failed.is_empty();
    let mut file_bytes = None;
    if written {
        crate::onnx::write::write_atomic(&out, &q.bytes)?;
        if let (Some(f), Some(p)) = (&a.frontier, &q.report.pareto) {
            let j = serde_json::to_vec_pretty(p)?;
            crate::onnx::write::write_atomic(f, &j)?;
        }
        if let (Some(f), Some(p)) = (&a.plot, &q.report.pareto) {
            let title = format!(
                "{}: size vs. sensitivity",
                a.model
                    .file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default()
            );
            let svg = crate::pipeline::plot::frontier_svg(p, &title)?;
            crate::onnx::write::write_atomic(f, svg.as_bytes())?;
        }
        file_bytes = std::fs::metadata(&out).ok().map(|m| m.len());
    }
    let r = QuantizeSummary {
        output: written.then(|| out.display().to_string()),
        written,
        file_bytes,
        report: q.report,
        seconds: t0.elapsed().as_secs_f64(),
    };
    if p.json {
        p.json(&r)?;
    } else {
        let n8 = r.report.layers.iter().filter(|l| l.bits.is_some()).count();
        println!(
            "{}: {} of {} layers quantized ({} BN folded), weights {} -> {}, calibrated on {}",
            r.output.as_deref().unwrap_or("(not written)"),
            n8,
            r.report.layers.len(),
            r.report.bn_folded,
            crate::cli::size::human_bytes(r.report.fp32_weight_bytes as u64),
            crate::cli::size::human_bytes(r.report.quantized_weight_bytes as u64),
            r.report.calibration
        );
        if let Some(pr) = &r.report.pareto {
            let mut hist = std::collections::BTreeMap::new();
            for b in &pr.chosen.bits {
                *hist.entry(*b).or_insert(0) += 1;
            }
            println!(
                "pareto: {} frontier points; chosen {} layers at {:?} (bits: layers), summed sensitivity {:.5}, predicted {} bytes, written {} bytes, {} bit-operations per image ({:.1} s search)",
                pr.frontier.len(),
                pr.layers.len(),
                hist,
                pr.chosen.sensitivity,
                pr.predicted_bytes,
                r.file_bytes.unwrap_or(0),
                pr.chosen_bops,
                pr.seconds
            );
        }
        if let Some(qual) = &r.report.quality {
            println!(
                "estimated on {} held-out distilled images: agreement with FP32 {:.2}%, KL {:.5}",
                qual.images,
                100.0 * qual.agreement,
                qual.kl
            );
        }
    }
    if !written {
        eprintln!(
            "zq: quality gate failed: {}; nothing written",
            failed.join("; ")
        );
        return Ok(ExitCode::from(crate::ExitStatus::GoalNotMet.code()));
    }
    Ok(ExitCode::SUCCESS)
}
