//! `zq run`: a model on tensors read from files (`.npy`, or ONNX TensorProto `.pb` as ONNX's
//! backend tests store them), every graph output written as `OUTDIR/<output name>.npy`.
//!
//! Integer-typed graph inputs (shapes, axes, indices, quantized data, zero points) and scalar
//! float inputs (parameters: Clip bounds, Pad values, scales) are bound as constants before the
//! graph is specialised: zq compiles a model for the inputs it is given, its engines run float
//! tensors, and several ops need those parameters constant. Other float inputs are the
//! run-time tensors.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use ndarray::{ArrayD, IxDyn};
use ndarray_npy::{ReadNpyExt, WriteNpyExt};
use prost::Message;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::ir::{DType, Data, Dim, Tensor};
use crate::onnx::read::{Declared, ModelFile};

/// Which executor runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// The reference executor (`exec::Plan`).
    Zq,
    /// The native engine (`exec::native`).
    Native,
    /// ONNX Runtime.
    Ort,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Zq => "zq",
            Engine::Native => "native",
            Engine::Ort => "ort",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// `(graph input name, file)`, each name once.
    pub inputs: Vec<(String, PathBuf)>,
    /// Where `<output name>.npy` files go (created if missing).
    pub out_dir: PathBuf,
    /// `None`: native for models with QuantizeLinear nodes, zq's executor otherwise.
    pub engine: Option<Engine>,
    /// ONNX Runtime's library for `Engine::Ort` (else `$ZQ_ORT_LIB`).
    pub ort_lib: Option<PathBuf>,
}

