//! Helpers: run the built `zq` in a temp dir, locate fixtures, ../shared and ONNX Runtime.

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(rel: &str) -> PathBuf {
    root().join("fixtures").join(rel)
}

fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
}

/// `../shared` (real models and data), or None with a loud message. Under CI its absence fails.
pub fn shared() -> Option<PathBuf> {
    let p = root().join("..").join("shared");
    if p.join("models").is_dir() {
        return Some(p);
    }
    assert!(
        !in_ci(),
        "../shared is missing under CI=true: acceptance tests cannot run"
    );
    eprintln!(
        "SKIPPED: ../shared is absent; the acceptance tests on the real ResNet-20 did not run"
    );
    None
}

/// The ONNX Runtime library ($ZQ_ORT_LIB), or None with a loud message. Under CI its absence fails.
pub fn ort_lib() -> Option<PathBuf> {
    match std::env::var_os("ZQ_ORT_LIB").map(PathBuf::from) {
        Some(p) if p.is_file() => Some(p),
        other => {
            assert!(
                !in_ci(),
                "ONNX Runtime is missing under CI=true (ZQ_ORT_LIB={other:?})"
            );
            eprintln!("SKIPPED: ONNX Runtime not found (set ZQ_ORT_LIB to libonnxruntime.so); oracle checks did not run");
            None
        }
    }
}

pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }
    /// Assert a clean failure: exit 2, one line on stderr mentioning `needle`, no panic.
    pub fn assert_error(&self, needle: &str) {
        assert_eq!(
            self.code, 2,
            "expected exit 2, got {}: {}",
            self.code, self.stderr
        );
        assert!(
            !self.stderr.contains("internal error") && !self.stderr.contains("panicked"),
            "{}",
            self.stderr
        );
        assert_eq!(
            self.stderr.trim_end().lines().count(),
            1,
            "error is not one line: {}",
            self.stderr
        );
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}: {}",
            self.stderr
        );
    }
}

/// Run `zq` with `args` in `dir`.
pub fn zq_in(dir: &Path, args: &[&str]) -> Out {
    let o = Command::new(env!("CARGO_BIN_EXE_zq"))
        .args(args)
        .current_dir(dir)
        .env_remove("CI")
        .output()
        .expect("run zq");
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// Run `zq` in a fresh temporary directory.
pub fn zq(args: &[&str]) -> Out {
    let d = tempfile::tempdir().unwrap();
    zq_in(d.path(), args)
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `(input data, input shape, output data, output shape)` from an `io.safetensors`.
pub fn read_io(path: &Path) -> (Vec<f32>, Vec<usize>, Vec<f32>, Vec<usize>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let get = |n: &str| {
        let t = st.tensor(n).unwrap();
        let v: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (v, t.shape().to_vec())
    };
    let (x, xs) = get("input");
    let (y, ys) = get("output");
    (x, xs, y, ys)
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Deterministic values uniform in [-1, 1) (a seeded LCG; no RNG crate needed).
pub fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    let mut st = seed;
    (0..n)
        .map(|_| {
            st = st
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((st >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A Python interpreter that has `onnx` and `numpy` (for the fixture scripts run at test time):
/// $ZQ_PYTHON, else the `.venv` that `.ci/run` makes, else `python3`. None with a loud message
/// where none has them; under CI their absence fails.
pub fn python_with_onnx() -> Option<PathBuf> {
    let candidates = std::env::var_os("ZQ_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([root().join(".venv/bin/python"), PathBuf::from("python3")]);
    for py in candidates {
        let ok = Command::new(&py)
            .args(["-c", "import onnx, numpy"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return Some(py);
        }
    }
    assert!(
        !in_ci(),
        "no Python with onnx and numpy under CI=true (set ZQ_PYTHON)"
    );
    eprintln!("SKIPPED: no Python with onnx and numpy (set ZQ_PYTHON); tests that build models at test time did not run");
    None
}
