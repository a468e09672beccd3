//! The `zq` binary on the project's own fixtures: JSON reports, accuracy, exit codes.

use crate::util::*;

fn digits() -> String {
    fixture("digits_bn/model.onnx")
        .to_str()
        .unwrap()
        .to_string()
}

fn digits_test() -> String {
    fixture("digits_bn/test").to_str().unwrap().to_string()
}

#[test]
fn inspect_reports_layers() {
    let o = zq(&["inspect", "--json", &digits()]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let j = o.json();
    let ops = &j["ops"];
    let bn = j["bn_layers"].as_array().unwrap();
    assert_eq!(bn.len() as u64, ops["BatchNormalization"].as_u64().unwrap());
    assert!(bn.iter().all(|b| b["foldable"] == true), "{bn:?}");
    let q = j["quantizable_layers"].as_array().unwrap();
    assert_eq!(
        q.len() as u64,
        ops["Conv"].as_u64().unwrap() + ops["Gemm"].as_u64().unwrap()
    );
    let params: u64 = q.iter().map(|l| l["params"].as_u64().unwrap()).sum();
    assert!(params > 0 && params < j["params"].as_u64().unwrap());
    assert!(
        j["ops"]["Shape"].as_u64().unwrap() > 0,
        "the fixture carries shape arithmetic"
    );
    assert!(
        j["ops_executed"].get("Shape").is_none(),
        "shape arithmetic must be folded"
    );
    let size = &j["size"];
    assert!(size["int4_bytes"].as_u64() < size["int8_bytes"].as_u64());
    assert!(size["int8_bytes"].as_u64() < size["fp32_bytes"].as_u64());
    assert_eq!(j["inputs"][0]["shape"], serde_json::json!(["N", 1, 8, 8]));
    assert!(j["warnings"].as_array().unwrap().is_empty());
    // The text form names the same things.
    let t = zq(&["inspect", &digits()]);
    assert_eq!(t.code, 0);
    assert!(
        t.stdout.contains("BatchNormalization layers (")
            && t.stdout.contains("quantizable layers (")
    );
}

#[test]
fn inspect_warns_without_batchnorm() {
    let o = zq(&["inspect", "--json", s(&fixture("folded_nobn/model.onnx"))]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let j = o.json();
    assert!(j["bn_layers"].as_array().unwrap().is_empty());
    let w = j["warnings"].as_array().unwrap();
    assert!(
        w.iter()
            .any(|w| w.as_str().unwrap().contains("no BatchNormalization")),
        "{w:?}"
    );
}

#[test]
fn eval_digits_matches_onnx_runtime_accuracy() {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("digits_bn/expected.json")).unwrap())
            .unwrap();
    let o = zq(&[
        "eval",
        &digits(),
        "--data",
        &digits_test(),
        "--mean",
        "0.5",
        "--std",
        "0.5",
        "--batch",
        "16",
        "--json",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let j = o.json();
    assert_eq!(j["n"], expected["n"]);
    assert_eq!(
        j["top1"].as_f64().unwrap(),
        expected["top1"].as_f64().unwrap()
    );
    assert!(j["ms_per_image"].as_f64().unwrap() > 0.0);
    assert_eq!(j["classes"], 10);
}

#[test]
fn eval_compare_and_limit() {
    let o = zq(&[
        "eval",
        &digits(),
        "--data",
        &digits_test(),
        "--mean",
        "0.5",
        "--std",
        "0.5",
        "--limit",
        "20",
        "--compare",
        &digits(),
        "--json",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let j = o.json();
    assert_eq!(j["n"], 20);
    assert_eq!(j["agreement"], 1.0);
    assert_eq!(j["reference_top1"], j["top1"]);
    // A different model disagrees somewhere: wrong preprocessing on the reference side is not
    // possible, so compare against the ops-free digits model under a broken normalisation instead.
    let bad = zq(&[
        "eval",
        &digits(),
        "--data",
        &digits_test(),
        "--mean",
        "0",
        "--std",
        "1",
        "--json",
    ]);
    assert!(bad.json()["top1"].as_f64().unwrap() < j["top1"].as_f64().unwrap() + 1e-9);
}

#[test]
fn eval_with_onnx_runtime_engine_agrees() {
    let Some(lib) = ort_lib() else { return };
    let o = zq(&[
        "eval",
        &digits(),
        "--data",
        &digits_test(),
        "--mean",
        "0.5",
        "--std",
        "0.5",
        "--engine",
        "ort",
        "--ort-lib",
        s(&lib),
        "--json",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let z = zq(&[
        "eval",
        &digits(),
        "--data",
        &digits_test(),
        "--mean",
        "0.5",
        "--std",
        "0.5",
        "--json",
    ]);
    assert_eq!(o.json()["top1"], z.json()["top1"]);
    assert_eq!(o.json()["engine"], "ort");
}

#[test]
fn bad_input_is_a_one_line_error() {
    zq(&["eval", &digits(), "--data", "/no/such/dir"]).assert_error("/no/such/dir");
    zq(&[
        "eval",
        &digits(),
        "--data",
        &digits_test(),
        "--mean",
        "0.5,0.5",
    ])
    .assert_error("--mean has 2 values");
    zq(&[
        "eval",
        &digits(),
        "--data",
        &digits_test(),
        "--mean",
        "0.5",
        "--std",
        "0",
    ])
    .assert_error("--std");
    zq(&["eval", &digits(), "--data", &digits_test(), "--mean", "abc"]).assert_error("--mean");
    zq(&["eval", &digits(), "--data", &digits_test(), "--limit", "0"]).assert_error("--limit");
    zq(&[
        "eval",
        &digits(),
        "--data",
        &digits_test(),
        "--engine",
        "ort",
        "--ort-lib",
        "/no/libort.so",
    ])
    .assert_error("/no/libort.so");
    zq(&["eval", &digits(), "--data", &digits_test(), "--batch", "0"]).assert_error("--batch");
    zq(&["frobnicate"]).assert_error("frobnicate");
    // A model that is fine but whose input differs from the reference's.
    zq(&[
        "eval",
        &digits(),
        "--data",
        &digits_test(),
        "--compare",
        s(&fixture("mobile_dw/model.onnx")),
    ])
    .assert_error("--compare");
}

#[test]
fn help_and_version() {
    let o = zq(&["--help"]);
    assert_eq!(o.code, 0);
    assert!(o.stdout.contains("inspect") && o.stdout.contains("eval"));
    assert!(zq(&["--version"]).stdout.starts_with("zq "));
}

#[test]
fn bench_measures_every_kernel_variant_and_refuses_an_unknown_one() {
    let o = zq(&["bench", "--filter", "256x32", "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let j = o.json();
    let rows = j["rows"].as_array().unwrap();
    assert!(rows.iter().any(|r| r["variant"] == "scalar"), "{j}");
    assert!(
        rows.iter().all(|r| r["gops"].as_f64().unwrap() > 0.0),
        "{j}"
    );
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_zq"))
        .args(["bench", "--filter", "256x32"])
        .env("ZQ_KERNELS", "bogus")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("ZQ_KERNELS"));
    zq(&["bench", "--filter", "no-such-shape"]).assert_error("--filter");
}

/// `zq bench --model`'s report: a row per batch size, a time per round, ONNX Runtime beside zq
/// when it is there and a one-line note (and `ort_missing`) when it is not.
#[test]
fn bench_model_times_zq_beside_onnx_runtime_or_alone() {
    let m = fixture("digits_bn/model.onnx");
    let args = [
        "bench",
        "--model",
        s(&m),
        "--mean",
        "0.5",
        "--std",
        "0.5",
        "--batch",
        "1,4",
        "--rounds",
        "3",
        "--round-time",
        "0.01",
        "--engine",
        "native",
        "--json",
    ];
    let check = |j: &serde_json::Value, ort: bool| {
        assert_eq!(j["engine"], "native", "{j}");
        assert_eq!(j["quantized"], false, "{j}");
        assert_eq!(j["input"], serde_json::json!([1, 8, 8]), "{j}");
        let rows = j["batches"].as_array().unwrap();
        assert_eq!(
            rows.iter()
                .map(|r| r["batch"].as_u64().unwrap())
                .collect::<Vec<_>>(),
            [1, 4],
            "{j}"
        );
        for r in rows {
            let zq = &r["zq"];
            assert_eq!(
                zq["rounds_ms_per_image"].as_array().unwrap().len(),
                3,
                "{j}"
            );
            let (med, best) = (
                zq["ms_per_image"].as_f64().unwrap(),
                zq["best_ms_per_image"].as_f64().unwrap(),
            );
            assert!(best > 0.0 && best <= med, "{j}");
            assert!(zq["runs_per_round"].as_u64().unwrap() >= 1, "{j}");
            if ort {
                let o = r["ort"]["ms_per_image"].as_f64().unwrap();
                let ratio = r["ratio"].as_f64().unwrap();
                assert!((ratio - med / o).abs() <= 1e-9 * ratio, "{j}");
                // The float model on both engines: the same class for every input.
                assert_eq!(r["agreement"].as_f64(), Some(1.0), "{j}");
            } else {
                assert!(r["ort"].is_null() && r["ratio"].is_null(), "{j}");
            }
        }
        assert_eq!(j.get("ort_missing").is_some(), !ort, "{j}");
    };
    if ort_lib().is_some() {
        let o = zq(&args);
        assert_eq!(o.code, 0, "{}", o.stderr);
        check(&o.json(), true);
    }
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_zq"))
        .args(args)
        .env_remove("ZQ_ORT_LIB")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("ONNX Runtime not available"), "{err}");
    check(&serde_json::from_slice(&o.stdout).unwrap(), false);
    zq(&["bench", "--model", s(&m), "--batch", "1,x"]).assert_error("--batch");
    zq(&[
        "bench",
        "--model",
        s(&m),
        "--ort-lib",
        "/no/such/libonnxruntime.so",
    ])
    .assert_error("--ort-lib");
    zq(&["bench", "--model", s(&m), "--filter", "conv"]).assert_error("--filter");
    zq(&["bench", "--rounds", "2"]).assert_error("--model");
}
