//! Malformed and hostile models: a one-line error and exit code 2, never a panic or an escape.

use crate::util::*;

fn inspect_fails(file: &str, needle: &str) {
    let p = fixture(&format!("hostile/{file}"));
    let o = zq(&["inspect", s(&p)]);
    o.assert_error(needle);
}

#[test]
fn not_onnx_and_truncated() {
    inspect_fails("not_onnx.onnx", "not a valid ONNX model");
    inspect_fails("truncated.onnx", "not a valid ONNX model");
}

#[test]
fn external_data_is_confined() {
    inspect_fails(
        "ext_escape.onnx",
        "must be a relative path inside the model's directory",
    );
    inspect_fails(
        "ext_abs.onnx",
        "must be a relative path inside the model's directory",
    );
    inspect_fails("ext_missing.onnx", "nope.bin");
    inspect_fails("ext_short.onnx", "holds 16 bytes");
}

#[test]
fn symlink_escape_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("hostile/ext_ok.bin"), outside.path().join("w.bin")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("w.bin"), d.path().join("ext_ok.bin")).unwrap();
    std::fs::copy(fixture("hostile/ext_ok.onnx"), d.path().join("m.onnx")).unwrap();
    let o = zq(&["inspect", s(&d.path().join("m.onnx"))]);
    o.assert_error("escapes the model's directory");
}

#[test]
fn declared_sizes_are_checked_before_allocation() {
    inspect_fails("huge_dims.onnx", "exceeds the limit");
    inspect_fails("dims_overflow.onnx", "exceeds the limit");
    inspect_fails("neg_dims.onnx", "negative dimension");
}

#[test]
fn unsupported_and_inconsistent_graphs() {
    inspect_fails("unsupported_op.onnx", "LSTM");
    let o = zq(&["inspect", s(&fixture("hostile/unsupported_op.onnx"))]);
    assert!(o.stderr.contains("opset 13"), "{}", o.stderr);
    inspect_fails(
        "bad_shapes.onnx",
        "cannot broadcast [1, 3, 4, 4] with [1, 5, 4, 4]",
    );
    inspect_fails("cycle.onnx", "cycle");
}

#[test]
fn valid_external_data_loads() {
    let o = zq(&["inspect", "--json", s(&fixture("hostile/ext_ok.onnx"))]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.json()["quantizable_layers"].as_array().unwrap().len(), 2);
}

#[test]
fn missing_file_and_directory() {
    zq(&["inspect", "no/such/model.onnx"]).assert_error("no/such/model.onnx");
    zq(&["inspect", s(&fixture("hostile"))]).assert_error("is a directory");
}

#[test]
fn absurd_input_shapes_are_refused_on_every_path() {
    // Regression: `quantize` (and `distill`) on a model whose input is declared
    // [1, C, 2^30, 2^30] ended in "internal error: capacity overflow" while inspect refused it
    // cleanly.
    absurd_input(&fixture("digits_bn/model.onnx"), 1);
    if let Some(sh) = shared() {
        absurd_input(&sh.join("models/resnet20_cifar10_bn.onnx"), 3);
    }
}

fn absurd_input(model: &std::path::Path, channels: usize) {
    use zq::ir::Dim;
    let t = tempfile::tempdir().unwrap();
    let mut g = zq::onnx::read_model(model).unwrap().graph;
    g.inputs[0].dims = vec![
        Dim::Fixed(1),
        Dim::Fixed(channels),
        Dim::Fixed(1 << 30),
        Dim::Fixed(1 << 30),
    ];
    let m = t.path().join("huge_input.onnx");
    zq::onnx::write::write_model(&g, &m).unwrap();
    let out = t.path().join("out");
    let data = fixture("digits_bn/test");
    let pre = ["--mean", "0.5", "--std", "0.5"];
    // Image counts whose product with the declared size wraps around to a non-zero capacity
    // (5 x 3 x 2^60) are what used to reach the allocator.
    let runs: [Vec<&str>; 5] = [
        vec!["inspect", s(&m)],
        vec![
            "distill",
            s(&m),
            "-o",
            s(&out),
            "--iters",
            "1",
            "--num",
            "5",
        ],
        vec![
            "quantize",
            s(&m),
            "-o",
            s(&out),
            "--iters",
            "1",
            "--num",
            "5",
        ],
        vec!["quantize", s(&m), "-o", s(&out), "--iters", "1"],
        vec!["eval", s(&m), "--data", s(&data)],
    ];
    for mut a in runs {
        if a[0] != "inspect" {
            a.extend_from_slice(&pre);
        }
        let o = zq(&a);
        eprintln!("{}: {}", a[0], o.stderr.trim());
        o.assert_error("elements");
        assert!(!out.exists(), "{a:?} wrote an output");
    }
}
