//! The executor as zq-synth's TapModel: BN statistics tapped through the graph.

use candle_core::Tensor;
use zq::onnx::read_model;
use zq::synth_model::PlanTaps;
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
            let taps = tm.forward_taps(x).unwrap();
            let (_, per) = zeroq::loss(x, &taps, tm.bn_targets()).unwrap();
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
