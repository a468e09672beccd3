//! The FP32 executor against ONNX Runtime's outputs stored beside each fixture, round trips through
//! the ONNX writer, and gradients of the differentiable path.

use candle_core::{Tensor, Var};
use zq::exec::Plan;
use zq::ir::Op;
use zq::onnx::{read_model, write_model};

use crate::util::*;

const MODELS: &[&str] = &[
    "digits_bn",
    "mobile_dw",
    "same_pad",
    "folded_nobn",
    "ops_zoo_op11",
    "ops_zoo_op21",
];

fn run_model(path: &std::path::Path, x: &[f32], xs: &[usize]) -> (Vec<f32>, Vec<usize>) {
    let m = read_model(path).unwrap();
    let plan = Plan::new(&m.graph, xs[0]).unwrap();
    let t = Tensor::from_vec(x.to_vec(), xs, plan.device()).unwrap();
    let y = plan.run(&[t]).unwrap().remove(0);
    (
        y.flatten_all().unwrap().to_vec1().unwrap(),
        y.dims().to_vec(),
    )
}

#[test]
fn fixtures_match_onnx_runtime() {
    let mut cases: Vec<(std::path::PathBuf, std::path::PathBuf)> = MODELS
        .iter()
        .map(|m| {
            (
                fixture(&format!("{m}/model.onnx")),
                fixture(&format!("{m}/io.safetensors")),
            )
        })
        .collect();
    cases.push((
        fixture("hostile/ext_ok.onnx"),
        fixture("hostile/ext_ok.io.safetensors"),
    ));
    for (model, io) in cases {
        let (x, xs, want, ws) = read_io(&io);
        let (got, gs) = run_model(&model, &x, &xs);
        assert_eq!(gs, ws, "{}", model.display());
        let d = max_abs_diff(&got, &want);
        assert!(
            d <= 1e-4,
            "{}: max abs diff {d} vs ONNX Runtime",
            model.display()
        );
    }
}

#[test]
fn shape_arithmetic_is_folded() {
    for m in ["digits_bn", "ops_zoo_op11", "ops_zoo_op21"] {
        let g = read_model(&fixture(&format!("{m}/model.onnx")))
            .unwrap()
            .graph;
        assert!(
            g.nodes.iter().any(|n| matches!(n.op, Op::Shape { .. })),
            "{m} has no shape arithmetic to fold"
        );
        let plan = Plan::new(&g, 3).unwrap();
        for n in &plan.graph.nodes {
            assert!(
                !matches!(
                    n.op,
                    Op::Shape { .. }
                        | Op::Gather { .. }
                        | Op::ConstantOfShape { .. }
                        | Op::Cast { .. }
                ),
                "{m}: {} ({}) survived folding",
                n.name,
                n.op.name()
            );
        }
        plan.graph.check().unwrap();
    }
}

#[test]
fn batch_size_is_free() {
    // The same model specialised for different batch sizes gives the same per-sample outputs.
    let (x, xs, want, ws) = read_io(&fixture("digits_bn/io.safetensors"));
    let per = xs[1..].iter().product::<usize>();
    let k = ws[1];
    for b in [1, 3] {
        let mut shape = xs.clone();
        shape[0] = b;
        let (got, _) = run_model(&fixture("digits_bn/model.onnx"), &x[..b * per], &shape);
        assert!(max_abs_diff(&got, &want[..b * k]) <= 1e-4);
    }
}

#[test]
fn written_models_read_back_identically() {
    let dir = tempfile::tempdir().unwrap();
    for m in MODELS {
        let src = fixture(&format!("{m}/model.onnx"));
        let (x, xs, want, _) = read_io(&fixture(&format!("{m}/io.safetensors")));
        let g = read_model(&src).unwrap().graph;
        let out = dir.path().join(format!("{m}.onnx"));
        write_model(&g, &out).unwrap();
        let (got, _) = run_model(&out, &x, &xs);
        assert!(
            max_abs_diff(&got, &want) <= 1e-4,
            "{m}: written model differs"
        );
        if let Some(lib) = ort_lib() {
            let ort = zq::exec::ort::OrtModel::open(&out, Some(&lib), 1)
                .unwrap_or_else(|e| panic!("{m}: ONNX Runtime rejects the written model: {e}"));
            let (_, y) = ort.run(x.clone(), &xs).unwrap();
            assert!(
                max_abs_diff(&y, &want) <= 1e-4,
                "{m}: ONNX Runtime output of the written model differs"
            );
        }
    }
}

/// d(sum(w * f(x)))/dx by backprop vs central differences, at a few coordinates.
fn grad_check(model: &str) {
    // Random inputs, not images: constant image regions put many ReLU inputs at the same value,
    // and one of those near 0 makes finite differences meaningless.
    // One sample: fewer ReLUs for the finite difference to straddle.
    let (_, mut xs, _, _) = read_io(&fixture(&format!("{model}/io.safetensors")));
    xs[0] = 1;
    let x = pseudo_random(xs.iter().product(), 12345);
    let g = read_model(&fixture(&format!("{model}/model.onnx")))
        .unwrap()
        .graph;
    let plan = Plan::new(&g, xs[0]).unwrap();
    let dev = plan.device().clone();
    let xv = Var::from_tensor(&Tensor::from_vec(x.clone(), xs.as_slice(), &dev).unwrap()).unwrap();
    let y = plan.run(&[xv.as_tensor().clone()]).unwrap().remove(0);
    let n = y.elem_count();
    let w: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 13) as f32 / 13.0 - 0.5)
        .collect();
    let wt = Tensor::from_vec(w.clone(), y.dims(), &dev).unwrap();
    let loss = (y * &wt).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let gx: Vec<f32> = grads
        .get(xv.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let f = |x: &[f32]| -> f64 {
        let t = Tensor::from_vec(x.to_vec(), xs.as_slice(), &dev).unwrap();
        let y: Vec<f32> = plan.run(&[t]).unwrap()[0]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        y.iter()
            .zip(&w)
            .map(|(a, b)| f64::from(*a) * f64::from(*b))
            .sum()
    };
    // Directional derivatives along pseudo-random directions: robust to the odd ReLU kink that
    // a single-coordinate difference can straddle.
    let eps = 1e-3f32;
    for k in 0..4u64 {
        let dir = pseudo_random(x.len(), 1000 + k);
        let p: Vec<f32> = x.iter().zip(&dir).map(|(a, d)| a + eps * d).collect();
        let m: Vec<f32> = x.iter().zip(&dir).map(|(a, d)| a - eps * d).collect();
        let num = (f(&p) - f(&m)) / (2.0 * f64::from(eps));
        let ana: f64 = gx
            .iter()
            .zip(&dir)
            .map(|(g, d)| f64::from(*g) * f64::from(*d))
            .sum();
        assert!(
            (num - ana).abs() <= 2e-2 * (1.0 + num.abs().max(ana.abs())),
            "{model}: directional derivative {k}: backprop {ana} vs numeric {num}"
        );
    }
}

#[test]
fn gradients_match_finite_differences() {
    // folded_nobn has MaxPool 3x3/2 with padding, ops_zoo a ceil-mode MaxPool, strided slices,
    // reflect pads and average pools.
    for m in [
        "digits_bn",
        "folded_nobn",
        "ops_zoo_op11",
        "ops_zoo_op21",
        "mobile_dw",
    ] {
        grad_check(m);
    }
}
