//! Acceptance on the real ResNet-20 in ../shared (skipped loudly where it is absent).

use candle_core::Tensor;
use zq::data::{load_batch, ImageFolder, Preprocess};
use zq::exec::Plan;
use zq::onnx::read_model;

use crate::util::*;

const MODELS: &[&str] = &["resnet20_cifar10_bn.onnx", "resnet20_cifar10_bn_sim.onnx"];

#[test]
fn inspect_resnet20() {
    let Some(sh) = shared() else { return };
    for m in MODELS {
        let o = zq(&["inspect", "--json", s(&sh.join("models").join(m))]);
        assert_eq!(o.code, 0, "{m}: {}", o.stderr);
        let j = o.json();
        assert_eq!(j["bn_layers"].as_array().unwrap().len(), 19, "{m}");
        assert_eq!(j["quantizable_layers"].as_array().unwrap().len(), 20, "{m}");
    }
}

#[test]
fn resnet20_tape_engine_matches_autograd() {
    let Some(sh) = shared() else { return };
    for m in MODELS {
        let g = read_model(&sh.join("models").join(m)).unwrap().graph;
        assert!(
            crate::synth::tape_matches_autograd(&g, m, 2),
            "{m}: the tape must run ResNet-20"
        );
    }
}

/// EfficientNet-Lite1: depthwise 3x3/5x5 convolutions (the tape's own depthwise kernel), ReLU6 as
/// Clip, SAME padding as Pad.
#[test]
fn efficientnet_tape_engine_matches_autograd() {
    let Some(sh) = shared() else { return };
    let g = read_model(&sh.join("models/efficientnet_lite1_bn.onnx"))
        .unwrap()
        .graph;
    assert!(
        crate::synth::tape_matches_autograd(&g, "efficientnet_lite1_bn.onnx", 1),
        "the tape must run EfficientNet-Lite1"
    );
}

#[test]
fn resnet20_logits_match_onnx_runtime() {
    let Some(sh) = shared() else { return };
    let Some(lib) = ort_lib() else { return };
    let folder = ImageFolder::open(&sh.join("data/cifar10/test")).unwrap();
    let items: Vec<_> = (0..128)
        .map(|i| folder.items[i * folder.items.len() / 128].clone())
        .collect();
    let x = load_batch(&items, 3, 32, 32, &Preprocess::imagenet()).unwrap();
    for m in MODELS {
        let path = sh.join("models").join(m);
        let plan = Plan::new(&read_model(&path).unwrap().graph, items.len()).unwrap();
        let t = Tensor::from_vec(x.clone(), (items.len(), 3, 32, 32), plan.device()).unwrap();
        let ours: Vec<f32> = plan.run(&[t]).unwrap()[0]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let ort = zq::exec::ort::OrtModel::open(&path, Some(&lib), 2).unwrap();
        let (shape, theirs) = ort.run(x.clone(), &[items.len(), 3, 32, 32]).unwrap();
        assert_eq!(shape, vec![items.len(), 10]);
        let d = max_abs_diff(&ours, &theirs);
        eprintln!("{m}: max abs logit difference vs ONNX Runtime {d:e}");
        assert!(d <= 1e-4, "{m}: max abs logit difference {d}");
    }
}

