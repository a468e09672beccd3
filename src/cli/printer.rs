//! Output: human text or JSON on stdout, progress bars on stderr only when it is a terminal.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::size::human_bytes;
use crate::pipeline::inspect::InspectReport;

pub struct Printer {
    pub json: bool,
    pub quiet: bool,
    tty: bool,
}

impl Printer {
    pub fn new(json: bool, quiet: bool) -> Printer {
        Printer {
            json,
            quiet,
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// A progress bar on a terminal; hidden otherwise (pipes, CI logs, --quiet).
    pub fn progress(&self, total: u64, unit: &str) -> ProgressBar {
        if self.quiet || !self.tty {
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::new(total);
        let style = ProgressStyle::with_template(&format!(
            "{{spinner}} [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}} {unit} {{msg}} (ETA {{eta}})"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        pb.set_style(style);
        pb
    }

    /// Progress of a run in named stages: one bar per stage on a terminal; elsewhere (a CI
    /// log) a plain line at most every [`LOG_EVERY`], so a long run is never silent.
    pub fn stages(&self) -> Stages<'_> {
        Stages {
            printer: self,
            current: None,
            last_line: std::time::Instant::now(),
        }
    }

    /// An informational line on stderr (suppressed by --quiet and --json).
    pub fn info(&self, msg: &str) {
        if !self.quiet && !self.json {
            eprintln!("{msg}");
        }
    }

    /// A line on stderr that --json does not suppress (only --quiet does): something the
    /// reader of a report should know, such as a measurement that could not be made.
    pub fn note(&self, msg: &str) {
        if !self.quiet {
            eprintln!("{msg}");
        }
    }

    pub fn json<T: serde::Serialize>(&self, v: &T) -> anyhow::Result<()> {
        println!("{}", serde_json::to_string_pretty(v)?);
        Ok(())
    }
}

/// How often a run off a terminal prints a progress line.
pub const LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// See [`Printer::stages`]. The bar is cleared when the stage changes and when this is dropped.
pub struct Stages<'a> {
    printer: &'a Printer,
    current: Option<(String, ProgressBar)>,
    /// When the last plain progress line was printed (or the run started).
    last_line: std::time::Instant,
}

impl Stages<'_> {
    /// `done` of `total` steps of `stage`; `detail` (e.g. the current loss) follows its name.
    pub fn update(&mut self, stage: &str, done: usize, total: usize, detail: &str) {
        if self.current.as_ref().map(|(s, _)| s.as_str()) != Some(stage) {
            if let Some((_, old)) = self.current.take() {
                old.finish_and_clear();
            }
            let pb = self.printer.progress(total as u64, "steps");
            self.current = Some((stage.to_string(), pb));
        }
        if !self.printer.tty && !self.printer.quiet && self.last_line.elapsed() >= LOG_EVERY {
            self.last_line = std::time::Instant::now();
            let detail = if detail.is_empty() {
                String::new()
            } else {
                format!(", {detail}")
            };
            eprintln!("zq: {stage} {done}/{total}{detail}");
        }
        if let Some((_, pb)) = &self.current {
            pb.set_position(done as u64);
            pb.set_message(if detail.is_empty() {
                stage.to_string()
            } else {
                format!("{stage}, {detail}")
            });
        }
    }
}

impl Drop for Stages<'_> {
    fn drop(&mut self) {
        if let Some((_, pb)) = self.current.take() {
            pb.finish_and_clear();
        }
    }
}

fn shape(s: &[serde_json::Value]) -> String {
    let v: Vec<String> = s
        .iter()
        .map(|d| d.to_string().trim_matches('"').to_string())
        .collect();
    format!("[{}]", v.join(", "))
}

pub fn print_inspect(r: &InspectReport) {
    println!("model     {}", r.model);
    println!(
        "file      {} (ONNX IR {}, opset {}, producer '{}')",
        human_bytes(r.file_bytes),
        r.ir_version,
        r.opset,
        r.producer
    );
    for i in &r.inputs {
        println!("input     {} {}", i.name, shape(&i.shape));
    }
    for o in &r.outputs {
        println!("output    {} {}", o.name, shape(&o.shape));
    }
    let hist = |h: &std::collections::BTreeMap<String, usize>| {
        h.iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("ops       {}", hist(&r.ops));
    println!("executed  {}", hist(&r.ops_executed));
    println!("params    {}", r.params);
    println!();
    println!("quantizable layers ({}):", r.quantizable_layers.len());
    for l in &r.quantizable_layers {
        println!(
            "  {:<28} {:<7} {:>9} params  weight {:?}{}",
            l.name,
            l.op,
            l.params,
            l.weight_shape,
            if l.has_bias { " + bias" } else { "" }
        );
    }
    println!();
    println!("BatchNormalization layers ({}):", r.bn_layers.len());
    for b in &r.bn_layers {
        println!(
            "  {:<28} {:>5} channels  {}{}",
            b.node,
            b.channels,
            if b.foldable {
                "foldable: "
            } else {
                "not foldable: "
            },
            b.reason
        );
    }
    println!();
    println!(
        "size      fp32 {}   int8 {}   int4 {}  (weights per-channel, BN folded)",
        human_bytes(r.size.fp32_bytes),
        human_bytes(r.size.int8_bytes),
        human_bytes(r.size.int4_bytes)
    );
    for w in &r.warnings {
        println!("warning: {w}");
    }
}

/// `zq quantize`'s summary: layer storage, sizes, the Pareto choice, the quality estimate.
pub fn print_quantize(r: &super::QuantizeSummary) {
    let count =
        |f: &dyn Fn(Option<u8>) -> bool| r.report.layers.iter().filter(|l| f(l.bits)).count();
    println!(
        "{}: {} of {} layers quantized to integers ({} float16, {} float; {} BN folded), weights {} -> {}, calibrated on {}",
        r.output.as_deref().unwrap_or("(not written)"),
        count(&|b| b.is_some_and(|b| b <= 8)),
        r.report.layers.len(),
        count(&|b| b == Some(16)),
        count(&|b| b.is_none()),
        r.report.bn_folded,
        human_bytes(r.report.fp32_weight_bytes as u64),
        human_bytes(r.report.quantized_weight_bytes as u64),
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
    if let Some(rf) = &r.report.refine {
        let kept = rf.blocks.iter().filter(|b| b.kept_round_to_nearest).count();
        print!(
            "refine {}: {} blocks ({kept} kept round to nearest), {} steps of {} images ({:.1} s)",
            rf.method,
            rf.blocks.len(),
            rf.iters,
            rf.batch,
            rf.seconds
        );
        match &rf.holdout {
            Some(h) if h.kept_round_to_nearest => println!(
                "; held-out KL {:.5} refined against {:.5} round to nearest: wrote round to nearest",
                h.kl_refined, h.kl_round_to_nearest
            ),
            Some(h) => println!(
                "; held-out KL {:.5} refined against {:.5} round to nearest",
                h.kl_refined, h.kl_round_to_nearest
            ),
            None => println!(),
        }
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
