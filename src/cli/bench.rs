//! `zq bench`: the integer kernels measured on this machine (GOPS per variant and shape, single
//! thread), next to the measured AVX-512 VNNI peak (`ZQ_KERNELS` narrows it to one variant); or,
//! with `--model`, one model's milliseconds per image on zq's engine and on ONNX Runtime.

use std::process::ExitCode;

use serde::Serialize;
use zq_kernels::int8::{bench, Kernels};

use super::args::{BenchArgs, BenchEngine};
use super::printer::Printer;
use super::settings;
use crate::pipeline::bench::{self as model_bench, ModelBenchReport, Reference};
use crate::pipeline::eval::{self, Classifier};

#[derive(Serialize)]
struct Row {
    op: &'static str,
    shape: String,
    weights: &'static str,
    variant: &'static str,
    m: usize,
    n: usize,
    k: usize,
    seconds: f64,
    gops: f64,
    /// `gops` over the measured single-core VNNI peak (null where it could not be measured).
    fraction_of_peak: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    /// Measured single-core `vpdpbusd` peak, GOPS (null without AVX-512 VNNI).
    peak_gops: Option<f64>,
    clock_ghz: Option<f64>,
    ops_per_cycle: Option<f64>,
    rows: Vec<Row>,
}

pub fn cmd_bench(p: &Printer, a: BenchArgs) -> anyhow::Result<ExitCode> {
    if a.model.is_some() {
        return cmd_bench_model(p, a);
    }
    let variants: Vec<&Kernels> = match std::env::var_os("ZQ_KERNELS") {
        Some(_) => vec![Kernels::from_env()?],
        None => Kernels::available().collect(),
    };
    let peak = bench::vnni_peak();
    let rows = bench::run_matching(&variants, &a.filter);
    if rows.is_empty() {
        anyhow::bail!("--filter {:?} matches no benchmark shape", a.filter);
    }
    if p.json {
        p.json(&Report {
            peak_gops: peak.map(|k| k.gops),
            clock_ghz: peak.map(|k| k.ghz),
            ops_per_cycle: peak.map(|k| k.ops_per_cycle),
            rows: rows
                .iter()
                .map(|r| Row {
                    op: r.op,
                    shape: r.shape.clone(),
                    weights: r.weights.name(),
                    variant: r.variant.name(),
                    m: r.m,
                    n: r.n,
                    k: r.k,
                    seconds: r.seconds,
                    gops: r.gops,
                    fraction_of_peak: peak.map(|k| r.gops / k.gops),
                })
                .collect(),
        })?;
    } else {
        print!("{}", bench::report(&rows, peak.as_ref()));
    }
    Ok(ExitCode::SUCCESS)
}

/// Both engines on `threads` threads: ONNX Runtime's intra-op pool, and rayon's global pool for
/// zq (built here, before anything in the process has used rayon).
fn use_threads(threads: usize) -> anyhow::Result<()> {
    if rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .is_err()
        && rayon::current_num_threads() != threads
    {
        anyhow::bail!(
            "--threads {threads}: zq's thread pool already runs {} threads",
            rayon::current_num_threads()
        );
    }
    Ok(())
}

fn cmd_bench_model(p: &Printer, a: BenchArgs) -> anyhow::Result<ExitCode> {
    let path = a.model.clone().expect("called with --model");
    let opts = settings::model_bench_options(&a)?;
    let threads = a.threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        |t| t as usize,
    );
    use_threads(threads)?;
    let graph = crate::onnx::read_model(&path)?.graph;
    let quantized = eval::is_quantized(&graph);
    let (mut zq, engine): (Box<dyn Classifier>, _) = match a.engine {
        Some(BenchEngine::Native) => (
            Box::new(eval::NativeClassifier::new(graph, &path)?),
            BenchEngine::Native,
        ),
        Some(BenchEngine::Zq) => (
            Box::new(eval::ZqClassifier::new(graph, &path)?),
            BenchEngine::Zq,
        ),
        None => match eval::default_classifier(graph, &path)? {
            (c, true) => (c, BenchEngine::Native),
            (c, false) => (c, BenchEngine::Zq),
        },
    };
    // ONNX Runtime absent is not an error (zq is still timed); a library named by --ort-lib
    // that does not load is. It is timed with its default integer kernels (what a deployment
    // runs, faster than the exact ones on CPUs without VNNI).
    let lib = a.ort_lib.as_deref();
    let mut ort = match crate::exec::ort::init(lib) {
        Ok(_) => Ok(eval::OrtClassifier::open_threads(
            &path, lib, threads, false,
        )?),
        Err(e) if lib.is_some() => anyhow::bail!("--ort-lib: {e}"),
        Err(e) => Err(e.to_string()),
    };
    let reference = match &mut ort {
        Ok(o) => Reference::Ort(o),
        Err(why) => {
            p.note(&format!(
                "ONNX Runtime not available ({why}); timing zq only"
            ));
            Reference::Missing(why.clone())
        }
    };
    let info = model_bench::ModelInfo {
        path: path.display().to_string(),
        quantized,
        engine: format!("{engine:?}").to_lowercase(),
        threads,
    };
    let r = model_bench::bench_model(info, zq.as_mut(), reference, &opts, &mut |n| {
        p.info(&format!("timing batch {n}"))
    })?;
    if p.json {
        p.json(&r)?;
    } else {
        print!("{}", model_report(&r));
    }
    Ok(ExitCode::SUCCESS)
}

/// The text report: one line about the run, then one row per batch size.
fn model_report(r: &ModelBenchReport) -> String {
    let mut s = format!(
        "{}: {} model on {} vs ONNX Runtime, {} thread(s), input {:?} from {}, median of {} rounds\n",
        r.model,
        if r.quantized { "quantized" } else { "float" },
        if r.engine == "native" {
            "zq's native engine"
        } else {
            "zq's executor"
        },
        r.threads,
        r.input,
        r.inputs,
        r.rounds
    );
    s += &format!(
        "{:>6}  {:>11}  {:>11}  {:>7}  {:>9}\n",
        "batch", "zq ms/img", "ORT ms/img", "zq/ORT", "same class"
    );
    for b in &r.batches {
        let ort = b
            .ort
            .as_ref()
            .map_or("-".to_string(), |o| format!("{:.3}", o.ms_per_image));
        let ratio = b.ratio.map_or("-".to_string(), |x| format!("{x:.2}x"));
        let agree = b
            .agreement
            .map_or("-".to_string(), |x| format!("{:.1}%", 100.0 * x));
        s += &format!(
            "{:>6}  {:>11.3}  {:>11}  {:>7}  {:>9}\n",
            b.batch, b.zq.ms_per_image, ort, ratio, agree
        );
    }
    s
}
