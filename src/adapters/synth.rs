//! zq's executor as a `zq_synth::TapModel`: BatchNormalization inputs are tapped through the graph
//! (each BN's own input value), so pairing never depends on layer order.

use candle_core::Tensor;
use zq_synth::{Autograd, BnTarget, Coeffs, Moments, TapGrad, TapModel};

use crate::error::{Error, Result};
use crate::exec::compiled::tape::{Refusal, TapGradient, Tape};
use crate::exec::{Plan, RunOptions};
use crate::ir::{Graph, Op, ValueId};

pub struct PlanTaps {
    pub plan: Plan,
    taps: Vec<ValueId>,
    targets: Vec<BnTarget>,
}

impl PlanTaps {
    /// Specialise `g` for `batch` and collect every BatchNormalization layer's statistics.
    /// A model without BatchNormalization is an error: there is nothing to match.
    pub fn new(g: &Graph, batch: usize) -> Result<PlanTaps> {
        let plan = Plan::new(g, batch)?;
        let pg = &plan.graph;
        let mut taps = Vec::new();
        let mut targets = Vec::new();
        for n in &pg.nodes {
            let Op::BatchNorm { epsilon } = n.op else {
                continue;
            };
            let param = |i: usize| -> Result<Vec<f32>> {
                n.input(i)
                    .and_then(|v| pg.konst(v))
                    .map(|t| t.to_f32_vec())
                    .ok_or_else(|| {
                        Error::node(&n.name, n.op.name(), "running statistics must be constants")
                    })
            };
            let (mean, var) = (param(3)?, param(4)?);
            taps.push(n.input(0).unwrap());
            targets.push(BnTarget {
                name: n.name.clone(),
                mean,
                std: var.iter().map(|v| (v + epsilon).sqrt()).collect(),
                eps: epsilon,
            });
        }
        if targets.is_empty() {
            return Err(Error::Usage(
                "the model has no BatchNormalization layers, so there are no statistics to distil data from; export it keeping BatchNormalization (PyTorch: torch.onnx.export(..., training=torch.onnx.TrainingMode.PRESERVE, dynamo=False))".into(),
            ));
        }
        Ok(PlanTaps {
            plan,
            taps,
            targets,
        })
    }
}

impl PlanTaps {
    /// The engine distillation steps through: the tape when it runs every op on the way to the
    /// BatchNormalization inputs, else candle's autograd over the general executor.
    pub fn engine(&self) -> Box<dyn TapGrad + '_> {
        self.engine_named().0
    }

    /// [`PlanTaps::engine`] and its name for reports: `tape`, or `autograd (<why not the tape>)`.
    pub fn engine_named(&self) -> (Box<dyn TapGrad + '_>, String) {
        match self.tape() {
            Ok(t) => (Box::new(t), "tape".into()),
            Err(e) => (Box::new(Autograd::new(self)), format!("autograd ({e})")),
        }
    }

    /// The tape engine alone; `Err` says what it does not run.
    pub fn tape(&self) -> std::result::Result<TapeTaps<'_>, Refusal> {
        Ok(TapeTaps {
            tape: Tape::new(&self.plan, &self.taps)?,
            model: self,
        })
    }
}

/// [`Tape`] as a [`TapGrad`].
pub struct TapeTaps<'a> {
    tape: Tape,
    model: &'a PlanTaps,
}

impl TapGrad for TapeTaps<'_> {
    fn input_shape(&self) -> Vec<usize> {
        self.model.input_shape()
    }
    fn bn_targets(&self) -> &[BnTarget] {
        &self.model.targets
    }
    fn forward(&mut self, x: &[f32]) -> candle_core::Result<Vec<Moments>> {
        // The tape's own moment type, moved field by field into zq-synth's (no copy).
        Ok(self
            .tape
            .forward(x)
            .into_iter()
            .map(|m| Moments {
                n: m.n,
                c: m.c,
                hw: m.hw,
                mean: m.mean,
                m2: m.m2,
            })
            .collect())
    }
    fn backward(&mut self, coeffs: &[Coeffs]) -> candle_core::Result<Vec<f32>> {
        let grads: Vec<TapGradient> = coeffs
            .iter()
            .map(|c| TapGradient { a: &c.a, b: &c.b })
            .collect();
        Ok(self.tape.backward(&grads))
    }
    fn strided_convs(&self) -> usize {
        self.tape.strided_convs()
    }
    fn set_swing(&mut self, offsets: Option<&[(usize, usize)]>) -> bool {
        self.tape.set_swing(offsets);
        true
    }
}

