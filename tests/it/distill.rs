//! `zq distill`: the command, its output file, and the BN match measured independently by ONNX
//! Runtime (the BN inputs are exposed as extra graph outputs; the loss is recomputed here in f64).

use std::path::Path;

use zq::ir::{Graph, Op};
use zq::onnx::read_model;
use zq::pipeline::distill::read_distilled;

use crate::util::*;

/// (input value, running mean, sqrt(running var + eps), eps) of every BatchNormalization layer.
type BnStats = Vec<(usize, Vec<f64>, Vec<f64>, f64)>;

fn bn_stats(g: &Graph) -> BnStats {
    g.nodes
        .iter()
        .filter_map(|n| match n.op {
            Op::BatchNorm { epsilon } => {
                let c = |i: usize| -> Vec<f64> {
                    g.konst(n.input(i).unwrap())
                        .unwrap()
                        .to_f32_vec()
                        .iter()
                        .map(|&v| f64::from(v))
                        .collect()
                };
                let eps = f64::from(epsilon);
                let std = c(4).iter().map(|v| (v + eps).sqrt()).collect();
                Some((n.input(0).unwrap(), c(3), std, eps))
            }
            _ => None,
        })
        .collect()
}

/// ZeroQ's BN loss (sum over layers, mean over images) of `x` [N, ...] computed from the BN inputs
/// ONNX Runtime produces; with `batch`, the loss of the batch's statistics (Genie's, and
/// `--stats batch`): the whole batch taken as one sample.
pub fn ort_bn_loss(
    model: &Path,
    x: &[f32],
    shape: &[usize],
    lib: &Path,
    dir: &Path,
    batch: bool,
) -> f64 {
    let mut g = read_model(model).unwrap().graph;
    let stats = bn_stats(&g);
    assert!(!stats.is_empty());
    let first_tap = g.outputs.len();
    g.outputs.extend(stats.iter().map(|s| s.0));
    let tapped = dir.join("tapped.onnx");
    zq::onnx::write::write_model(&g, &tapped).unwrap();
    let ort = zq::exec::ort::OrtModel::open(&tapped, Some(lib), 2).unwrap();
    let outs = ort.run_all(x.to_vec(), shape).unwrap();
    let mut total = 0f64;
    for ((s, v), (_, mean, std, eps)) in outs[first_tap..].iter().zip(&stats) {
        let (c, hw) = (s[1], s[2..].iter().product::<usize>());
        // [N, C, HW] -> [1, C, N * HW] for batch statistics.
        let (n, hw, v) = if batch {
            let n = s[0];
            let t: Vec<f32> = (0..c)
                .flat_map(|ch| (0..n).flat_map(move |b| v[(b * c + ch) * hw..][..hw].to_vec()))
                .collect();
            (1, n * hw, t)
        } else {
            (s[0], hw, v.clone())
        };
        for b in 0..n {
            for ch in 0..c {
                let p = &v[(b * c + ch) * hw..][..hw];
                let m = p.iter().map(|&v| f64::from(v)).sum::<f64>() / hw as f64;
                let var = p.iter().map(|&v| (f64::from(v) - m).powi(2)).sum::<f64>()
                    / (hw.max(2) - 1) as f64;
                let sd = (var + eps).sqrt();
                total += ((m - mean[ch]).powi(2) + (sd - std[ch]).powi(2)) / n as f64;
            }
        }
    }
    total
}

/// Standard Gaussian noise (Box-Muller on the tests' own generator).
fn gaussian(n: usize, seed: u64) -> Vec<f32> {
    let u = pseudo_random(2 * n, seed);
    (0..n)
        .map(|i| {
            let (a, b) = ((u[2 * i] + 1.0) / 2.0, (u[2 * i + 1] + 1.0) / 2.0);
            let a = a.max(1e-7);
            (-2.0 * a.ln()).sqrt() * (std::f32::consts::TAU * b).cos()
        })
        .collect()
}

