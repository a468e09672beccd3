//! ONNX Runtime as an oracle (and optional engine), loaded at run time from a shared library.
//!
//! The library path comes from `--ort-lib` or `ZQ_ORT_LIB`; nothing is downloaded. ort's own
//! `ORT_DYLIB_PATH` route panics when the library is missing, so zq always goes through
//! `ort::init_from`, which returns an error instead.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use crate::error::{Error, Result};

static ENV: OnceLock<std::result::Result<ort::environment::Environment, String>> = OnceLock::new();

/// Environment variable naming the ONNX Runtime shared library.
pub const ORT_LIB_ENV: &str = "ZQ_ORT_LIB";

/// Where the ONNX Runtime library is: the explicit path, else `$ZQ_ORT_LIB`.
pub fn library_path(explicit: Option<&Path>) -> Option<PathBuf> {
    explicit.map(Path::to_path_buf).or_else(|| {
        std::env::var_os(ORT_LIB_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    })
}

/// Load ONNX Runtime once per process.
pub fn init(explicit: Option<&Path>) -> Result<&'static ort::environment::Environment> {
    let env = ENV.get_or_init(|| {
        let path = library_path(explicit).ok_or_else(|| {
            format!("ONNX Runtime is not configured: pass --ort-lib PATH or set {ORT_LIB_ENV} to libonnxruntime.so (pip install onnxruntime ships it in onnxruntime/capi/)")
        })?;
        if !path.is_file() {
            return Err(format!("{}: ONNX Runtime library not found", path.display()));
        }
        let b = ort::init_from(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        b.with_name("zq").with_telemetry(false).build().map_err(|e| format!("ONNX Runtime: {e}"))
    });
    env.as_ref().map_err(|e| Error::Usage(e.clone()))
}

/// One ONNX Runtime session on a model file.
pub struct OrtModel {
    session: Mutex<ort::session::Session>,
    pub input_name: String,
}

impl OrtModel {
    /// A session that computes the model's integer arithmetic exactly, as the oracle must: on
    /// x86-64 without VNNI, ONNX Runtime's default U8S8 integer kernels sum pairs of products
    /// in int16 (VPMADDUBSW) and saturate on full-range uint8 activations and int8 weights, so
    /// this asks for its U8U8 kernels (`session.x64quantprecision`). It changes nothing on CPUs
    /// with VNNI.
    pub fn open(path: &Path, lib: Option<&Path>, threads: usize) -> Result<OrtModel> {
        Self::open_with(path, lib, threads, true)
    }

    /// `open`, with ONNX Runtime's default (possibly saturating, faster) integer kernels when
    /// `precise` is false: what a deployment gets, for speed comparisons.
    pub fn open_with(
        path: &Path,
        lib: Option<&Path>,
        threads: usize,
        precise: bool,
    ) -> Result<OrtModel> {
        let env = init(lib)?;
        let e = |m: String| Error::Model {
            path: path.to_path_buf(),
            msg: format!("ONNX Runtime: {m}"),
        };
        let mut b = ort::session::Session::builder(env).map_err(|x| e(x.to_string()))?;
        b = b
            .with_intra_threads(threads.max(1))
            .map_err(|x| e(x.to_string()))?;
        if precise {
            b = b.with_precise_qmm().map_err(|x| e(x.to_string()))?;
        }
        let session = b.commit_from_file(path).map_err(|x| e(x.to_string()))?;
        let input_name = session
            .inputs()
            .first()
            .map(|i| i.name().to_string())
            .ok_or_else(|| e("model has no inputs".into()))?;
        Ok(OrtModel {
            session: Mutex::new(session),
            input_name,
        })
    }

    /// Run on one float input; returns the first output's shape and data.
    pub fn run(&self, data: Vec<f32>, shape: &[usize]) -> Result<(Vec<usize>, Vec<f32>)> {
        let mut all = self.run_all(data, shape)?;
        Ok(all.swap_remove(0))
    }

    /// Run on one float input; returns every output's shape and data, in graph order.
    pub fn run_all(&self, data: Vec<f32>, shape: &[usize]) -> Result<Vec<(Vec<usize>, Vec<f32>)>> {
        let e = |m: String| Error::Exec(format!("ONNX Runtime: {m}"));
        let t =
            ort::value::Tensor::from_array((shape.to_vec(), data)).map_err(|x| e(x.to_string()))?;
        let mut s = self
            .session
            .lock()
            .map_err(|_| e("session poisoned".into()))?;
        let outs = s
            .run(ort::inputs![self.input_name.as_str() => t])
            .map_err(|x| e(x.to_string()))?;
        let mut r = Vec::with_capacity(outs.len());
        for (_, v) in outs.iter() {
            let (shape, v) = v
                .try_extract_tensor::<f32>()
                .map_err(|x| e(x.to_string()))?;
            r.push((shape.iter().map(|&d| d as usize).collect(), v.to_vec()));
        }
        if r.is_empty() {
            return Err(e("model has no outputs".into()));
        }
        Ok(r)
    }
}

/// The ops ONNX Runtime (CPU) actually runs for a model after its graph optimisations: the op
/// histogram of the optimised model it writes. Shows, e.g., whether QDQ Conv became QLinearConv.
pub fn executed_ops(
    path: &Path,
    lib: Option<&Path>,
) -> Result<std::collections::BTreeMap<String, usize>> {
    use prost::Message;
    let env = init(lib)?;
    let e = |m: String| Error::Model {
        path: path.to_path_buf(),
        msg: format!("ONNX Runtime: {m}"),
    };
    let dir = tempfile::tempdir().map_err(|source| Error::Io {
        path: std::env::temp_dir(),
        source,
    })?;
    let opt = dir.path().join("optimized.onnx");
    let mut b = ort::session::Session::builder(env)
        .map_err(|x| e(x.to_string()))?
        .with_optimization_level(ort::session::builder::GraphOptimizationLevel::Level2)
        .map_err(|x| e(x.to_string()))?
        .with_optimized_model_path(&opt)
        .map_err(|x| e(x.to_string()))?;
    b.commit_from_file(path).map_err(|x| e(x.to_string()))?;
    let bytes = std::fs::read(&opt).map_err(|source| Error::Io {
        path: opt.clone(),
        source,
    })?;
    let m = crate::onnx::proto::ModelProto::decode(bytes.as_slice())
        .map_err(|x| e(format!("optimised model: {x}")))?;
    let mut h = std::collections::BTreeMap::new();
    for n in m.graph.iter().flat_map(|g| g.node.iter()) {
        *h.entry(n.op_type().to_string()).or_insert(0) += 1;
    }
    Ok(h)
}
