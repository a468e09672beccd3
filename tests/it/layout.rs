//! The house rules, checked on the sources: dependencies point one way, the algorithm crates do
//! no I/O, and only zq-kernels may hold `unsafe`.

use std::path::{Path, PathBuf};

use crate::util::root;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Every line of the Rust sources under `dir` that contains one of `banned`.
fn offending(dir: &str, banned: &[&str]) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(&root().join(dir), &mut files);
    assert!(!files.is_empty(), "no sources under {dir}");
    let mut hits = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for (i, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for b in banned {
                if code.contains(b) {
                    hits.push(format!("{}:{}: {}", f.display(), i + 1, line.trim()));
                }
            }
        }
    }
    hits
}

#[test]
fn dependencies_point_one_way() {
    // The executors and the IR know nothing of distillation, the pipelines or the command line.
    for dir in ["src/exec", "src/ir", "src/onnx", "src/data"] {
        let hits = offending(dir, &["zq_synth", "crate::cli", "crate::pipeline"]);
        assert!(
            hits.is_empty(),
            "{dir} reaches upwards:\n{}",
            hits.join("\n")
        );
    }
    let hits = offending("src/pipeline", &["crate::cli"]);
    assert!(
        hits.is_empty(),
        "pipeline imports cli:\n{}",
        hits.join("\n")
    );
    // The algorithm crates read no files and no ONNX, and the kernels are not re-exported.
    for dir in ["quant/src", "synth/src"] {
        let hits = offending(
            dir,
            &[
                "std::fs",
                "File::open",
                "prost",
                "onnx",
                "pub use zq_kernels",
            ],
        );
        assert!(hits.is_empty(), "{dir} does I/O:\n{}", hits.join("\n"));
    }
}

#[test]
fn only_the_kernels_crate_may_hold_unsafe() {
    for root_file in [
        "src/lib.rs",
        "src/main.rs",
        "quant/src/lib.rs",
        "synth/src/lib.rs",
    ] {
        let text = std::fs::read_to_string(root().join(root_file)).unwrap();
        assert!(
            text.contains("#![forbid(unsafe_code)]"),
            "{root_file} does not forbid unsafe code"
        );
    }
}