/// Distil with zq, then score the result and Gaussian noise with ONNX Runtime. Returns the ratio.
pub fn distil_and_check(
    model: &Path,
    extra: &[&str],
    mean: &[f32],
    std: &[f32],
    max_ratio: f64,
) -> f64 {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("d.safetensors");
    let mut args = vec!["distill", s(model), "-o", s(&out), "--json"];
    args.extend_from_slice(extra);
    let o = zq(&args);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let j = o.json();
    let d = read_distilled(&out).unwrap();
    let [n, c, h, w] = d.shape;
    assert_eq!(j["shape"], serde_json::json!([n, c, h, w]));
    // Every fixture runs on the tape engine (the fallback is reported with its reason).
    assert_eq!(j["engine"], "tape", "{}", j["engine"]);
    // Every pixel inside the box the preprocessing defines.
    let hw = h * w;
    for (i, v) in d.images.iter().enumerate() {
        let ch = (i / hw) % c;
        let (m, sd) = (mean[ch.min(mean.len() - 1)], std[ch.min(std.len() - 1)]);
        let (lo, hi) = ((0.0 - m) / sd, (1.0 - m) / sd);
        assert!(
            *v >= lo - 1e-6 && *v <= hi + 1e-6,
            "pixel {i} = {v} outside [{lo}, {hi}]"
        );
    }
    let meta = d.meta.expect("zq metadata in the header");
    assert_eq!(meta["format"], "zq.distilled.v2");
    assert_eq!(
        meta["model_sha256"].as_str().unwrap(),
        zq::pipeline::distill::sha256_file(model).unwrap()
    );
    let Some(lib) = ort_lib() else {
        return f64::NAN;
    };
    let shape = [n, c, h, w];
    let batch = meta["stats"] == "batch";
    let ours = ort_bn_loss(model, &d.images, &shape, &lib, t.path(), batch);
    let noise = ort_bn_loss(
        model,
        &gaussian(n * c * h * w, 11),
        &shape,
        &lib,
        t.path(),
        batch,
    );
    let ratio = ours / noise;
    eprintln!(
        "{}: ONNX Runtime BN loss distilled {ours:.5}, noise {noise:.3}, ratio {ratio:.5}; zq reported {} in {:.1} s",
        model.display(),
        j["bn_loss_final"],
        j["seconds"].as_f64().unwrap()
    );
    // zq's own figure agrees with the independent one.
    let zq_final = j["bn_loss_final"].as_f64().unwrap();
    assert!(
        (zq_final - ours).abs() <= 1e-3 * ours.max(1e-3),
        "zq says {zq_final}, ONNX Runtime gives {ours}"
    );
    assert!(
        ratio <= max_ratio,
        "BN loss ratio to noise {ratio} > {max_ratio}"
    );
    ratio
}

#[test]
fn digits_distillation_matches_bn_statistics_in_onnx_runtime() {
    distil_and_check(
        &fixture("digits_bn/model.onnx"),
        &[
            "--mean", "0.5", "--std", "0.5", "--num", "24", "--batch", "8", "--iters", "300",
        ],
        &[0.5],
        &[0.5],
        0.05,
    );
}

#[test]
fn depthwise_model_distillation_matches_bn_statistics() {
    // BN after a depthwise conv, with ImageNet preprocessing (the default).
    distil_and_check(
        &fixture("mobile_dw/model.onnx"),
        &["--num", "8", "--iters", "300"],
        &[0.485, 0.456, 0.406],
        &[0.229, 0.224, 0.225],
        0.05,
    );
}

