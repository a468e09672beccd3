//! `zq quantize`: QDQ ONNX output checked by ONNX Runtime, zq's own prediction of it, the quality
//! gate, and bad input.

use std::path::Path;

use candle_core::Tensor;
use zq::data::{load_batch, ImageFolder, Preprocess};
use zq::exec::Plan;
use zq::onnx::read_model;

use crate::util::*;

/// Predictions of `model` by zq's executor and by ONNX Runtime on `x` [n, c, h, w]:
/// (fraction where they agree, max abs score difference).
pub fn zq_vs_ort(model: &Path, x: &[f32], shape: [usize; 4], lib: &Path) -> (f64, f32) {
    let g = read_model(model).unwrap().graph;
    let [n, c, h, w] = shape;
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let ort = zq::exec::ort::OrtModel::open(model, Some(lib), 2).unwrap();
    let b = 100.min(n);
    let plan = Plan::new(&g, b).unwrap();
    for s in (0..n).step_by(b) {
        let m = b.min(n - s);
        let xs = x[s * c * h * w..(s + m) * c * h * w].to_vec();
        let p = if m == b {
            None
        } else {
            Some(Plan::new(&g, m).unwrap())
        };
        let p = p.as_ref().unwrap_or(&plan);
        let t = Tensor::from_vec(xs.clone(), (m, c, h, w), p.device()).unwrap();
        ours.extend(
            p.run(&[t]).unwrap()[0]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
        theirs.extend(ort.run(xs, &[m, c, h, w]).unwrap().1);
    }
    let k = ours.len() / n;
    let agree = zq_quant::sensitivity::agreement(&ours, &theirs, k);
    (agree, max_abs_diff(&ours, &theirs))
}

/// The real test digits, preprocessed, and their [n, c, h, w].
pub fn digits_test() -> (Vec<f32>, [usize; 4]) {
    let folder = ImageFolder::open(&fixture("digits_bn/test")).unwrap();
    let pre = Preprocess {
        mean: vec![0.5],
        std: vec![0.5],
    };
    let x = load_batch(&folder.items, 1, 8, 8, &pre).unwrap();
    (x, [folder.items.len(), 1, 8, 8])
}

/// Calibration flags for the digits fixture (its input convention, a short distillation, and
/// held-out images for the estimate).
pub const DIGITS: &[&str] = &[
    "--mean",
    "0.5",
    "--std",
    "0.5",
    "--num",
    "32",
    "--iters",
    "150",
    "--holdout",
    "16",
];

#[test]
fn digits_w8a8_runs_in_onnx_runtime_and_zq_predicts_it() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("q.onnx");
    let m = fixture("digits_bn/model.onnx");
    let mut args = vec!["quantize", s(&m), "-o", s(&out), "--json"];
    args.extend_from_slice(DIGITS);
    let o = zq(&args);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let j = o.json();
    assert_eq!(j["bn_folded"], 4);
    assert!(j["layers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|l| l["bits"] == 8));
    assert!(j["quality"]["agreement"].as_f64().unwrap() > 0.5);
    assert!(
        j["quantized_weight_bytes"].as_u64().unwrap() * 3
            < j["fp32_weight_bytes"].as_u64().unwrap()
    );
    // Every activation and weight goes through QuantizeLinear/DequantizeLinear (a conv output
    // that only a Relu reads is quantized after the Relu).
    let g = read_model(&out).unwrap().graph;
    let count = |op: &str| g.nodes.iter().filter(|n| n.op.name() == op).count();
    assert_eq!(count("BatchNormalization"), 0);
    assert!(count("QuantizeLinear") >= 9, "{}", count("QuantizeLinear"));
    assert_eq!(count("DequantizeLinear"), count("QuantizeLinear") + 2 * 5);
    // zq's accuracy on the real test digits stays near FP32's 98%.
    let e = zq(&[
        "eval",
        s(&out),
        "--data",
        s(&fixture("digits_bn/test")),
        "--mean",
        "0.5",
        "--std",
        "0.5",
        "--json",
    ]);
    assert_eq!(e.code, 0, "{}", e.stderr);
    let top1 = e.json()["top1"].as_f64().unwrap();
    assert!(top1 >= 0.95, "quantized digits top-1 {top1}");
    let Some(lib) = ort_lib() else { return };
    let (x, shape) = digits_test();
    let ops = zq::exec::ort::executed_ops(&out, Some(&lib)).unwrap();
    assert_eq!(
        ops.get("QLinearConv"),
        Some(&4),
        "ONNX Runtime runs {ops:?}"
    );
    let (agree, diff) = zq_vs_ort(&out, &x, shape, &lib);
    eprintln!("digits W8A8: zq vs ONNX Runtime agreement {agree}, max logit difference {diff}");
    assert!(
        agree >= 0.995,
        "zq predicts ONNX Runtime's class on {agree}"
    );
}

#[test]
fn weight_bits_per_tensor_and_overrides() {
    let t = tempfile::tempdir().unwrap();
    let m = fixture("digits_bn/model.onnx");
    let out = t.path().join("q4.onnx");
    let mut args = vec![
        "quantize",
        s(&m),
        "-o",
        s(&out),
        "--json",
        "--wbits",
        "4",
        "--per-tensor",
        "--layer-bits",
        "Conv_2=8",
        "--keep-float",
        "Gemm_42",
    ];
    args.extend_from_slice(DIGITS);
    let o = zq(&args);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let j = o.json();
    let bits: Vec<_> = j["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["name"].as_str().unwrap().to_string(), l["bits"].clone()))
        .collect();
    assert!(
        bits.contains(&("Conv_2".into(), serde_json::json!(8))),
        "{bits:?}"
    );
    assert!(
        bits.contains(&("Gemm_42".into(), serde_json::Value::Null)),
        "{bits:?}"
    );
    assert!(bits.iter().filter(|b| b.1 == 4).count() >= 2, "{bits:?}");
    // 4-bit weights really take 16 levels at most per tensor.
    let g = read_model(&out).unwrap().graph;
    let w = g
        .values
        .iter()
        .find(|v| v.name == "Conv_8_weight_quantized")
        .expect("Conv_8 weight");
    let q = w.konst.as_ref().unwrap().to_i64_vec();
    assert!(q.iter().all(|&v| (-8..=7).contains(&v)), "4-bit range");
    // Stored as INT4 initializers (two per byte), which needs opset 21.
    assert_eq!(w.konst.as_ref().unwrap().dtype, zq::ir::DType::I4);
    assert_eq!(g.opset, 21);
    if let Some(lib) = ort_lib() {
        let (x, shape) = digits_test();
        let (agree, _) = zq_vs_ort(&out, &x, shape, &lib);
        assert!(agree >= 0.995, "{agree}");
    }
}

#[test]
fn calibration_from_a_distilled_file_and_the_quality_gate() {
    let t = tempfile::tempdir().unwrap();
    let m = fixture("digits_bn/model.onnx");
    let d = t.path().join("d.safetensors");
    let o = zq(&[
        "distill",
        s(&m),
        "-o",
        s(&d),
        "--num",
        "16",
        "--iters",
        "50",
        "--mean",
        "0.5",
        "--std",
        "0.5",
        "--stats",
        "batch",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let out = t.path().join("q.onnx");
    let base = [
        "quantize",
        s(&m),
        "-o",
        s(&out),
        "--data",
        s(&d),
        "--mean",
        "0.5",
        "--std",
        "0.5",
        "--holdout",
        "8",
        "--iters",
        "50",
    ];
    // An impossible gate: exit 1, nothing written.
    let mut a = base.to_vec();
    a.extend(["--max-kl", "0"]);
    let o = zq(&a);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(o.stderr.contains("--max-kl"), "{}", o.stderr);
    assert!(!out.exists());
    // A gate that holds.
    let mut a = base.to_vec();
    a.extend(["--min-agreement", "0", "--json"]);
    let o = zq(&a);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(out.exists());
    assert!(o.json()["calibration"]
        .as_str()
        .unwrap()
        .contains("d.safetensors"));
}

#[test]
fn bad_input_is_refused_and_nothing_written() {
    let t = tempfile::tempdir().unwrap();
    let m = fixture("digits_bn/model.onnx");
    let out = t.path().join("q.onnx");
    let mobile = t.path().join("mobile.safetensors");
    let o = zq(&[
        "distill",
        s(&fixture("mobile_dw/model.onnx")),
        "-o",
        s(&mobile),
        "--num",
        "2",
        "--iters",
        "1",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    for (flags, needle) in [
        (vec!["--layer-bits", "nosuch=4"], "nosuch"),
        (vec!["--layer-bits", "Conv_2=9"], "Conv_2=9"),
        (vec!["--layer-bits", "Conv_2"], "NAME=BITS"),
        (vec!["--keep-float", "nosuch"], "nosuch"),
        (vec!["--wbits", "1"], "--wbits"),
        (vec!["--abits", "9"], "--abits"),
        (vec!["--min-agreement", "1.5"], "--min-agreement"),
        (vec!["--data", s(&mobile)], "mobile.safetensors"),
        (vec!["--data", s(&m)], "model.onnx"),
    ] {
        let mut a = vec![
            "quantize",
            s(&m),
            "-o",
            s(&out),
            "--mean",
            "0.5",
            "--std",
            "0.5",
            "--iters",
            "1",
            "--num",
            "2",
            "--holdout",
            "0",
        ];
        a.extend(flags.iter());
        zq(&a).assert_error(needle);
        assert!(!out.exists(), "{flags:?}");
    }
    zq(&[
        "quantize",
        s(&m),
        "-o",
        s(&m.join("q.onnx")),
        "--iters",
        "1",
    ])
    .assert_error("-o");
    zq(&[
        "quantize",
        s(&fixture("folded_nobn/model.onnx")),
        "-o",
        s(&out),
    ])
    .assert_error("BatchNormalization");
    assert_eq!(
        std::fs::read_dir(t.path()).unwrap().count(),
        1,
        "only the distilled file"
    );
}

/// The digits fixture quantized to `q.onnx` and `q.safetensors` in `dir` with `flags` (and the
/// digits calibration flags); returns both paths and the safetensors run's summary.
fn both_formats(dir: &Path, flags: &[&str]) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let m = fixture("digits_bn/model.onnx");
    let (onnx, st) = (dir.join("q.onnx"), dir.join("q.safetensors"));
    let mut summary = String::new();
    for (out, fmt) in [(&onnx, "onnx"), (&st, "safetensors")] {
        let mut a = vec!["quantize", s(&m), "-o", s(out), "--format", fmt];
        a.extend_from_slice(flags);
        a.extend_from_slice(&DIGITS[..8]);
        let o = zq(&a);
        assert_eq!(o.code, 0, "{}", o.stderr);
        summary = o.stdout;
    }
    (onnx, st, summary)
}

/// The JSON plan in a quantized safetensors file's header.
fn plan_of(bytes: &[u8]) -> serde_json::Value {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).unwrap();
    serde_json::from_str(&header.metadata().as_ref().unwrap()["zq"]).unwrap()
}

#[test]
fn safetensors_output_holds_the_same_packed_weights_as_the_onnx_output() {
    let t = tempfile::tempdir().unwrap();
    let (onnx, st, _) = both_formats(
        t.path(),
        &[
            "--wbits",
            "4",
            "--layer-bits",
            "Gemm_42=8",
            "--holdout",
            "0",
        ],
    );
    let g = read_model(&onnx).unwrap().graph;
    let bytes = std::fs::read(&st).unwrap();
    let f = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let plan = plan_of(&bytes);
    assert_eq!(plan["format"], "zq.quantized.v1");
    let layers = plan["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 5);
    for l in layers {
        let name = l["name"].as_str().unwrap();
        let want = g
            .values
            .iter()
            .find(|v| v.name == format!("{name}_weight_quantized"))
            .and_then(|v| v.konst.as_ref())
            .unwrap()
            .to_i64_vec();
        let w = f.tensor(l["weight"].as_str().unwrap()).unwrap();
        let got = if l["packing"] == "int4x2" {
            assert_eq!(
                w.data().len(),
                want.len().div_ceil(2),
                "{name}: two per byte"
            );
            zq::pipeline::packed::unpack_int4(w.data(), want.len())
        } else {
            w.data().iter().map(|&b| i64::from(b as i8)).collect()
        };
        assert_eq!(got, want, "{name}");
        assert_eq!(l["bits"], if name == "Gemm_42" { 8 } else { 4 });
        assert!(l["input"]["scale"].as_f64().unwrap() > 0.0, "{name}");
    }
    assert!(!plan["activations"].as_array().unwrap().is_empty());
}

/// The float weights a layer of a quantized ONNX graph computes with: dequantized integers,
/// float16 cast back, or the float constant itself.
fn onnx_layer_weights(g: &zq::ir::Graph, layer: &str) -> Vec<f32> {
    use zq::ir::Op;
    let n = g.nodes.iter().find(|n| n.name == layer).unwrap();
    let w = n.input(1).unwrap();
    if let Some(t) = g.konst(w) {
        return t.to_f32_vec();
    }
    let p = g.nodes.iter().find(|p| p.outputs.contains(&w)).unwrap();
    let c = |i: usize| g.konst(p.input(i).unwrap()).unwrap();
    match p.op {
        Op::Cast { .. } => c(0).to_f32_vec(),
        Op::DequantizeLinear { .. } => {
            let (q, scales, zp) = (c(0).to_i64_vec(), c(1).to_f32_vec(), c(2).to_i64_vec());
            let per = q.len() / scales.len();
            q.iter()
                .enumerate()
                .map(|(i, &v)| (v - zp[(i / per) % zp.len()]) as f32 * scales[i / per])
                .collect()
        }
        ref other => panic!("{layer}: weight made by {other:?}"),
    }
}

#[test]
fn every_layer_is_recoverable_from_both_output_formats() {
    // Regression: a float16 layer used to vanish from the safetensors output (its plan listed
    // one layer fewer and held no weight for it) while the summary counted it as quantized.
    let t = tempfile::tempdir().unwrap();
    let m = fixture("digits_bn/model.onnx");
    let (onnx, st, summary) = both_formats(
        t.path(),
        &[
            "--layer-bits",
            "Conv_8=16",
            "--layer-bits",
            "Conv_2=4",
            "--keep-float",
            "Conv_14",
            "--int4-grid",
            "affine",
            "--holdout",
            "0",
        ],
    );
    assert!(
        summary.contains("3 of 5 layers quantized to integers (1 float16, 1 float;"),
        "{summary}"
    );
    let g = read_model(&onnx).unwrap().graph;
    let bytes = std::fs::read(&st).unwrap();
    let f = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let plan = plan_of(&bytes);
    let layers = plan["layers"].as_array().unwrap();
    let source = read_model(&m).unwrap().graph;
    let weighted: Vec<&str> = source
        .nodes
        .iter()
        .filter(|n| n.op.is_weighted())
        .map(|n| n.name.as_str())
        .collect();
    assert_eq!(layers.len(), weighted.len(), "every layer is in the plan");
    for name in weighted {
        let l = layers.iter().find(|l| l["name"] == name).unwrap();
        // The 4-bit layer is on the affine grid: its zero points are stored.
        assert_eq!(
            l["weight_zero_point"].is_string(),
            name == "Conv_2",
            "{name}: {l}"
        );
        let w = f.tensor(l["weight"].as_str().unwrap()).unwrap();
        let n: usize = w.shape().iter().product();
        let from_st: Vec<f32> = match l["packing"].as_str().unwrap() {
            "float16" => {
                assert_eq!(w.dtype(), safetensors::Dtype::F16, "{name}");
                w.data()
                    .chunks(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect()
            }
            "float32" => w
                .data()
                .chunks(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            packing => {
                let scales: Vec<f32> = f
                    .tensor(l["weight_scale"].as_str().unwrap())
                    .unwrap()
                    .data()
                    .chunks(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect();
                let count: usize = l["weight_shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .product();
                let q: Vec<i64> = if packing == "int4x2" {
                    zq::pipeline::packed::unpack_int4(w.data(), count)
                } else {
                    assert_eq!(n, count);
                    w.data().iter().map(|&b| i64::from(b as i8)).collect()
                };
                let zero_points: Vec<f32> = match l["weight_zero_point"].as_str() {
                    Some(z) => f
                        .tensor(z)
                        .unwrap()
                        .data()
                        .iter()
                        .map(|&b| f32::from(b as i8))
                        .collect(),
                    None => vec![0.0; scales.len()],
                };
                assert_eq!(zero_points.len(), scales.len(), "{name}");
                let per = q.len() / scales.len();
                q.iter()
                    .enumerate()
                    .map(|(i, &v)| (v as f32 - zero_points[i / per]) * scales[i / per])
                    .collect()
            }
        };
        assert_eq!(from_st, onnx_layer_weights(&g, name), "{name}");
        let want_bits = match name {
            "Conv_8" => 16,
            "Conv_2" => 4,
            "Conv_14" => 32,
            _ => 8,
        };
        assert_eq!(l["bits"], want_bits, "{name}");
    }
}

#[test]
fn the_pareto_size_model_counts_float16_layers_in_safetensors() {
    // With float16 layers stored, every layer at 16 bits costs more than every layer at 8.
    let t = tempfile::tempdir().unwrap();
    let m = fixture("digits_bn/model.onnx");
    let out = t.path().join("p.safetensors");
    let front = t.path().join("f.json");
    let mut a = vec![
        "quantize",
        s(&m),
        "-o",
        s(&out),
        "--format",
        "safetensors",
        "--pareto",
        "--bits",
        "8,16",
        "--budget",
        "1MB",
        "--frontier",
        s(&front),
    ];
    a.extend_from_slice(&PARETO_CALIB);
    let o = zq(&a);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(&front).unwrap()).unwrap();
    let uniform = |b: u64| {
        j["uniform"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["bits"][0] == b)
            .unwrap()["bytes"]
            .as_u64()
            .unwrap()
    };
    assert!(
        uniform(16) > uniform(8),
        "{} vs {}",
        uniform(16),
        uniform(8)
    );
    // The chosen point (every layer at 16 bits fits 1 MB and is least sensitive) is written
    // at the predicted size.
    assert_eq!(
        std::fs::metadata(&out).unwrap().len(),
        j["predicted_bytes"].as_u64().unwrap()
    );
}

/// An `images` safetensors file of `[n, 1, 8, 8]` (the digits fixture's input).
fn images_file(path: &Path, x: &[f32]) {
    let n = x.len() / 64;
    let data: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![n, 1, 8, 8], &data)
        .unwrap();
    let bytes = safetensors::tensor::serialize([("images", v)], None).unwrap();
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn calibration_uses_every_image_including_a_short_last_batch() {
    // Regression: with 33 images and batches of 32, the 33rd used to be dropped while the report
    // said 33. Here it is the only one with any contrast, so its activation ranges must show.
    let t = tempfile::tempdir().unwrap();
    let m = fixture("digits_bn/model.onnx");
    let odd = pseudo_random(64, 7);
    let mut all = vec![0.0f32; 32 * 64];
    all.extend_from_slice(&odd);
    let (many, one) = (
        t.path().join("many.safetensors"),
        t.path().join("one.safetensors"),
    );
    images_file(&many, &all);
    images_file(&one, &odd);
    let run = |d: &Path| {
        let out = t.path().join("q.onnx");
        let o = zq(&[
            "quantize",
            s(&m),
            "--data",
            s(d),
            "--holdout",
            "0",
            "--mean",
            "0.5",
            "--std",
            "0.5",
            "-o",
            s(&out),
            "--json",
        ]);
        assert_eq!(o.code, 0, "{}", o.stderr);
        o.json()
    };
    let (j_many, j_one) = (run(&many), run(&one));
    assert_eq!(j_many["calibration_images"], 33);
    let ranges = |j: &serde_json::Value| -> Vec<(String, f64, f64)> {
        j["activations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                let o = a["observed"].as_array().unwrap();
                (
                    a["tensor"].as_str().unwrap().to_string(),
                    o[0].as_f64().unwrap(),
                    o[1].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let (rm, ro) = (ranges(&j_many), ranges(&j_one));
    assert_eq!(rm.len(), ro.len());
    let mut wider = 0;
    for ((name, lo_m, hi_m), (_, lo_o, hi_o)) in rm.iter().zip(&ro) {
        assert!(
            lo_m <= lo_o && hi_m >= hi_o,
            "{name}: [{lo_m}, {hi_m}] misses [{lo_o}, {hi_o}]"
        );
        wider += usize::from(hi_o - lo_o > 1e-3);
    }
    assert!(wider > 0, "the odd image must have ranges of its own");
}

/// Calibration flags of the Pareto tests on the digits fixture.
const PARETO_CALIB: [&str; 10] = [
    "--mean",
    "0.5",
    "--std",
    "0.5",
    "--num",
    "32",
    "--iters",
    "100",
    "--holdout",
    "0",
];

#[test]
fn pareto_fits_the_budget_with_the_predicted_size() {
    let t = tempfile::tempdir().unwrap();
    let m = fixture("digits_bn/model.onnx");
    let calib = PARETO_CALIB;
    for (fmt, budget) in [("onnx", "14.5KB"), ("safetensors", "9.5KB")] {
        let out = t.path().join(format!("p.{fmt}"));
        let fr = t.path().join(format!("f-{fmt}.json"));
        let mut a = vec![
            "quantize",
            s(&m),
            "-o",
            s(&out),
            "--format",
            fmt,
            "--pareto",
            "--budget",
            budget,
            "--frontier",
            s(&fr),
            "--json",
        ];
        a.extend_from_slice(&calib);
        let o = zq(&a);
        assert_eq!(o.code, 0, "{}", o.stderr);
        let j = o.json();
        let written = std::fs::metadata(&out).unwrap().len();
        let budget: u64 = j["pareto"]["budget"].as_u64().unwrap();
        let predicted = j["pareto"]["predicted_bytes"].as_u64().unwrap();
        assert_eq!(j["file_bytes"].as_u64().unwrap(), written);
        assert!(written <= budget, "{fmt}: {written} > {budget}");
        let err = (written as f64 - predicted as f64).abs() / written as f64;
        assert!(
            err <= 0.01,
            "{fmt}: predicted {predicted}, written {written}"
        );
        // The frontier: sizes up, summed sensitivity down; the chosen point is on it and fits.
        let f: serde_json::Value = serde_json::from_slice(&std::fs::read(&fr).unwrap()).unwrap();
        let pts = f["frontier"].as_array().unwrap();
        assert!(pts.len() >= 3, "{fmt}: {} points", pts.len());
        for w in pts.windows(2) {
            assert!(w[0]["bytes"].as_u64() < w[1]["bytes"].as_u64());
            assert!(w[0]["sensitivity"].as_f64() > w[1]["sensitivity"].as_f64());
        }
        // The chosen point's bytes are the written size; the frontier's are predicted (the
        // safetensors header pads to 8 bytes, so they may differ by a few bytes).
        let chosen = &f["chosen"];
        let on = pts
            .iter()
            .find(|q| q["bits"] == chosen["bits"] && q["sensitivity"] == chosen["sensitivity"]);
        let Some(on) = on else {
            panic!("{fmt}: {chosen} not in {pts:?}")
        };
        let (a, b) = (
            on["bytes"].as_f64().unwrap(),
            chosen["bytes"].as_f64().unwrap(),
        );
        assert!((a - b).abs() <= 0.01 * b, "{fmt}: {on} vs chosen {chosen}");
        // Sensitivity grows as bits shrink, layer by layer.
        for row in f["sensitivity"].as_array().unwrap() {
            let v: Vec<f64> = row
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p[1].as_f64().unwrap())
                .collect();
            assert!(v.first() > v.last(), "{v:?}");
        }
        let bits: Vec<u64> = f["chosen"]["bits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap())
            .collect();
        assert!(
            bits.iter().any(|&b| b < 8) || budget as f64 > 1.3 * written as f64,
            "{bits:?}"
        );
    }
    // Infeasible: exit 1, names the smallest size, writes nothing.
    let out = t.path().join("none.onnx");
    let mut a = vec![
        "quantize",
        s(&m),
        "-o",
        s(&out),
        "--pareto",
        "--budget",
        "1KB",
    ];
    a.extend_from_slice(&calib);
    let o = zq(&a);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(
        o.stderr.contains("smallest achievable size"),
        "{}",
        o.stderr
    );
    assert!(!out.exists());
    // Budget flags are checked before any work.
    zq(&["quantize", s(&m), "--pareto", "--budget", "4XB"]).assert_error("--budget");
    zq(&[
        "quantize",
        s(&m),
        "--pareto",
        "--budget",
        "1MB",
        "--bits",
        "4,9",
    ])
    .assert_error("--bits");
    zq(&["quantize", s(&m), "--budget", "1MB"]).assert_error("--pareto");
}

#[test]
fn pareto_with_float16_candidates_bops_budget_and_plot() {
    let t = tempfile::tempdir().unwrap();
    let m = fixture("digits_bn/model.onnx");
    let calib = PARETO_CALIB;
    let out = t.path().join("p.onnx");
    let svg = t.path().join("f.svg");
    let mut a = vec![
        "quantize",
        s(&m),
        "-o",
        s(&out),
        "--pareto",
        "--budget",
        "25KB",
        "--bits",
        "4,8,16",
        "--plot",
        s(&svg),
        "--json",
    ];
    a.extend_from_slice(&calib);
    let o = zq(&a);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let p = &o.json()["pareto"];
    // With room for everything, float16 wins where it is cheaper than losing accuracy.
    assert!(
        p["chosen"]["bits"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!(16)),
        "{p}"
    );
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(
        plot.starts_with("<svg") && plot.contains("chosen") && plot.contains("W4"),
        "{}",
        &plot[..200]
    );
    // ONNX Runtime runs the float16 + Cast layers.
    if let Some(lib) = ort_lib() {
        let (x, shape) = digits_test();
        let (agree, _) = zq_vs_ort(&out, &x, shape, &lib);
        assert!(agree >= 0.995, "{agree}");
    }
    // A bit-operations budget alone: the chosen assignment meets it.
    let fp8: u64 = p["macs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() * 64)
        .sum();
    let budget = (fp8 * 3 / 4).to_string();
    let mut a = vec![
        "quantize",
        s(&m),
        "-o",
        s(&out),
        "--pareto",
        "--bops-budget",
        &budget,
        "--json",
    ];
    a.extend_from_slice(&calib);
    let o = zq(&a);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let chosen = o.json()["pareto"]["chosen_bops"].as_u64().unwrap();
    assert!(chosen <= fp8 * 3 / 4 && chosen > 0, "{chosen}");
    // With 4-bit activations the count multiplies each layer's MACs by its input's bits.
    a.extend_from_slice(&["--abits", "4"]);
    let o = zq(&a);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let j = o.json();
    let p = &j["pareto"];
    let (macs, abits, bits) = (
        u64s(&p["macs"]),
        u64s(&p["abits"]),
        u64s(&p["chosen"]["bits"]),
    );
    assert!(abits.contains(&4) && abits.contains(&8), "{abits:?}");
    let want: u64 = (0..macs.len()).map(|i| macs[i] * bits[i] * abits[i]).sum();
    assert_eq!(p["chosen_bops"].as_u64().unwrap(), want);
    assert!(want <= fp8 * 3 / 4);
    let mut a = vec![
        "quantize",
        s(&m),
        "-o",
        s(&out),
        "--pareto",
        "--bops-budget",
        "10",
    ];
    a.extend_from_slice(&calib);
    let o = zq(&a);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(o.stderr.contains("--bops-budget"), "{}", o.stderr);
    zq(&["quantize", s(&m), "--pareto"]).assert_error("--budget");
    zq(&[
        "quantize",
        s(&m),
        "--pareto",
        "--budget",
        "1MB",
        "--plot",
        "x.png",
    ])
    .assert_error("--plot");
}

#[test]
fn same_seed_same_model_bytes() {
    let t = tempfile::tempdir().unwrap();
    let m = fixture("digits_bn/model.onnx");
    let run = |name: &str| {
        let out = t.path().join(name);
        let mut a = vec!["quantize", s(&m), "-o", s(&out), "--seed", "5"];
        a.extend_from_slice(DIGITS);
        let o = zq(&a);
        assert_eq!(o.code, 0, "{}", o.stderr);
        std::fs::read(out).unwrap()
    };
    assert!(
        run("a.onnx") == run("b.onnx"),
        "the same seed must give the same file"
    );
}

#[test]
fn pareto_chooses_input_bits_under_a_bops_budget() {
    // Weights pinned to 8-bit candidates: under 3/4 of the all-8-bit BOPs the only way down is
    // 4-bit inputs, which the search picks by their measured activation sensitivity.
    let t = tempfile::tempdir().unwrap();
    let m = fixture("digits_bn/model.onnx");
    let out = t.path().join("a.onnx");
    let run = |budget: &str| {
        let mut a = vec![
            "quantize",
            s(&m),
            "-o",
            s(&out),
            "--pareto",
            "--bits",
            "8",
            "--bops-budget",
            budget,
            "--pareto-abits",
            "4,8",
            "--json",
        ];
        a.extend_from_slice(&PARETO_CALIB);
        zq(&a)
    };
    let o = run("1000000000000");
    assert_eq!(o.code, 0, "{}", o.stderr);
    let j = o.json();
    let macs = u64s(&j["pareto"]["macs"]);
    let act = j["pareto"]["act_sensitivity"].as_array().unwrap();
    assert_eq!(act.len(), macs.len());
    for row in act {
        let r = row.as_array().unwrap();
        let (a4, a8) = (r[0][1].as_f64().unwrap(), r[1][1].as_f64().unwrap());
        assert_eq!((r[0][0].as_u64(), r[1][0].as_u64()), (Some(4), Some(8)));
        assert!(a4 > a8 && a8 >= 0.0, "{row}");
    }
    // Unbounded: every input stays at 8.
    assert!(u64s(&j["pareto"]["abits"]).iter().all(|&a| a == 8));
    let all8: u64 = macs.iter().map(|m| m * 64).sum();
    let budget = (all8 * 3 / 4).to_string();
    let o = run(&budget);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let j = o.json();
    let p = &j["pareto"];
    let (abits, bits) = (u64s(&p["abits"]), u64s(&p["chosen"]["bits"]));
    assert!(abits.contains(&4), "{abits:?}");
    let bops: u64 = (0..macs.len()).map(|i| macs[i] * bits[i] * abits[i]).sum();
    assert_eq!(p["chosen_bops"].as_u64().unwrap(), bops);
    assert!(bops <= all8 * 3 / 4);
    // The written model quantizes each chosen input at its width.
    let layers = j["layers"].as_array().unwrap();
    let names: Vec<&str> = p["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for (name, &a) in names.iter().zip(&abits) {
        let l = layers.iter().find(|l| l["name"] == *name).unwrap();
        assert_eq!(l["abits"].as_u64(), Some(a), "{name}");
    }
    if let Some(lib) = ort_lib() {
        let (x, shape) = digits_test();
        let (agree, _) = zq_vs_ort(&out, &x, shape, &lib);
        assert!(agree >= 0.99, "zq predicts ONNX Runtime on {agree}");
    }
    // Impossible even with every input at 4 bits: the message names the least achievable.
    let o = run(&(all8 / 4).to_string());
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(o.stderr.contains("--bops-budget"), "{}", o.stderr);
}

/// A JSON array of unsigned integers.
fn u64s(v: &serde_json::Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}