impl RunOptions {
    pub fn validate(&self) -> Result<()> {
        let mut seen = HashSet::new();
        for (name, _) in &self.inputs {
            if name.is_empty() {
                return Err(Error::Usage("--input: the input name is empty".into()));
            }
            if !seen.insert(name) {
                return Err(Error::Usage(format!("--input {name} is given twice")));
            }
        }
        if self.out_dir.exists() && !self.out_dir.is_dir() {
            return Err(Error::Usage(format!(
                "-o {} exists and is not a directory",
                self.out_dir.display()
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TensorInfo {
    pub name: String,
    pub file: String,
    pub dtype: String,
    pub shape: Vec<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub model: String,
    pub engine: Engine,
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
    /// Time spent compiling and running the model (not reading or writing files).
    pub seconds: f64,
}

/// A safe file name for an output: ASCII letters, digits, `-`, `_` and `.` kept, anything else
/// (path separators included) becomes `_`; so do leading dots, and an empty name is `_`.
pub fn file_stem(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let dots = s.len() - s.trim_start_matches('.').len();
    s.replace_range(..dots, &"_".repeat(dots));
    if s.is_empty() {
        s.push('_');
    }
    s
}

fn file_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Model {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// The element type a `.npy` type descriptor names (`<f4`, `|u1`, ...), any byte order.
fn npy_dtype(descr: &str) -> Option<DType> {
    let d = descr.trim_start_matches(['<', '>', '|', '=']);
    Some(match d {
        "f4" => DType::F32,
        "f8" => DType::F64,
        "f2" => DType::F16,
        "i1" | "b" => DType::I8,
        "u1" | "B" => DType::U8,
        "i2" => DType::I16,
        "u2" => DType::U16,
        "i4" => DType::I32,
        "u4" => DType::U32,
        "i8" => DType::I64,
        "u8" => DType::U64,
        "b1" | "?" => DType::Bool,
        _ => return None,
    })
}

/// Read a `.npy` file as the element type `want` (int4/uint4: an int8/uint8 array of values in
/// range). The header is checked against the file's length before anything is allocated.
pub fn read_npy(path: &Path, bytes: &[u8], want: DType, what: &str) -> Result<Tensor> {
    use ndarray_npy::npy::header::Header;
    let mut r = bytes;
    let h =
        Header::from_reader(&mut r).map_err(|e| file_err(path, format!("not a .npy file: {e}")))?;
    let descr = match &h.type_descriptor {
        py_literal::Value::String(s) => s.clone(),
        other => {
            return Err(file_err(
                path,
                format!("structured .npy dtype {other} is not supported"),
            ))
        }
    };
    let got = npy_dtype(&descr)
        .ok_or_else(|| file_err(path, format!(".npy dtype '{descr}' is not supported")))?;
    let n = crate::ir::passes::checked_elements(&h.shape).ok_or_else(|| {
        file_err(
            path,
            format!(
                "shape {:?} has more than {} elements",
                h.shape,
                crate::ir::passes::MAX_ELEMENTS
            ),
        )
    })?;
    if n.checked_mul(got.size_of()) != Some(r.len()) {
        return Err(file_err(
            path,
            format!(
                "shape {:?} of {got} needs {} data bytes, the file holds {}",
                h.shape,
                n * got.size_of(),
                r.len()
            ),
        ));
    }
    let container = match want {
        DType::I4 => DType::I8,
        DType::U4 => DType::U8,
        w => w,
    };
    if got != container {
        return Err(file_err(path, format!("holds {got}, {what} is {want}")));
    }
    fn load<T: ndarray_npy::ReadableElement + Copy, U>(
        path: &Path,
        bytes: &[u8],
        f: impl Fn(T) -> U,
    ) -> Result<(Vec<usize>, Vec<U>)> {
        let a = ArrayD::<T>::read_npy(bytes).map_err(|e| file_err(path, e.to_string()))?;
        Ok((a.shape().to_vec(), a.iter().map(|&x| f(x)).collect()))
    }
    let floats = |(s, v): (Vec<usize>, Vec<f32>)| (s, Data::F32(v));
    let ints = |(s, v): (Vec<usize>, Vec<i64>)| (s, Data::I64(v));
    let (shape, data) = match container {
        DType::F32 => floats(load(path, bytes, |x: f32| x)?),
        DType::F64 => floats(load(path, bytes, |x: f64| x as f32)?),
        DType::I8 => ints(load(path, bytes, |x: i8| i64::from(x))?),
        DType::U8 => ints(load(path, bytes, |x: u8| i64::from(x))?),
        DType::I16 => ints(load(path, bytes, |x: i16| i64::from(x))?),
        DType::U16 => ints(load(path, bytes, |x: u16| i64::from(x))?),
        DType::I32 => ints(load(path, bytes, |x: i32| i64::from(x))?),
        DType::U32 => ints(load(path, bytes, |x: u32| i64::from(x))?),
        DType::I64 => ints(load(path, bytes, |x: i64| x)?),
        DType::U64 => {
            let (s, v) = load(path, bytes, |x: u64| i64::try_from(x))?;
            let v = v
                .into_iter()
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|_| file_err(path, "uint64 value beyond 2^63 is not supported"))?;
            (s, Data::I64(v))
        }
        DType::Bool => ints(load(path, bytes, |b: bool| i64::from(b))?),
        DType::F16 => {
            return Err(file_err(
                path,
                "float16 .npy files are not read; give the tensor as an ONNX TensorProto .pb",
            ))
        }
        DType::I4 | DType::U4 => unreachable!("mapped to their 8-bit containers above"),
    };
    if let (DType::I4 | DType::U4, Data::I64(v)) = (want, &data) {
        let (lo, hi) = if want == DType::I4 { (-8, 7) } else { (0, 15) };
        if let Some(x) = v.iter().find(|&&x| !(lo..=hi).contains(&x)) {
            return Err(file_err(
                path,
                format!("value {x} is outside {want}'s range {lo}..={hi}"),
            ));
        }
    }
    Ok(Tensor {
        dtype: want,
        shape,
        data,
    })
}

/// Read an input tensor from `.npy` or `.pb` (ONNX TensorProto); it must be of type `want`.
pub fn read_tensor(path: &Path, want: DType, what: &str) -> Result<Tensor> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if ext != "npy" && ext != "pb" {
        return Err(file_err(
            path,
            "give a .npy file or an ONNX TensorProto .pb file",
        ));
    }
    let meta = std::fs::metadata(path).map_err(|source| Error::Io {
        path: path.into(),
        source,
    })?;
    if meta.len() > crate::onnx::read::MAX_FILE_BYTES {
        return Err(file_err(
            path,
            format!("file is {} bytes, over 2 GiB", meta.len()),
        ));
    }
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.into(),
        source,
    })?;
    match ext.as_str() {
        "npy" => read_npy(path, &bytes, want, what),
        _ => {
            // .pb
            let tp = crate::onnx::proto::TensorProto::decode(bytes.as_slice()).map_err(|e| {
                file_err(
                    path,
                    format!("not an ONNX TensorProto (protobuf decoding failed: {e})"),
                )
            })?;
            let t =
                crate::onnx::read::tensor_from_proto(&tp, None).map_err(|e| file_err(path, e))?;
            if t.dtype != want {
                return Err(file_err(
                    path,
                    format!("holds {}, {what} is {want}", t.dtype),
                ));
            }
            Ok(t)
        }
    }
}

/// `values` (integers held in f32 by the engines) as `dtype`, checked: a value that is not an
/// integer in the type's range, or beyond 2^24 (where f32 stops being exact), is an error.
fn to_ints(values: &[f32], dtype: DType, what: &str) -> Result<Vec<i64>> {
    let (lo, hi): (f64, f64) = match dtype {
        DType::I8 => (-128.0, 127.0),
        DType::U8 => (0.0, 255.0),
        DType::I4 => (-8.0, 7.0),
        DType::U4 => (0.0, 15.0),
        DType::I16 => (-32768.0, 32767.0),
        DType::U16 => (0.0, 65535.0),
        DType::Bool => (0.0, 1.0),
        _ => (-16_777_216.0, 16_777_216.0),
    };
    values
        .iter()
        .map(|&x| {
            let x = f64::from(x);
            if dtype == DType::Bool {
                return Ok(i64::from(x != 0.0));
            }
            if x.fract() != 0.0 || !(lo..=hi).contains(&x) {
                return Err(Error::Exec(format!(
                    "{what} is {dtype} but zq computed the value {x}, which {dtype} cannot hold exactly (integers run as f32 in zq's engines)"
                )));
            }
            Ok(x as i64)
        })
        .collect()
}

/// One output as `.npy` bytes in its declared element type (int4/uint4 as int8/uint8).
pub fn npy_bytes(values: &[f32], shape: &[usize], dtype: DType, what: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let bad = |e: ndarray::ShapeError| Error::Internal(format!("{what}: {e}"));
    fn put<T: ndarray_npy::WritableElement>(
        a: ArrayD<T>,
        out: &mut Vec<u8>,
        what: &str,
    ) -> Result<()> {
        a.write_npy(out)
            .map_err(|e| Error::Internal(format!("{what}: {e}")))
    }
    let sh = IxDyn(shape);
    macro_rules! ints {
        ($t:ty) => {{
            let v: Vec<$t> = to_ints(values, dtype, what)?
                .into_iter()
                .map(|x| x as $t)
                .collect();
            put(ArrayD::from_shape_vec(sh, v).map_err(bad)?, &mut out, what)?
        }};
    }
    match dtype {
        DType::F32 => put(
            ArrayD::from_shape_vec(sh, values.to_vec()).map_err(bad)?,
            &mut out,
            what,
        )?,
        DType::F64 => put(
            ArrayD::from_shape_vec(sh, values.iter().map(|&x| f64::from(x)).collect())
                .map_err(bad)?,
            &mut out,
            what,
        )?,
        DType::I8 | DType::I4 => ints!(i8),
        DType::U8 | DType::U4 => ints!(u8),
        DType::I16 => ints!(i16),
        DType::U16 => ints!(u16),
        DType::I32 => ints!(i32),
        DType::U32 => ints!(u32),
        DType::I64 => ints!(i64),
        DType::U64 => ints!(u64),
        DType::Bool => {
            let v: Vec<bool> = values.iter().map(|&x| x != 0.0).collect();
            put(ArrayD::from_shape_vec(sh, v).map_err(bad)?, &mut out, what)?
        }
        DType::F16 => {
            return Err(Error::Usage(format!(
                "{what} is float16; zq run writes .npy files of float32, float64, integer and bool outputs only"
            )))
        }
    }
    Ok(out)
}

/// Check a tensor against a declared input: rank, and every fixed dimension. Symbolic
/// dimensions take the file's size (one size per symbol name).
fn check_shape(
    d: &Declared,
    t: &Tensor,
    file: &Path,
    symbols: &mut HashMap<String, usize>,
) -> Result<()> {
    let fail =
        |msg: String| Error::Usage(format!("input '{}' ({}): {msg}", d.name, file.display()));
    if t.shape.len() != d.dims.len() {
        return Err(fail(format!(
            "shape {:?} has rank {}, the model declares rank {} ({})",
            t.shape,
            t.shape.len(),
            d.dims.len(),
            dims_text(&d.dims)
        )));
    }
    for (i, (dim, &n)) in d.dims.iter().zip(&t.shape).enumerate() {
        match dim {
            Dim::Fixed(m) if *m != n => {
                return Err(fail(format!(
                    "shape {:?} differs from the declared {} at dimension {i}",
                    t.shape,
                    dims_text(&d.dims)
                )))
            }
            Dim::Sym(s) if !s.is_empty() => {
                let prev = *symbols.entry(s.clone()).or_insert(n);
                if prev != n {
                    return Err(fail(format!(
                        "dimension '{s}' is {n} here but {prev} in another input"
                    )));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn dims_text(dims: &[Dim]) -> String {
    let v: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
    format!("[{}]", v.join(", "))
}

/// Run `model` on the files in `opts` and write every output; returns what was done.
pub fn run(model: &Path, opts: &RunOptions) -> Result<RunReport> {
    opts.validate()?;
    let file = ModelFile::open(model)?;
    let declared = file.inputs()?;
    let outs = file.outputs()?;
    let given: HashMap<&str, &PathBuf> = opts.inputs.iter().map(|(n, p)| (n.as_str(), p)).collect();
    let names = || {
        declared
            .iter()
            .map(|d| format!("{} ({} {})", d.name, d.dtype, dims_text(&d.dims)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (n, _) in &opts.inputs {
        if !declared.iter().any(|d| &d.name == n) {
            return Err(Error::Usage(format!(
                "--input {n}: the model has no input '{n}'; its inputs: {}",
                names()
            )));
        }
    }
    let missing: Vec<&str> = declared
        .iter()
        .filter(|d| !given.contains_key(d.name.as_str()))
        .map(|d| d.name.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(Error::Usage(format!(
            "no --input for {} (give --input NAME=FILE for each of: {})",
            missing.join(", "),
            names()
        )));
    }
    // Read every input, check it, and bind the integer ones.
    let mut symbols = HashMap::new();
    let mut bound = HashMap::new();
    let mut float_inputs: HashMap<String, Tensor> = HashMap::new();
    let mut infos = Vec::new();
    for d in &declared {
        let path = given[d.name.as_str()];
        let t = read_tensor(path, d.dtype, &format!("input '{}'", d.name))?;
        check_shape(d, &t, path, &mut symbols)?;
        infos.push(TensorInfo {
            name: d.name.clone(),
            file: path.display().to_string(),
            dtype: d.dtype.to_string(),
            shape: t.shape.clone(),
        });
        // Scalars are parameters (Clip bounds, Pad values, scales): bound, like integers.
        if d.dtype.is_float() && !t.shape.is_empty() {
            float_inputs.insert(d.name.clone(), t);
        } else {
            bound.insert(d.name.clone(), t);
        }
    }
    let m = file.import(&bound)?;
    let mut g = m.graph;
    // Fix every input's dimensions to the file's (they were checked above).
    let mut xs = Vec::with_capacity(g.inputs.len());
    for gi in &mut g.inputs {
        let name = &g.values[gi.value].name;
        let t = float_inputs
            .remove(name)
            .ok_or_else(|| Error::Internal(format!("input '{name}' was not read")))?;
        gi.dims = t.shape.iter().map(|&n| Dim::Fixed(n)).collect();
        xs.push(t);
    }
    // Specialisation reads a leading dimension of 0 as "the batch size": with every input's
    // dimensions fixed from its file, the batch is needed only for an empty input's.
    let batch = if xs.iter().any(|t| t.shape.first() == Some(&0)) {
        0
    } else {
        xs.first()
            .and_then(|t| t.shape.first().copied())
            .unwrap_or(1)
    };
    let engine = opts
        .engine
        .unwrap_or(if crate::pipeline::eval::is_quantized(&g) {
            Engine::Native
        } else {
            Engine::Zq
        });
    let t0 = Instant::now();
    let results: Vec<(Vec<f32>, Vec<usize>)> = match engine {
        Engine::Zq => {
            let plan = crate::exec::Plan::new(&g, batch)?;
            let ins = xs
                .iter()
                .map(|t| {
                    candle_core::Tensor::from_vec(t.to_f32_vec(), t.shape.clone(), plan.device())
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            plan.run(&ins)?
                .into_iter()
                .map(|y| {
                    let shape = y.dims().to_vec();
                    let v = y
                        .to_dtype(candle_core::DType::F32)?
                        .flatten_all()?
                        .to_vec1::<f32>()?;
                    Ok((v, shape))
                })
                .collect::<Result<_>>()?
        }
        Engine::Native => {
            let mut p = crate::exec::native::compile(&g, batch)?;
            let data: Vec<Vec<f32>> = xs.iter().map(Tensor::to_f32_vec).collect();
            let refs: Vec<&[f32]> = data.iter().map(Vec::as_slice).collect();
            p.run(&refs)?
        }
        Engine::Ort => {
            if !bound.is_empty() || xs.len() != 1 || xs[0].dtype != DType::F32 {
                return Err(Error::Usage(format!(
                    "--engine ort: zq hands ONNX Runtime one float32 input; this model takes {}",
                    names()
                )));
            }
            if let Some(o) = outs.iter().find(|o| o.dtype != DType::F32) {
                return Err(Error::Usage(format!(
                    "--engine ort: zq reads float32 outputs from ONNX Runtime; output '{}' is {}",
                    o.name, o.dtype
                )));
            }
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let s = crate::exec::ort::OrtModel::open(model, opts.ort_lib.as_deref(), threads)?;
            s.run_all(xs[0].to_f32_vec(), &xs[0].shape)?
                .into_iter()
                .map(|(shape, v)| (v, shape))
                .collect()
        }
    };
    let seconds = t0.elapsed().as_secs_f64();
    if results.len() != outs.len() {
        return Err(Error::Internal(format!(
            "the engine returned {} outputs for {} graph outputs",
            results.len(),
            outs.len()
        )));
    }
    // Encode every output before writing any, so an output zq cannot write leaves nothing behind.
    let mut files: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    let mut taken: HashMap<String, &str> = HashMap::new();
    let mut out_infos = Vec::new();
    for (o, (v, shape)) in outs.iter().zip(&results) {
        let what = format!("output '{}'", o.name);
        let stem = file_stem(&o.name);
        if let Some(prev) = taken.insert(stem.to_lowercase(), &o.name) {
            return Err(Error::Usage(format!(
                "outputs '{prev}' and '{}' both become the file name {stem}.npy",
                o.name
            )));
        }
        let path = opts.out_dir.join(format!("{stem}.npy"));
        files.push((path.clone(), npy_bytes(v, shape, o.dtype, &what)?));
        out_infos.push(TensorInfo {
            name: o.name.clone(),
            file: path.display().to_string(),
            dtype: o.dtype.to_string(),
            shape: shape.clone(),
        });
    }
    std::fs::create_dir_all(&opts.out_dir).map_err(|source| Error::Io {
        path: opts.out_dir.clone(),
        source,
    })?;
    for (path, bytes) in &files {
        crate::onnx::write::write_atomic(path, bytes)?;
    }
    Ok(RunReport {
        model: model.display().to_string(),
        engine,
        inputs: infos,
        outputs: out_infos,
        seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_names_become_safe_file_names() {
        assert_eq!(file_stem("logits"), "logits");
        assert_eq!(file_stem("a/b:0"), "a_b_0");
        assert_eq!(file_stem("../x"), "___x");
        assert_eq!(file_stem(".."), "__");
        assert_eq!(file_stem(""), "_");
        assert_eq!(file_stem("y.1"), "y.1");
        assert_eq!(file_stem("ü"), "_");
    }

    #[test]
    fn npy_round_trip_in_every_integer_type() {
        let dir = tempfile::tempdir().unwrap();
        for dt in [
            DType::F32,
            DType::F64,
            DType::I8,
            DType::U8,
            DType::I16,
            DType::I32,
            DType::I64,
            DType::U4,
            DType::I4,
            DType::Bool,
        ] {
            let v: Vec<f32> = match dt {
                DType::U4 => vec![0.0, 15.0, 3.0, 7.0, 1.0, 2.0],
                DType::I4 => vec![-8.0, 7.0, 0.0, -1.0, 1.0, 2.0],
                DType::Bool => vec![0.0, 1.0, 1.0, 0.0, 1.0, 0.0],
                DType::U8 => vec![0.0, 255.0, 3.0, 4.0, 5.0, 6.0],
                _ => vec![-3.0, 127.0, 0.0, 1.0, -128.0, 2.0],
            };
            let bytes = npy_bytes(&v, &[2, 3], dt, "t").unwrap();
            let p = dir.path().join(format!("{dt}.npy"));
            std::fs::write(&p, &bytes).unwrap();
            let t = read_tensor(&p, dt, "input 'x'").unwrap();
            assert_eq!(t.shape, vec![2, 3]);
            assert_eq!(t.to_f32_vec(), v, "{dt}");
        }
    }

    #[test]
    fn wrong_type_truncated_and_out_of_range_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.npy");
        std::fs::write(&p, npy_bytes(&[1.0, 2.0], &[2], DType::I64, "t").unwrap()).unwrap();
        let e = read_tensor(&p, DType::F32, "input 'x'")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("x.npy") && e.contains("holds int64, input 'x' is float32"),
            "{e}"
        );
        let mut b = npy_bytes(&[1.0, 2.0, 3.0], &[3], DType::F32, "t").unwrap();
        b.truncate(b.len() - 2);
        std::fs::write(&p, &b).unwrap();
        let e = read_tensor(&p, DType::F32, "input 'x'")
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs 12 data bytes"), "{e}");
        std::fs::write(&p, npy_bytes(&[9.0], &[1], DType::U8, "t").unwrap()).unwrap();
        let e = read_tensor(&p, DType::I4, "input 'x'")
            .unwrap_err()
            .to_string();
        assert!(e.contains("holds uint8"), "{e}");
        std::fs::write(&p, npy_bytes(&[9.0], &[1], DType::I8, "t").unwrap()).unwrap();
        let e = read_tensor(&p, DType::I4, "input 'x'")
            .unwrap_err()
            .to_string();
        assert!(e.contains("outside int4's range"), "{e}");
        std::fs::write(&p, b"not numpy").unwrap();
        let e = read_tensor(&p, DType::F32, "input 'x'")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a .npy file"), "{e}");
    }

    #[test]
    fn integer_outputs_must_hold_exact_integers() {
        assert!(npy_bytes(&[1.5], &[1], DType::I32, "output 'y'").is_err());
        assert!(npy_bytes(&[256.0], &[1], DType::U8, "output 'y'").is_err());
        let e = npy_bytes(&[3e7], &[1], DType::I64, "output 'y'")
            .unwrap_err()
            .to_string();
        assert!(e.contains("output 'y'"), "{e}");
        assert!(npy_bytes(&[1.0], &[1], DType::F16, "output 'y'").is_err());
    }
}