#[test]
fn genie_distillation_matches_batch_bn_statistics() {
    // Genie-D on the digits model (8x8, mean 0.5 std 0.5) and on the depthwise one (ImageNet
    // preprocessing, strided convolutions, so swing convolution runs). One batch each, so that
    // the batch statistics ONNX Runtime sees are the ones zq matched.
    let digits = distil_and_check(
        &fixture("digits_bn/model.onnx"),
        &[
            "--method", "genie", "--mean", "0.5", "--std", "0.5", "--num", "16", "--batch", "16",
            "--iters", "150",
        ],
        &[0.5],
        &[0.5],
        // Measured 0.097 (0.40 before the generator's output got a learnable per-channel gain
        // and shift: its last BatchNormalization, no affine as in the reference, fixes every
        // channel's pixel mean and std over the batch at 0.5 and 0.25, which digits, mostly
        // black, do not have).
        0.15,
    );
    let dw = distil_and_check(
        &fixture("mobile_dw/model.onnx"),
        &[
            "--method", "genie", "--num", "8", "--batch", "8", "--iters", "150",
        ],
        &[0.485, 0.456, 0.406],
        &[0.229, 0.224, 0.225],
        // Measured 1.53 (6.7 before the output gain and shift): not a match. This fixture's
        // batch statistics are met by standard Gaussian inputs (the yardstick here) better than
        // by anything pixels in [0, 1] give, and on its 16x16 input the swing of the first,
        // strided convolution moves the first layer's statistics (zq's own loss 0.24 with swing,
        // 0.023 with --no-swing). What this checks is the box and that zq's loss is ONNX
        // Runtime's.
        2.5,
    );
    eprintln!("Genie BN loss ratio to noise: digits {digits:.4}, mobile_dw {dw:.4}");
}

#[test]
fn genie_reports_swing_and_repeats_byte_for_byte() {
    let t = tempfile::tempdir().unwrap();
    let m = fixture("mobile_dw/model.onnx");
    let run = |name: &str, seed: &str, extra: &[&str]| {
        let p = t.path().join(name);
        let mut args = vec![
            "distill",
            s(&m),
            "-o",
            s(&p),
            "--method",
            "genie",
            "--num",
            "4",
            "--iters",
            "10",
            "--seed",
            seed,
            "--json",
            "-q",
        ];
        args.extend_from_slice(extra);
        let o = zq(&args);
        assert_eq!(o.code, 0, "{}", o.stderr);
        (std::fs::read(p).unwrap(), o.json())
    };
    let (a, ja) = run("a", "3", &[]);
    let (b, _) = run("b", "3", &[]);
    let (c, _) = run("c", "4", &[]);
    assert!(a == b, "same seed must give identical bytes");
    assert!(a != c, "another seed must give other images");
    assert_eq!(ja["method"], "genie");
    assert_eq!(ja["stats"], "batch");
    let swing = ja["genie"]["swing"].as_str().unwrap();
    assert!(swing.starts_with("on ("), "{swing}");
    let (d, jd) = run("d", "3", &["--no-swing"]);
    assert_eq!(jd["genie"]["swing"], "off: --no-swing");
    assert!(d != a, "swing convolution changes the images");
    // The reference's generator (no output gain and shift) on request, said in the report.
    assert_eq!(ja["genie"]["output_gain"], true);
    let (e, je) = run("e", "3", &["--genie-no-gain"]);
    assert_eq!(je["genie"]["output_gain"], false);
    assert!(e != a, "the output gain changes the images");
    // Genie matches batch statistics only.
    let o = zq(&[
        "distill",
        s(&m),
        "-o",
        s(&t.path().join("e")),
        "--method",
        "genie",
        "--stats",
        "per-sample",
    ]);
    o.assert_error("--stats");
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let t = tempfile::tempdir().unwrap();
    let m = fixture("digits_bn/model.onnx");
    let run = |name: &str, seed: &str| {
        let p = t.path().join(name);
        let o = zq(&[
            "distill",
            s(&m),
            "-o",
            s(&p),
            "--num",
            "5",
            "--batch",
            "2",
            "--iters",
            "20",
            "--seed",
            seed,
            "--mean",
            "0.5",
            "--std",
            "0.5",
        ]);
        assert_eq!(o.code, 0, "{}", o.stderr);
        std::fs::read(p).unwrap()
    };
    let (a, b, c) = (run("a", "9"), run("b", "9"), run("c", "10"));
    assert!(a == b, "same seed must give identical bytes");
    assert!(a != c, "another seed must give other images");
}

