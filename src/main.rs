//! The `zq` binary: parse, run, map the outcome to an exit code.

use std::process::ExitCode;

use clap::Parser;
use zq::cli::{self, args::Cli, EXIT_ERROR};

fn main() -> ExitCode {
    // A bug must still end in one line and exit code 2, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let loc = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("zq: internal error: {msg}{loc} (please report this)");
    }));
    let cli = Cli::parse();
    match std::panic::catch_unwind(move || cli::run(cli)) {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("zq: error: {}", chain.join(": "));
            ExitCode::from(EXIT_ERROR)
        }
        Err(_) => ExitCode::from(EXIT_ERROR),
    }
}
