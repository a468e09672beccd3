//! The executor as zq-synth's TapModel: BN statistics tapped through the graph.

use candle_core::Tensor;
use zq::adapters::synth::PlanTaps;
use zq::onnx::read_model;
use zq_synth::{zeroq, TapModel};

use crate::util::*;

#[test]
fn real_images_match_bn_statistics_better_than_noise() {
    // digits_bn's statistics come from real digits; its io.safetensors holds real test digits.
    {
        let m = "digits_bn";
        let (x, xs, _, _) = read_io(&fixture(&format!("{m}/io.safetensors")));
        let g = read_model(&fixture(&format!("{m}/model.onnx")))
            .unwrap()
            .graph;
        let tm = PlanTaps::new(&g, xs[0]).unwrap();
        assert_eq!(tm.input_shape(), xs);
        let n_bn = g
            .nodes
            .iter()
            .filter(|n| n.op.name() == "BatchNormalization")
            .count();
        assert_eq!(tm.bn_targets().len(), n_bn);
        let dev = tm.plan.device().clone();
        let loss = |x: &Tensor| -> f32 {
            let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut auto = zq_synth::Autograd::new(&tm);
            let map = identity_map(&xs);
            let (_, per, _) =
                zeroq::loss_and_grad(&mut auto, &xv, &map, zeroq::Stats::PerSample, false).unwrap();
            per.iter().sum()
        };
        let data = Tensor::from_vec(x, xs.as_slice(), &dev).unwrap();
        let nv = pseudo_random(xs.iter().product(), 7);
        let noise = Tensor::from_vec(nv, xs.as_slice(), &dev).unwrap();
        let (ld, ln) = (loss(&data), loss(&noise));
        assert!(
            ld < ln,
            "{m}: BN loss of data {ld} should be below noise {ln}"
        );
    }
}

/// Pixels are the model input: the loss is then a function of the input itself.
fn identity_map(shape: &[usize]) -> zeroq::PixelMap {
    zeroq::PixelMap {
        channels: vec![(0.0, 1.0); shape[1]],
        hw: shape[2..].iter().product(),
    }
}

#[test]
fn model_without_batchnorm_is_refused() {
    let g = read_model(&fixture("folded_nobn/model.onnx"))
        .unwrap()
        .graph;
    let e = PlanTaps::new(&g, 2)
        .err()
        .expect("no BN must be an error")
        .to_string();
    assert!(
        e.contains("no BatchNormalization") && e.contains("TrainingMode.PRESERVE"),
        "{e}"
    );
}

#[test]
fn zeroq_distillation_matches_statistics_inside_the_box() {
    let g = read_model(&fixture("digits_bn/model.onnx")).unwrap().graph;
    let tm = PlanTaps::new(&g, 8).unwrap();
    // digits_bn preprocessing: mean 0.5, std 0.5, so pixels in [0,1] map to [-1, 1].
    let map = zeroq::PixelMap {
        channels: vec![(0.5, 0.5)],
        hw: 64,
    };
    let cfg = zeroq::ZeroQConfig {
        iters: 150,
        lr: 0.25,
        seed: 3,
        map: map.clone(),
        stats: zeroq::Stats::PerSample,
        schedule: zeroq::Schedule::Cosine,
    };
    let a = zeroq::distill(&mut *tm.engine(), &cfg, &mut |_, _| {}).unwrap();
    assert!(a.images.iter().all(|v| (-1.0..=1.0).contains(v)));
    // Gaussian pixel noise of the same shape, scored the same way.
    let noise = zeroq::PixelMap::noise(8 * 64, 99);
    let mut auto = zq_synth::Autograd::new(&tm);
    let (_, per, _) =
        zeroq::loss_and_grad(&mut auto, &noise, &map, zeroq::Stats::PerSample, false).unwrap();
    let noise_loss: f32 = per.iter().sum();
    eprintln!(
        "digits_bn: BN loss noise {noise_loss}, start {}, distilled {}",
        a.bn_loss_initial, a.bn_loss_final
    );
    assert!(
        a.bn_loss_final < 0.1 * noise_loss,
        "{} vs noise {noise_loss}",
        a.bn_loss_final
    );
    assert!(a.bn_loss_final < a.bn_loss_initial);
    // Same seed, same result, bit for bit.
    let b = zeroq::distill(&mut *tm.engine(), &cfg, &mut |_, _| {}).unwrap();
    assert_eq!(a.images, b.images);
}

/// Compare the tape engine's loss, per-layer terms and input gradient with candle's autograd over
/// the general executor, in both statistics modes. `false` when the tape does not run the model.
pub fn tape_matches_autograd(g: &zq::ir::Graph, name: &str, batch: usize) -> bool {
    let tm = PlanTaps::new(g, batch).unwrap();
    let mut tape = match tm.tape() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{name}: general executor ({e})");
            return false;
        }
    };
    let mut auto = zq_synth::Autograd::new(&tm);
    let n: usize = tm.input_shape().iter().product();
    let x = zq_synth::adam::normal(n, 11);
    let map = identity_map(&tm.input_shape());
    for stats in [zeroq::Stats::PerSample, zeroq::Stats::Batch] {
        let (la, pa, ga) = zeroq::loss_and_grad(&mut tape, &x, &map, stats, true).unwrap();
        let (lb, pb, gb) = zeroq::loss_and_grad(&mut auto, &x, &map, stats, true).unwrap();
        assert!(
            (la - lb).abs() <= 1e-4 * lb.abs().max(1.0),
            "{name} {stats:?}: loss {la} vs {lb}"
        );
        for (a, b) in pa.iter().zip(&pb) {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                "{name} {stats:?}: {a} vs {b}"
            );
        }
        let scale = gb.iter().fold(0f32, |s, v| s.max(v.abs()));
        let err = ga
            .iter()
            .zip(&gb)
            .fold(0f32, |e, (a, b)| e.max((a - b).abs()));
        assert!(
            scale > 0.0 && err <= 1e-3 * scale,
            "{name} {stats:?}: gradient differs by {err} (scale {scale})"
        );
    }
    true
}

/// The tape engine against autograd on every fixture with BatchNormalization it runs.
#[test]
fn tape_engine_matches_autograd() {
    let mut covered = Vec::new();
    for m in [
        "digits_bn",
        "mobile_dw",
        "same_pad",
        "ops_zoo_op11",
        "ops_zoo_op21",
    ] {
        let g = read_model(&fixture(&format!("{m}/model.onnx")))
            .unwrap()
            .graph;
        if tape_matches_autograd(&g, m, 3) {
            covered.push(m);
        }
    }
    // mobile_dw's squeeze-excite Conv -> Relu (fused on the tape) lies before its last BN, so
    // the fused ReLU's mask is in the gradient compared.
    for m in ["digits_bn", "mobile_dw", "same_pad"] {
        assert!(covered.contains(&m), "the tape must run {m}");
    }
}