#[test]
fn default_output_is_beside_the_model_and_pngs_are_written() {
    let t = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("digits_bn/model.onnx"), t.path().join("net.onnx")).unwrap();
    let o = zq_in(
        t.path(),
        &[
            "distill", "net.onnx", "--num", "3", "--iters", "5", "--png", "look", "--mean", "0.5",
            "--std", "0.5",
        ],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let d = read_distilled(&t.path().join("net.distilled.safetensors")).unwrap();
    assert_eq!(d.shape, [3, 1, 8, 8]);
    let mut pngs: Vec<_> = std::fs::read_dir(t.path().join("look"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    pngs.sort();
    assert_eq!(pngs.len(), 3);
    let img = image::open(&pngs[0]).unwrap();
    assert_eq!((img.width(), img.height()), (8, 8));
    // De-normalised: pixel = (x * std + mean) * 255.
    let want: Vec<u8> = d.images[..64]
        .iter()
        .map(|v| ((v * 0.5 + 0.5) * 255.0).round().clamp(0.0, 255.0) as u8)
        .collect();
    assert_eq!(img.to_luma8().into_raw(), want);
}

#[test]
fn model_without_bn_is_refused_and_nothing_is_written() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("x.safetensors");
    let o = zq(&[
        "distill",
        s(&fixture("folded_nobn/model.onnx")),
        "-o",
        s(&out),
    ]);
    o.assert_error("no BatchNormalization");
    assert!(o.stderr.contains("TrainingMode.PRESERVE"), "{}", o.stderr);
    assert!(!out.exists());
    assert_eq!(
        std::fs::read_dir(t.path()).unwrap().count(),
        0,
        "no temp files left"
    );
}

#[test]
fn bad_flags_are_one_line_errors() {
    let t = tempfile::tempdir().unwrap();
    let m = fixture("digits_bn/model.onnx");
    let out = t.path().join("x.safetensors");
    for (flags, needle) in [
        (vec!["--lr", "0"], "--lr"),
        (vec!["--lr", "nan"], "--lr"),
        (vec!["--num", "0"], "--num"),
        (vec!["--batch", "0"], "--batch"),
        (vec!["--mean", "0.5,0.5"], "--mean"),
        (vec!["--mean", "0.5", "--std", "0"], "--std"),
        (vec!["--png", s(&m)], "--png"),
        (vec!["--genie-lr-generator", "0"], "--genie-lr-generator"),
        (vec!["--genie-lr-latent=-1"], "--genie-lr-latent"),
        (vec!["--genie-latent-dim", "0"], "--genie-latent-dim"),
    ] {
        let mut args = vec!["distill", s(&m), "-o", s(&out), "--iters", "1"];
        args.extend(flags.iter());
        let o = zq(&args);
        o.assert_error(needle);
        assert!(!out.exists(), "{flags:?} wrote an output");
    }
    // An output path below a regular file cannot be created.
    let o = zq(&[
        "distill",
        s(&m),
        "-o",
        s(&m.join("x.safetensors")),
        "--iters",
        "1",
    ]);
    o.assert_error("-o");
    let o = zq(&["distill", s(&t.path().join("missing.onnx")), "-o", s(&out)]);
    o.assert_error("missing.onnx");
}

/// The de-normalised pixels `(x * std + mean)` of a distilled set.
fn pixels_of(path: &Path, mean: &[f32], std: &[f32]) -> Vec<f32> {
    let d = read_distilled(path).unwrap();
    let [_, c, h, w] = d.shape;
    d.images
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let ch = (i / (h * w)) % c;
            let k = |v: &[f32]| v[if v.len() == 1 { 0 } else { ch }];
            x * k(std) + k(mean)
        })
        .collect()
}