#[test]
fn resnet20_top1_on_cifar10_test() {
    let Some(sh) = shared() else { return };
    let o = zq(&[
        "eval",
        s(&sh.join("models/resnet20_cifar10_bn.onnx")),
        "--data",
        s(&sh.join("data/cifar10/test")),
        "--mean",
        "0.485,0.456,0.406",
        "--std",
        "0.229,0.224,0.225",
        "--batch",
        "100",
        "--json",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let j = o.json();
    assert_eq!(j["n"], 10000);
    assert_eq!(j["correct"], 8103, "ONNX Runtime gives 81.03%");
}

const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Distil from shared model `file` with `extra` flags and check the result against ONNX Runtime's
/// BN statistics (ratio to noise at most `bound`, every pixel inside the box).
fn shared_distillation(file: &str, extra: &[&str], mean: &[f32], std: &[f32], bound: f64) {
    let Some(sh) = shared() else { return };
    let m = sh.join("models").join(file);
    let ratio = crate::distill::distil_and_check(&m, extra, mean, std, bound);
    eprintln!("{file}: distilled BN loss / noise = {ratio:.4} (ONNX Runtime)");
}

#[test]
fn resnet20_distillation_with_defaults_matches_bn_statistics_in_onnx_runtime() {
    // Acceptance: defaults (32 images, 500 iterations, ImageNet preprocessing); ONNX Runtime's BN
    // loss of the result <= 0.03 x that of Gaussian noise, every pixel inside the valid box.
    shared_distillation(
        "resnet20_cifar10_bn.onnx",
        &[],
        &IMAGENET_MEAN,
        &IMAGENET_STD,
        0.03,
    );
}

#[test]
fn resnet32_distillation_with_defaults_matches_bn_statistics_in_onnx_runtime() {
    // The same acceptance as ResNet-20's, on the deeper model of the family (31 BN layers).
    shared_distillation(
        "resnet32_cifar10_bn.onnx",
        &[],
        &IMAGENET_MEAN,
        &IMAGENET_STD,
        0.03,
    );
}

#[test]
#[ignore = "distils 32 EfficientNet-Lite1 images at 240x240 (minutes); run with --ignored"]
fn efficientnet_distillation_matches_bn_statistics_in_onnx_runtime() {
    // ImageNet size, as `zq quantize` distils there by default (32 images, 50 iterations, batch
    // statistics). Measured 0.132 from ONNX Runtime's BN inputs (per-sample statistics: 0.162):
    // far from the 0.03 the CIFAR models reach at 200 iterations. What this pins is
    // the box, zq's loss against ONNX Runtime's, and that 50 steps leave it below 0.2x noise.
    shared_distillation(
        "efficientnet_lite1_bn.onnx",
        &[
            "--iters", "50", "--stats", "batch", "--mean", "0.498", "--std", "0.502",
        ],
        &[0.498],
        &[0.502],
        0.2,
    );
}

#[test]
fn resnet20_zero_shot_w8a8_and_w4a8_in_onnx_runtime() {
    // Acceptance: no real data. Calibration images distilled with batch statistics (what
    // `zq quantize` distils inline by default), then W8A8 and W4A8 models judged by ONNX Runtime
    // on the 10,000 CIFAR-10 test images, and zq's own prediction of the emitted model.
    let Some(sh) = shared() else { return };
    let Some(lib) = ort_lib() else { return };
    let t = tempfile::tempdir().unwrap();
    let m = sh.join("models/resnet20_cifar10_bn.onnx");
    let test = sh.join("data/cifar10/test");
    let d = batch_distilled(&m);
    for (wbits, min_top1, min_agree) in [("8", 0.806, 0.975), ("4", 0.776, 0.90)] {
        let q = t.path().join(format!("w{wbits}.onnx"));
        let o = zq(&[
            "quantize",
            s(&m),
            "--data",
            s(&d),
            "--wbits",
            wbits,
            "--holdout",
            "0",
            "-o",
            s(&q),
        ]);
        assert_eq!(o.code, 0, "{}", o.stderr);
        let e = zq(&[
            "eval",
            s(&q),
            "--data",
            s(&test),
            "--engine",
            "ort",
            "--ort-lib",
            s(&lib),
            "--compare",
            s(&m),
            "--json",
        ]);
        assert_eq!(e.code, 0, "{}", e.stderr);
        let j = e.json();
        let (top1, agree) = (
            j["top1"].as_f64().unwrap(),
            j["agreement"].as_f64().unwrap(),
        );
        eprintln!("ResNet-20 W{wbits}A8 (ONNX Runtime): top-1 {top1}, agreement with FP32 {agree}");
        assert!(top1 >= min_top1, "W{wbits}A8 top-1 {top1} < {min_top1}");
        assert!(
            agree >= min_agree,
            "W{wbits}A8 agreement {agree} < {min_agree}"
        );
        if wbits == "8" {
            // ONNX Runtime runs every conv, the residual adds and the classifier on int8 kernels.
            let ops = zq::exec::ort::executed_ops(&q, Some(&lib)).unwrap();
            eprintln!("ONNX Runtime executes {ops:?}");
            assert_eq!(ops.get("QLinearConv"), Some(&19), "{ops:?}");
            assert_eq!(ops.get("QLinearAdd"), Some(&9), "{ops:?}");
            assert!(ops.contains_key("QGemm"), "{ops:?}");
            assert!(!ops.contains_key("Conv"), "{ops:?}");
            let folder = ImageFolder::open(&test).unwrap();
            let x = load_batch(&folder.items, 3, 32, 32, &Preprocess::imagenet()).unwrap();
            let n = folder.items.len();
            let (same, diff) = crate::quantize::zq_vs_ort(&q, &x, [n, 3, 32, 32], &lib);
            eprintln!("ResNet-20 W8A8: zq predicts ONNX Runtime's class on {same} of {n} images (max logit difference {diff})");
            assert!(same >= 0.995, "zq vs ONNX Runtime {same}");
        }
    }
}

#[test]
fn resnet20_pareto_mixed_precision_beats_uniform_w4() {
    // Acceptance: budgets 5% above the uniform W4A8 file and halfway between W4 and W8, judged by
    // ONNX Runtime on the test set; every file within its budget.
    let Some(sh) = shared() else { return };
    let Some(lib) = ort_lib() else { return };
    let t = tempfile::tempdir().unwrap();
    let m = sh.join("models/resnet20_cifar10_bn.onnx");
    let test = sh.join("data/cifar10/test");
    let d = batch_distilled(&m);
    let top1 = |q: &std::path::Path| ort_top1(q, &test, &lib);
    let size = |w: &str| -> (u64, f64) {
        let q = t.path().join(format!("u{w}.onnx"));
        let o = zq(&[
            "quantize",
            s(&m),
            "--data",
            s(&d),
            "--holdout",
            "0",
            "--wbits",
            w,
            "-o",
            s(&q),
        ]);
        assert_eq!(o.code, 0, "{}", o.stderr);
        (std::fs::metadata(&q).unwrap().len(), top1(&q))
    };
    let ((w4, w4_top1), (w8, _)) = (size("4"), size("8"));
    for (budget, min_top1) in [(w4 + w4 / 20, w4_top1 + 0.01), ((w4 + w8) / 2, 0.80)] {
        let q = t.path().join(format!("p{budget}.onnx"));
        let b = budget.to_string();
        let o = zq(&[
            "quantize",
            s(&m),
            "--data",
            s(&d),
            "--holdout",
            "0",
            "--pareto",
            "--budget",
            &b,
            "-o",
            s(&q),
            "--json",
        ]);
        assert_eq!(o.code, 0, "{}", o.stderr);
        let j = o.json();
        let written = std::fs::metadata(&q).unwrap().len();
        assert!(written <= budget, "{written} > {budget}");
        let acc = top1(&q);
        eprintln!(
            "ResNet-20 pareto budget {budget} B (W4 {w4} B, W8 {w8} B): written {written} B, predicted {}, top-1 {acc} (uniform W4 {w4_top1}), search {:.1} s",
            j["pareto"]["predicted_bytes"],
            j["pareto"]["seconds"].as_f64().unwrap()
        );
        assert!(acc >= min_top1, "top-1 {acc} < {min_top1}");
    }
}

/// Top-1 of a model file on the image folder `test`, by ONNX Runtime (`zq eval --engine ort`).
fn ort_top1(q: &std::path::Path, test: &std::path::Path, lib: &std::path::Path) -> f64 {
    let e = zq(&[
        "eval",
        s(q),
        "--data",
        s(test),
        "--engine",
        "ort",
        "--ort-lib",
        s(lib),
        "--json",
    ]);
    assert_eq!(e.code, 0, "{}", e.stderr);
    e.json()["top1"].as_f64().unwrap()
}

/// 64 images distilled from ResNet-20 with batch statistics, made once per test run and shared
/// by the acceptance tests that calibrate on them.
pub fn batch_distilled(m: &std::path::Path) -> std::path::PathBuf {
    static D: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    D.get_or_init(|| {
        let d =
            std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("resnet20_batch64.safetensors");
        let o = zq(&[
            "distill",
            s(m),
            "-o",
            s(&d),
            "--num",
            "64",
            "--iters",
            "200",
            "--stats",
            "batch",
        ]);
        assert_eq!(o.code, 0, "{}", o.stderr);
        d
    })
    .clone()
}

#[test]
fn resnet20_w4a4_reconstruction_beats_round_to_nearest_in_onnx_runtime() {
    // W4A4 with the low-bit defaults, judged by ONNX Runtime on the 10,000 test images, on the
    // suite's 64 distilled images: round to nearest with 4-bit activations everywhere
    // (--abits-scope all), round to nearest with 4-bit layer inputs (the default), and Genie-M
    // reconstruction (200 steps per block). Measured here: 65.21%, 73.70%, 77.87% (the README's table, on
    // 256 images: 64.61%, 74.06%, and 78.15% at 200 steps).
    let Some(sh) = shared() else { return };
    let Some(lib) = ort_lib() else { return };
    let t = tempfile::tempdir().unwrap();
    let m = sh.join("models/resnet20_cifar10_bn.onnx");
    let test = sh.join("data/cifar10/test");
    let d = batch_distilled(&m);
    let mut top1 = Vec::new();
    for (name, scope, refine) in [
        ("all", "all", "none"),
        ("none", "layer-inputs", "none"),
        ("genie", "layer-inputs", "genie"),
    ] {
        let q = t.path().join(format!("{name}.onnx"));
        let o = zq(&[
            "quantize",
            s(&m),
            "--data",
            s(&d),
            "--wbits",
            "4",
            "--abits",
            "4",
            "--abits-scope",
            scope,
            "--refine",
            refine,
            "--refine-iters",
            "200",
            "--holdout",
            "0",
            "-o",
            s(&q),
        ]);
        assert_eq!(o.code, 0, "{}", o.stderr);
        let t1 = ort_top1(&q, &test, &lib);
        eprintln!(
            "ResNet-20 W4A4 --abits-scope {scope} --refine {refine} (ONNX Runtime): top-1 {t1}"
        );
        top1.push(t1);
    }
    let [all, none, genie] = top1[..] else {
        unreachable!()
    };
    assert!(
        all >= 0.60,
        "W4A4 round to nearest, all activations 4-bit: {all}"
    );
    assert!(
        none >= all + 0.05,
        "4-bit layer inputs {none} not 5 points above 4-bit everything {all}"
    );
    assert!(
        genie >= none + 0.03,
        "W4A4 genie {genie} is not 3 points above round to nearest {none}"
    );
    assert!(genie >= 0.76, "W4A4 genie {genie} below 76%");
}
