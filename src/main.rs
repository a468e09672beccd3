//! The `zq` binary: parse, run, map the outcome to an exit code.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use zq::cli::{self, args::Cli};
use zq::ExitStatus;

// Distillation allocates and frees large activation buffers every step; with glibc's allocator the
// kernel's page-fault and unmap work took over a third of the run time (measured with perf),
// mimalloc keeps those pages and makes a ResNet-20 step about 2.4x faster.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // zq's heavy kernels (conv, BN, ReLU, statistics) run on rayon; candle's own pool of spinning
    // workers for its remaining element-wise ops only competes with them for cores (measured: a
    // ResNet-20 distillation step 73 -> 59 ms on 2 cores). A user's explicit setting wins.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    // A bug must still end in one line and exit code 2, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        // `zq inspect | head`: the reader went away. Not an error of zq's; stop quietly.
        if msg.starts_with("failed printing to std") && msg.contains("Broken pipe") {
            std::process::exit(0);
        }
        let loc = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("zq: internal error: {msg}{loc} (please report this)");
    }));
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind::*;
            if matches!(
                e.kind(),
                DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            // One line, like every other zq error (clap adds a usage block and a hint).
            let text = e.render().to_string();
            let msg: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .filter(|l| !l.is_empty())
                .collect();
            eprintln!("zq: {} (see zq --help)", msg.join(" "));
            return ExitCode::from(ExitStatus::Error.code());
        }
    };
    match std::panic::catch_unwind(move || cli::run(cli)) {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            // The error's type, not its text, decides the exit code.
            let status = e
                .chain()
                .find_map(|c| c.downcast_ref::<zq::Error>())
                .map_or(ExitStatus::Error, zq::Error::exit_status);
            // Typed errors already print their source; skip causes the message contains.
            let mut msg = e.to_string();
            for c in e.chain().skip(1) {
                let c = c.to_string();
                if !msg.contains(&c) {
                    msg = format!("{msg}: {c}");
                }
            }
            match status {
                ExitStatus::GoalNotMet => eprintln!("zq: {msg}; nothing written"),
                _ => eprintln!("zq: error: {msg}"),
            }
            ExitCode::from(status.code())
        }
        Err(_) => ExitCode::from(ExitStatus::Error.code()),
    }
}
