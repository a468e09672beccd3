//! `zq run`: outputs against ONNX Runtime's stored ones, every engine, and the one-line errors for
//! missing, extra, misnamed, mistyped and misshaped inputs.

use std::path::Path;

use zq::ir::DType;
use zq::pipeline::run::{npy_bytes, read_tensor};

use crate::util::*;

/// The digits fixture's input (from io.safetensors) as `dir/x.npy`, with ONNX Runtime's output.
fn digits_input(dir: &Path) -> (Vec<f32>, Vec<usize>) {
    let (x, xs, y, ys) = read_io(&fixture("digits_bn/io.safetensors"));
    std::fs::write(
        dir.join("x.npy"),
        npy_bytes(&x, &xs, DType::F32, "x").unwrap(),
    )
    .unwrap();
    assert_eq!(ys[0], xs[0]);
    (y, ys)
}

#[test]
fn digits_outputs_match_onnx_runtime_on_every_engine() {
    let d = tempfile::tempdir().unwrap();
    let (y, ys) = digits_input(d.path());
    let model = fixture("digits_bn/model.onnx");
    let ort = ort_lib();
    let mut engines = vec!["zq", "native"];
    if ort.is_some() {
        engines.push("ort");
    }
    for engine in engines {
        let out = d.path().join(engine);
        let mut args = vec![
            "run",
            s(&model),
            "--input",
            "input=x.npy",
            "-o",
            s(&out),
            "--engine",
            engine,
            "--json",
        ];
        if let Some(lib) = &ort {
            args.extend(["--ort-lib", s(lib)]);
        }
        let o = zq_in(d.path(), &args);
        assert_eq!(o.code, 0, "{}", o.stderr);
        let j = o.json();
        assert_eq!(j["engine"], engine);
        assert_eq!(j["outputs"][0]["name"], "logits");
        assert_eq!(j["outputs"][0]["dtype"], "float32");
        let got = read_tensor(&out.join("logits.npy"), DType::F32, "logits").unwrap();
        assert_eq!(got.shape, ys);
        let diff = max_abs_diff(&got.to_f32_vec(), &y);
        assert!(diff < 1e-4, "{engine}: max abs difference {diff}");
    }
}

#[test]
fn default_engine_is_zq_for_a_float_model_and_output_dir_defaults_to_cwd() {
    let d = tempfile::tempdir().unwrap();
    digits_input(d.path());
    let model = fixture("digits_bn/model.onnx");
    let o = zq_in(d.path(), &["run", s(&model), "-i", "input=x.npy", "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.json()["engine"], "zq");
    assert!(d.path().join("logits.npy").is_file());
}

#[test]
fn bad_inputs_are_one_line_errors_naming_the_input_and_file() {
    let d = tempfile::tempdir().unwrap();
    let (x, xs, _, _) = read_io(&fixture("digits_bn/io.safetensors"));
    let model = fixture("digits_bn/model.onnx");
    let write = |name: &str, v: &[f32], shape: &[usize], dt: DType| {
        std::fs::write(d.path().join(name), npy_bytes(v, shape, dt, name).unwrap()).unwrap();
    };
    write("x.npy", &x, &xs, DType::F32);
    let ints: Vec<f32> = x.iter().map(|v| v.round()).collect();
    write("ints.npy", &ints, &xs, DType::I64);
    write("flat.npy", &x, &[x.len()], DType::F32);
    let mut wide = xs.clone();
    wide[2] = 2;
    wide[3] = x.len() / (xs[0] * 2);
    write("wide.npy", &x, &wide, DType::F32);
    let run = |args: &[&str]| {
        let mut a = vec!["run", s(&model), "-o", "out"];
        a.extend_from_slice(args);
        zq_in(d.path(), &a)
    };
    run(&[]).assert_error("no --input for input");
    run(&["-i", "input=x.npy", "-i", "image=x.npy"])
        .assert_error("the model has no input 'image'; its inputs: input (float32 [N, 1, 8, 8])");
    run(&["-i", "input=x.npy", "-i", "input=x.npy"]).assert_error("--input input is given twice");
    run(&["-i", "input=ints.npy"]).assert_error("ints.npy: holds int64, input 'input' is float32");
    run(&["-i", "input=flat.npy"]).assert_error("input 'input' (flat.npy): shape");
    run(&["-i", "input=wide.npy"])
        .assert_error("differs from the declared [N, 1, 8, 8] at dimension 2");
    run(&["-i", "input=missing.npy"]).assert_error("missing.npy");
    run(&["-i", "input=x.txt"]).assert_error("give a .npy file or an ONNX TensorProto .pb file");
    run(&["-i", "input"]).assert_error("expected NAME=FILE");
    std::fs::write(d.path().join("bad.pb"), b"\xff\xff\xff").unwrap();
    run(&["-i", "input=bad.pb"]).assert_error("bad.pb: not an ONNX TensorProto");
    std::fs::write(d.path().join("afile"), b"").unwrap();
    let o = zq_in(
        d.path(),
        &["run", s(&model), "-i", "input=x.npy", "-o", "afile"],
    );
    o.assert_error("-o afile exists and is not a directory");
    // Nothing was written by any of the failures.
    assert!(!d.path().join("out").exists());
}

#[test]
fn integer_inputs_are_bound_and_int4_outputs_written_in_8_bit_containers() {
    // QuantizeLinear to int4 with an int4 zero point given as a .npy of int8: the output is an
    // int8 .npy of values in -8..=7, as ONNX defines them.
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("q4.onnx");
    let py = r#"
import sys, onnx
from onnx import helper, TensorProto as T
n = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])
g = helper.make_graph([n], "q", [helper.make_tensor_value_info("x", T.FLOAT, [4]),
    helper.make_tensor_value_info("s", T.FLOAT, []), helper.make_tensor_value_info("z", T.INT4, [])],
    [helper.make_tensor_value_info("y", T.INT4, [4])])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
m.ir_version = 10
onnx.save(m, sys.argv[1])
"#;
    let Some(made) = crate::conformance::python_run(py, &[s(&model)]) else {
        return;
    };
    assert!(made, "could not write the model");
    let w = |name: &str, v: &[f32], shape: &[usize], dt: DType| {
        std::fs::write(d.path().join(name), npy_bytes(v, shape, dt, name).unwrap()).unwrap();
    };
    w("x.npy", &[-20.0, -1.0, 0.4, 30.0], &[4], DType::F32);
    w("s.npy", &[2.0], &[], DType::F32);
    w("z.npy", &[1.0], &[], DType::I8);
    for engine in ["zq", "native"] {
        let y = run_y(d.path(), s(&model), &["x", "s", "z"], engine, DType::I8);
        // round(x / 2) + 1, saturated to int4: -10+1 -> -8, -0.5 -> 0 (+1), 0.2 -> 0 (+1), 15+1 -> 7.
        assert_eq!(y.to_i64_vec(), vec![-8, 1, 1, 7], "{engine}");
    }
}

