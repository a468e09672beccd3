//! `zq bench`: the integer kernels measured on this machine (GOPS per variant and shape, single
//! thread), next to the measured AVX-512 VNNI peak. `ZQ_KERNELS` narrows it to one variant.

use std::process::ExitCode;

use serde::Serialize;
use zq_kernels::int8::{bench, Kernels};

use super::args::BenchArgs;
use super::printer::Printer;

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