impl TapModel for PlanTaps {
    fn input_shape(&self) -> Vec<usize> {
        self.plan.input_shape(0).to_vec()
    }
    fn bn_targets(&self) -> &[BnTarget] {
        &self.targets
    }
    fn forward_taps(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        let opts = RunOptions {
            taps: &self.taps,
            overrides: None,
        };
        self.plan
            .run_with(std::slice::from_ref(x), &opts)
            .map(|(_, t)| t)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{DType, Dim, GraphInput, Node, Tensor};

    /// `X -> Slice(axis, step) -> BatchNormalization`, X of shape [3, 2, 4, 4].
    fn sliced_bn(axis: i64, start: i64, step: i64) -> Graph {
        let mut g = Graph::new("t".into(), 13, String::new());
        let x = g.add_value("x".into(), DType::F32);
        g.inputs.push(GraphInput {
            value: x,
            dims: [3, 2, 4, 4].into_iter().map(Dim::Fixed).collect(),
        });
        let i =
            |g: &mut Graph, n: &str, v: i64| g.add_const(n.into(), Tensor::i64(vec![1], vec![v]));
        let starts = i(&mut g, "starts", start);
        let ends = i(&mut g, "ends", if step < 0 { i64::MIN } else { i64::MAX });
        let axes = i(&mut g, "axes", axis);
        let steps = i(&mut g, "steps", step);
        let y = g.add_value("y".into(), DType::F32);
        g.nodes.push(Node {
            name: "slice".into(),
            op: Op::Slice,
            inputs: vec![Some(x), Some(starts), Some(ends), Some(axes), Some(steps)],
            outputs: vec![y],
        });
        push_bn(
            &mut g,
            y,
            [&[1.0, 2.0], &[0.0, 0.5], &[0.1, -0.2], &[1.0, 0.5]],
        );
        g
    }

    /// A BatchNormalization of `y` with these (scale, bias, mean, var) as the graph's output.
    fn push_bn(g: &mut Graph, y: crate::ir::ValueId, params: [&[f32]; 4]) {
        let names = ["bn.scale", "bn.bias", "bn.mean", "bn.var"];
        let mut inputs = vec![Some(y)];
        for (n, v) in names.iter().zip(params) {
            inputs.push(Some(
                g.add_const((*n).into(), Tensor::f32(vec![v.len()], v.to_vec())),
            ));
        }
        let z = g.add_value("z".into(), DType::F32);
        g.nodes.push(Node {
            name: "bn".into(),
            op: Op::BatchNorm { epsilon: 1e-5 },
            inputs,
            outputs: vec![z],
        });
        g.outputs.push(z);
    }

    #[test]
    fn the_tape_refuses_nodes_that_mix_images_and_runs_the_others() {
        // Reversing the batch moves data between images: the tape must not take it for a
        // per-image index map (every image's indices look alike).
        let reversed = PlanTaps::new(&sliced_bn(0, -1, -1), 3).unwrap();
        let e = reversed
            .tape()
            .err()
            .expect("the batch-reversing slice must be refused");
        assert!(matches!(e, Refusal::MixesImages { op: "Slice", .. }), "{e}");
        let (_, name) = reversed.engine_named();
        assert!(name.starts_with("autograd"), "{name}");
        // A spatial slice stays within each image: the tape runs it, and agrees with autograd.
        let spatial = PlanTaps::new(&sliced_bn(3, 0, 2), 3).unwrap();
        let mut tape = spatial.tape().unwrap();
        let mut auto = Autograd::new(&spatial);
        let x = zq_synth::zeroq::PixelMap::noise(3 * 2 * 4 * 4, 5);
        let map = zq_synth::zeroq::PixelMap {
            channels: vec![(0.5, 0.25); 2],
            hw: 16,
        };
        let stats = zq_synth::zeroq::Stats::PerSample;
        let (la, _, ga) = zq_synth::zeroq::loss_and_grad(&mut tape, &x, &map, stats, true).unwrap();
        let (lb, _, gb) = zq_synth::zeroq::loss_and_grad(&mut auto, &x, &map, stats, true).unwrap();
        assert!((la - lb).abs() < 1e-4 * lb.abs().max(1.0), "{la} vs {lb}");
        let err = ga
            .iter()
            .zip(&gb)
            .fold(0f32, |e, (a, b)| e.max((a - b).abs()));
        assert!(err < 1e-4, "gradient differs by {err}");
    }

    /// `X [2, 3, h, w] -> (Pad reflect 1 -> Slice at (dy, dx) when `crop`) -> Conv (stride 2,
    /// `k`x`k`, pad k/2) -> BatchNormalization`.
    fn strided(h: usize, w: usize, k: usize, crop: Option<(usize, usize)>) -> Graph {
        use crate::ir::{AutoPad, ConvAttrs, PadMode};
        let mut g = Graph::new("t".into(), 13, String::new());
        let mut x = g.add_value("x".into(), DType::F32);
        g.inputs.push(GraphInput {
            value: x,
            dims: [2, 3, h, w].into_iter().map(Dim::Fixed).collect(),
        });
        let ints = |g: &mut Graph, n: &str, v: Vec<i64>| {
            g.add_const(n.into(), Tensor::i64(vec![v.len()], v))
        };
        if let Some((dy, dx)) = crop {
            let pads = ints(&mut g, "pads", vec![0, 0, 1, 1, 0, 0, 1, 1]);
            let p = g.add_value("padded".into(), DType::F32);
            g.nodes.push(Node {
                name: "pad".into(),
                op: Op::Pad {
                    mode: PadMode::Reflect,
                },
                inputs: vec![Some(x), Some(pads)],
                outputs: vec![p],
            });
            let (dy, dx) = (dy as i64, dx as i64);
            let starts = ints(&mut g, "starts", vec![dy, dx]);
            let ends = ints(&mut g, "ends", vec![dy + h as i64, dx + w as i64]);
            let axes = ints(&mut g, "axes", vec![2, 3]);
            let c = g.add_value("cropped".into(), DType::F32);
            g.nodes.push(Node {
                name: "crop".into(),
                op: Op::Slice,
                inputs: vec![Some(p), Some(starts), Some(ends), Some(axes)],
                outputs: vec![c],
            });
            x = c;
        }
        let wv: Vec<f32> = (0..4 * 3 * k * k)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.1)
            .collect();
        let wt = g.add_const("w".into(), Tensor::f32(vec![4, 3, k, k], wv));
        let b = g.add_const("b".into(), Tensor::f32(vec![4], vec![0.1, -0.2, 0.0, 0.3]));
        let y = g.add_value("y".into(), DType::F32);
        let p = k / 2;
        g.nodes.push(Node {
            name: "conv".into(),
            op: Op::Conv(ConvAttrs {
                kernel_shape: Some(vec![k, k]),
                strides: vec![2, 2],
                dilations: vec![1, 1],
                pads: vec![p, p, p, p],
                auto_pad: AutoPad::NotSet,
                group: 1,
            }),
            inputs: vec![Some(x), Some(wt), Some(b)],
            outputs: vec![y],
        });
        push_bn(
            &mut g,
            y,
            [
                &[1.0, 2.0, 0.5, 1.0],
                &[0.0, 0.5, 0.1, 0.0],
                &[0.1, -0.2, 0.3, 0.0],
                &[1.0, 0.5, 2.0, 0.3],
            ],
        );
        g
    }