#[test]
fn a_float16_cast_inside_a_float_graph_rounds_on_both_engines() {
    // x -> Cast(float16) -> Cast(float32): the values float16 holds, not x.
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("f16.onnx");
    let py = r#"
import sys, onnx
from onnx import helper, TensorProto as T
a = helper.make_node("Cast", ["x"], ["h"], to=T.FLOAT16)
b = helper.make_node("Cast", ["h"], ["y"], to=T.FLOAT)
g = helper.make_graph([a, b], "c", [helper.make_tensor_value_info("x", T.FLOAT, [4])],
    [helper.make_tensor_value_info("y", T.FLOAT, [4])])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
m.ir_version = 10
onnx.save(m, sys.argv[1])
"#;
    let Some(made) = crate::conformance::python_run(py, &[s(&model)]) else {
        return;
    };
    assert!(made, "could not write the model");
    let x = [1.0001f32, 65519.0, 1e-8, -(2.0 + 1.0 / 1024.0)];
    std::fs::write(
        d.path().join("x.npy"),
        npy_bytes(&x, &[4], DType::F32, "x").unwrap(),
    )
    .unwrap();
    for engine in ["zq", "native"] {
        let y = run_y(d.path(), s(&model), &["x"], engine, DType::F32);
        // -(2 + 2^-10) is halfway between two float16 values: ties to even (-2.0).
        assert_eq!(y.to_f32_vec(), vec![1.0, 65504.0, 0.0, -2.0], "{engine}");
    }
}

#[test]
fn qlinear_matmul_per_row_and_per_column_scales_match_onnx_reference() {
    // a [2, 3, 4] per-row scales (3), b [4, 5] int8 per-column scales (5), against ONNX's
    // definition (integer product, one rounding), computed in numpy.
    let d = tempfile::tempdir().unwrap();
    let py = r#"
import sys, os, onnx, numpy as np
from onnx import helper, numpy_helper, TensorProto as T
d = sys.argv[1]
rng = np.random.default_rng(0)
ins = {"a": rng.integers(0, 256, (2, 3, 4)).astype(np.uint8),
       "a_scale": np.array([0.02, 0.05, 0.011], np.float32), "a_zero_point": np.array([120, 3, 250], np.uint8),
       "b": rng.integers(-128, 128, (4, 5)).astype(np.int8),
       "b_scale": np.array([0.01, 0.03, 0.02, 0.005, 0.04], np.float32), "b_zero_point": np.array([0, 1, -2, 3, 0], np.int8),
       "y_scale": np.array(0.07, np.float32), "y_zero_point": np.array(128, np.uint8)}
n = helper.make_node("QLinearMatMul", list(ins), ["y"])
vi = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in ins.items()]
g = helper.make_graph([n], "q", vi, [helper.make_tensor_value_info("y", T.UINT8, [2, 3, 5])])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
m.ir_version = 10
onnx.save(m, os.path.join(d, "m.onnx"))
for k, v in ins.items():
    np.save(os.path.join(d, k + ".npy"), v)