/// The same network behind other input conventions (fixtures/norm_variants/make.py builds them
/// from the shared ResNet-20) is distilled from the same pixels with the same steps: learning
/// rate, initialisation, box and input term live in pixel space, so a model that takes raw
/// 0..255 pixels is treated exactly like one that takes normalised input.
#[test]
fn distillation_does_not_depend_on_the_input_convention() {
    let Some(sh) = shared() else { return };
    let Some(py) = python_with_onnx() else { return };
    let t = tempfile::tempdir().unwrap();
    let src = sh.join("models/resnet20_cifar10_bn.onnx");
    let o = std::process::Command::new(&py)
        .arg(fixture("norm_variants/make.py"))
        .arg(&src)
        .arg(t.path())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "make.py: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let imagenet = (vec![0.485f32, 0.456, 0.406], vec![0.229f32, 0.224, 0.225]);
    let variants: Vec<(&str, Vec<f32>, Vec<f32>)> = vec![
        ("imagenet", imagenet.0.clone(), imagenet.1.clone()),
        ("half_affine", vec![0.5], vec![0.5]),
        ("raw_affine", vec![0.0], vec![1.0 / 255.0]),
        ("half_folded", vec![0.5], vec![0.5]),
        ("raw_folded", vec![0.0], vec![1.0 / 255.0]),
        ("gray_folded", vec![0.0], vec![1.0]),
    ];
    let run = |name: &str, mean: &[f32], std: &[f32], iters: &str| {
        let model = if name == "imagenet" {
            src.clone()
        } else {
            t.path().join(format!("{name}.onnx"))
        };
        let out = t.path().join(format!("{name}.{iters}.safetensors"));
        let join = |v: &[f32]| {
            v.iter()
                .map(|x| format!("{x}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let o = zq(&[
            "distill",
            s(&model),
            "-o",
            s(&out),
            "--num",
            "8",
            "--iters",
            iters,
            "--stats",
            "batch",
            "--seed",
            "5",
            "--mean",
            &join(mean),
            "--std",
            &join(std),
            "--json",
            "-q",
        ]);
        assert_eq!(o.code, 0, "{name}: {}", o.stderr);
        (pixels_of(&out, mean, std), o.json())
    };
    // Same start: identical pixels (up to the rounding of the normalisation).
    let (p0, _) = run("imagenet", &imagenet.0, &imagenet.1, "0");
    for (name, m, sd) in &variants[1..3] {
        let (p, _) = run(name, m, sd, "0");
        let d = max_abs_diff(&p0, &p);
        assert!(d < 1e-5, "{name}: start pixels differ by {d}");
    }
    // Same steps: Adam amplifies rounding-level gradient differences where a gradient is near
    // zero, so a few pixels drift apart, but the images stay the same. Before the steps were
    // taken in pixel space, the raw-pixel model's pixels moved 255 times less.
    let (p10, _) = run("imagenet", &imagenet.0, &imagenet.1, "10");
    let moved = p10.iter().zip(&p0).map(|(a, b)| (a - b).abs()).sum::<f32>() / p0.len() as f32;
    for (name, m, sd) in &variants[1..3] {
        let (p, _) = run(name, m, sd, "10");
        let d = p.iter().zip(&p10).map(|(a, b)| (a - b).abs()).sum::<f32>() / p.len() as f32;
        eprintln!("{name}: mean pixel difference {d} after 10 steps (pixels moved {moved})");
        assert!(
            d < 0.05 * moved,
            "{name}: pixels differ by {d} on average, moved {moved}"
        );
    }
    // Same quality: the BN loss relative to pixel noise, on every convention, folded ones too
    // (those differ from the original where the first conv's zero padding reaches; the
    // grayscale one sees a different input altogether).
    let ratio = |j: &serde_json::Value| {
        j["bn_loss_final"].as_f64().unwrap() / j["bn_loss_noise"].as_f64().unwrap()
    };
    let (_, j0) = run("imagenet", &imagenet.0, &imagenet.1, "100");
    let r0 = ratio(&j0);
    for (name, m, sd) in &variants[1..] {
        let (_, j) = run(name, m, sd, "100");
        let r = ratio(&j);
        eprintln!("{name}: BN loss {r:.4}x noise (imagenet-normalised original {r0:.4}x)");
        assert!(r < 0.03, "{name}: BN loss {r}x noise");
        if name.ends_with("affine") {
            assert!(
                (r / r0 - 1.0).abs() < 0.25,
                "{name}: {r} vs the original's {r0}"
            );
        }
    }
}