    #[test]
    fn swing_convolution_matches_an_explicit_reflect_pad_and_crop() {
        use zq_synth::zeroq::{loss_and_grad, PixelMap, Stats};
        for (h, w, k) in [(7, 6, 3), (6, 6, 1), (5, 8, 3)] {
            let model = PlanTaps::new(&strided(h, w, k, None), 2).unwrap();
            let mut tape = model.tape().unwrap();
            assert_eq!(tape.strided_convs(), 1);
            let p = PixelMap::noise(2 * 3 * h * w, 9);
            let map = PixelMap {
                channels: vec![(0.5, 0.25); 3],
                hw: h * w,
            };
            for dy in 0..3 {
                for dx in 0..3 {
                    // The reference: reflect-pad and crop in the graph, on the general executor
                    // through candle's autograd.
                    let reference = PlanTaps::new(&strided(h, w, k, Some((dy, dx))), 2).unwrap();
                    let mut auto = Autograd::new(&reference);
                    assert!(tape.set_swing(Some(&[(dy, dx)])));
                    for stats in [Stats::Batch, Stats::PerSample] {
                        let (la, pa, ga) = loss_and_grad(&mut tape, &p, &map, stats, true).unwrap();
                        let (lb, pb, gb) = loss_and_grad(&mut auto, &p, &map, stats, true).unwrap();
                        let at = format!("{h}x{w} k{k} ({dy},{dx}) {stats:?}");
                        assert!(
                            (la - lb).abs() < 1e-4 * lb.abs().max(1.0),
                            "{at}: {la} vs {lb}"
                        );
                        assert!((pa[0] - pb[0]).abs() < 1e-4 * pb[0].abs().max(1.0), "{at}");
                        let scale = gb.iter().fold(0f32, |m, v| m.max(v.abs()));
                        let err = ga
                            .iter()
                            .zip(&gb)
                            .fold(0f32, |e, (a, b)| e.max((a - b).abs()));
                        assert!(
                            err < 1e-4 * scale.max(1.0),
                            "{at}: gradient differs by {err}"
                        );
                    }
                }
            }
            // Off again: the plain convolution.
            assert!(tape.set_swing(None));
            let plain = PlanTaps::new(&strided(h, w, k, None), 2).unwrap();
            let mut auto = Autograd::new(&plain);
            let (la, _, _) = loss_and_grad(&mut tape, &p, &map, Stats::Batch, false).unwrap();
            let (lb, _, _) = loss_and_grad(&mut auto, &p, &map, Stats::Batch, false).unwrap();
            assert!((la - lb).abs() < 1e-4 * lb.abs().max(1.0), "{la} vs {lb}");
        }
    }
}