A = ins["a"].astype(np.int32) - ins["a_zero_point"].astype(np.int32)[:, None]
B = ins["b"].astype(np.int32) - ins["b_zero_point"].astype(np.int32)
D = np.matmul(A, B) * (ins["a_scale"][:, None] * ins["b_scale"] / ins["y_scale"]) + 128
np.save(os.path.join(d, "expected.npy"), np.clip(np.rint(D), 0, 255).astype(np.uint8))
"#;
    let Some(made) = crate::conformance::python_run(py, &[s(d.path())]) else {
        return;
    };
    assert!(made, "could not write the model");
    let names = [
        "a",
        "a_scale",
        "a_zero_point",
        "b",
        "b_scale",
        "b_zero_point",
        "y_scale",
        "y_zero_point",
    ];
    exact_on_both_engines(d.path(), &names);
}

/// `zq run MODEL -i NAME=NAME.npy.. -o ENGINE --engine ENGINE` in `d`, and its output `y` read
/// back as `dt`.
fn run_y(d: &Path, model: &str, inputs: &[&str], engine: &str, dt: DType) -> zq::ir::Tensor {
    let mut args = vec!["run".to_string(), model.into()];
    for n in inputs {
        args.extend(["-i".into(), format!("{n}={n}.npy")]);
    }
    args.extend(["-o".into(), engine.into(), "--engine".into(), engine.into()]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = zq_in(d, &argv);
    assert_eq!(o.code, 0, "{engine}: {}", o.stderr);
    read_tensor(&d.join(engine).join("y.npy"), dt, "y").unwrap()
}

/// `zq run DIR/m.onnx` with `-i NAME=NAME.npy` for every name, on the reference and the native
/// engine: output `y` (uint8) must equal `DIR/expected.npy` exactly.
fn exact_on_both_engines(d: &Path, inputs: &[&str]) {
    let want = read_tensor(&d.join("expected.npy"), DType::U8, "y").unwrap();
    for engine in ["zq", "native"] {
        let y = run_y(d, "m.onnx", inputs, engine, DType::U8);
        assert_eq!(y.shape, want.shape, "{engine}");
        let off: Vec<(i64, i64)> = y
            .to_i64_vec()
            .into_iter()
            .zip(want.to_i64_vec())
            .filter(|(a, b)| a != b)
            .collect();
        assert!(
            off.is_empty(),
            "{engine}: {} of {} differ: {off:?}",
            off.len(),
            want.to_i64_vec().len()
        );
    }
}

#[test]
fn qlinear_matmul_after_quantize_linear_runs_on_the_integer_kernels_exactly() {
    // x -> QuantizeLinear -> QLinearMatMul(constant int8 b, per-column scales): the native
    // engine's integer GEMM and the reference executor's float path against ONNX's definition.
    let d = tempfile::tempdir().unwrap();
    let py = r#"
import sys, os, onnx, numpy as np
from onnx import helper, numpy_helper, TensorProto as T
d = sys.argv[1]
rng = np.random.default_rng(1)
x = rng.normal(size=(8, 32)).astype(np.float32)
b = rng.integers(-127, 128, (32, 16)).astype(np.int8)
bs = rng.uniform(0.001, 0.01, 16).astype(np.float32)
xs, xz, ys, yz = np.float32(0.03), np.uint8(128), np.float32(0.05), np.uint8(100)
inits = [numpy_helper.from_array(np.array(v), k) for k, v in
         [("xs", xs), ("xz", xz), ("b", b), ("bs", bs), ("bz", np.zeros(16, np.int8)), ("ys", ys), ("yz", yz)]]
nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["q"]),
         helper.make_node("QLinearMatMul", ["q", "xs", "xz", "b", "bs", "bz", "ys", "yz"], ["y"])]
g = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("x", T.FLOAT, [8, 32])],
    [helper.make_tensor_value_info("y", T.UINT8, [8, 16])], initializer=inits)
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
m.ir_version = 10
onnx.save(m, os.path.join(d, "m.onnx"))
np.save(os.path.join(d, "x.npy"), x)
q = np.clip(np.rint(x / xs) + 128, 0, 255).astype(np.int32) - 128
D = np.matmul(q, b.astype(np.int32)) * (xs * bs / ys) + 100
np.save(os.path.join(d, "expected.npy"), np.clip(np.rint(D), 0, 255).astype(np.uint8))
"#;
    let Some(made) = crate::conformance::python_run(py, &[s(d.path())]) else {
        return;
    };
    assert!(made, "could not write the model");
    exact_on_both_engines(d.path(), &["x"]);
}
