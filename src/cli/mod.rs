//! The command line: argument definitions (`args`), one function per command, and the printer.

pub mod args;
pub mod bench;
pub mod man;
pub mod printer;
pub mod settings;
pub mod size;

use std::process::ExitCode;

use anyhow::Context;

use crate::pipeline::{distill, eval, inspect, quantize};
use args::{Cli, Command, DistillArgs, Engine, EvalArgs, InspectArgs, QuantizeArgs, RunArgs};
use printer::Printer;

/// Run a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let p = Printer::new(cli.json, cli.quiet);
    match cli.command {
        Command::Inspect(a) => cmd_inspect(&p, a),
        Command::Eval(a) => cmd_eval(&p, a),
        Command::Distill(a) => cmd_distill(&p, a),
        Command::Quantize(a) => cmd_quantize(&p, *a),
        Command::Run(a) => cmd_run(&p, a),
        Command::Bench(a) => bench::cmd_bench(&p, a),
    }
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

/// Open `path` with `engine`; without one, as [`eval::default_classifier`] chooses. Returns the
/// engine used.
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
            match eval::default_classifier(g, path)? {
                (c, true) => (c, Engine::Native),
                (c, false) => (c, Engine::Zq),
            }
        }
    })
}

fn cmd_eval(p: &Printer, a: EvalArgs) -> anyhow::Result<ExitCode> {
    let pre = settings::preprocess(&a.pre);
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

fn cmd_run(p: &Printer, a: RunArgs) -> anyhow::Result<ExitCode> {
    let opts = settings::run_options(&a)?;
    let r = crate::pipeline::run::run(&a.model, &opts)?;
    if p.json {
        p.json(&r)?;
    } else {
        for o in &r.outputs {
            println!("{}: {} {:?} -> {}", o.name, o.dtype, o.shape, o.file);
        }
        p.info(&format!(
            "{}: {} output(s) in {:.3} s ({})",
            r.model,
            r.outputs.len(),
            r.seconds,
            r.engine.name()
        ));
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
    let opts = settings::distill_options(&a)?;
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

/// The model, then the frontier JSON and plot when asked for; each atomically.
fn write_quantized(
    a: &QuantizeArgs,
    out: &std::path::Path,
    q: &quantize::Quantized,
) -> anyhow::Result<()> {
    crate::onnx::write::write_atomic(out, &q.bytes)?;
    if let (Some(f), Some(p)) = (&a.frontier, &q.report.pareto) {
        crate::onnx::write::write_atomic(f, &serde_json::to_vec_pretty(p)?)?;
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
    Ok(())
}

#[derive(serde::Serialize)]
pub struct QuantizeSummary {
    pub output: Option<String>,
    /// false when a gate refused the result (nothing was written).
    pub written: bool,
    pub file_bytes: Option<u64>,
    #[serde(flatten)]
    pub report: quantize::QuantizeReport,
    pub seconds: f64,
}

fn cmd_quantize(p: &Printer, a: QuantizeArgs) -> anyhow::Result<ExitCode> {
    let t0 = std::time::Instant::now();
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
    let model = crate::onnx::read_model(&a.model)?;
    let [_, h, w] = crate::pipeline::eval::chw_of(&model.graph, &a.model)?;
    let opts = settings::quantize_options(&a, model.file_bytes, h * w);
    if a.pareto {
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
    let file_bytes = if written {
        write_quantized(&a, &out, &q)?;
        std::fs::metadata(&out).ok().map(|m| m.len())
    } else {
        None
    };
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
        printer::print_quantize(&r);
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
