//! Float inference on the tape: a float graph with its BatchNormalizations folded into the
//! convolutions, run forward to its outputs on [`Tape`]'s channels-last buffers (Winograd 3x3
//! convolutions, GEMM pointwise and fully connected layers, depthwise kernels), one image per task
//! on each core. The native engine runs float models this way when the tape covers every op.

use std::collections::HashMap;

use super::tape::{Refusal, Tape};
use crate::error::{Error, Result};
use crate::exec::Plan;
use crate::ir::Graph;

/// A float graph compiled for the tape, one tape per batch size.
pub struct FloatModel {
    graph: Graph,
    tapes: HashMap<usize, Compiled>,
    /// [`FloatModel::set_split_grain`]'s value, for tapes compiled later.
    grain: Option<usize>,
}

struct Compiled {
    tape: Tape,
    /// The shape of each output.
    shapes: Vec<Vec<usize>>,
}

/// Why a graph does not run on the tape: the tape's refusal, or an error specialising it (which
/// the reference executor reports the same way).
pub enum NotCovered {
    Refused(Refusal),
    Failed(Error),
}

impl FloatModel {
    /// Compile `g` for batch size 1 at once, so a graph the tape does not cover is known before
    /// any input is read.
    pub fn new(g: &Graph) -> std::result::Result<FloatModel, NotCovered> {
        let (graph, _, _) = crate::ir::passes::bn::fold_bn(g);
        let mut m = FloatModel {
            graph,
            tapes: HashMap::new(),
            grain: None,
        };
        let c = m.compile(1)?;
        m.tapes.insert(1, c);
        Ok(m)
    }

    fn compile(&self, n: usize) -> std::result::Result<Compiled, NotCovered> {
        let plan = Plan::new(&self.graph, n).map_err(NotCovered::Failed)?;
        let outs: Vec<_> = plan.graph.outputs.clone();
        let shapes = outs
            .iter()
            .map(|&v| {
                plan.graph.values[v].shape.clone().ok_or_else(|| {
                    NotCovered::Refused(Refusal::Graph(format!(
                        "output '{}' has no static shape",
                        plan.graph.values[v].name
                    )))
                })
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let mut tape = Tape::new(&plan, &outs).map_err(NotCovered::Refused)?;
        if let Some(g) = self.grain {
            tape.set_split_grain(g);
        }
        Ok(Compiled { tape, shapes })
    }

    /// The chunks a batch of `n` runs in: one image per core at a time, so the activations of
    /// the images in flight stay in cache (a tape keeps every value of every image it holds).
    /// Whole-batch when an output does not split along a leading batch axis.
    fn chunks(&self, n: usize) -> Vec<usize> {
        let k = rayon::current_num_threads().clamp(1, n.max(1));
        let splits = match self.tapes.get(&1) {
            Some(one) => one.shapes.iter().all(|s| s.first() == Some(&1)),
            None => false,
        };
        if !splits || k >= n {
            return vec![n];
        }
        let mut v = vec![k; n / k];
        if !n.is_multiple_of(k) {
            v.push(n % k);
        }
        v
    }

    fn tape(&mut self, n: usize) -> Result<()> {
        if !self.tapes.contains_key(&n) {
            let c = self.compile(n).map_err(|e| match e {
                NotCovered::Failed(e) => e,
                // Batch size 1 compiled; another size differs only in the batch dimension.
                NotCovered::Refused(r) => Error::Internal(format!("tape for batch {n}: {r}")),
            })?;
            self.tapes.insert(n, c);
        }
        Ok(())
    }

    /// Make sure the tapes for a batch of `n` are compiled.
    pub fn prepare(&mut self, n: usize) -> Result<()> {
        for k in self.chunks(n) {
            self.tape(k)?;
        }
        Ok(())
    }

    /// Split every convolution of at least `macs` multiply-adds over the threads a batch smaller
    /// than the pool leaves over (tests use 0 to run the split paths on small models).
    pub fn set_split_grain(&mut self, macs: usize) {
        self.grain = Some(macs);
        for c in self.tapes.values_mut() {
            c.tape.set_split_grain(macs);
        }
    }

    /// Run `n` inputs (`[n, ...]` flattened); returns every output with its shape.
    pub fn run(&mut self, x: &[f32], n: usize) -> Result<Vec<(Vec<f32>, Vec<usize>)>> {
        self.prepare(n)?;
        let per = self.tapes[&1].tape.input_len();
        let want = per * n;
        if x.len() != want {
            return Err(Error::Usage(format!(
                "{} input values for a batch of {n}, the model takes {want}",
                x.len()
            )));
        }
        let chunks = self.chunks(n);
        if let [k] = chunks[..] {
            let c = self.tapes.get_mut(&k).expect("prepared above");
            let r = c.tape.values(x);
            return Ok(r.into_iter().zip(c.shapes.clone()).collect());
        }
        // Chunked: every output is `[k, ...]` for a chunk of k (checked in `chunks`).
        let mut outs: Vec<(Vec<f32>, Vec<usize>)> = self.tapes[&1]
            .shapes
            .iter()
            .map(|s| {
                let mut s = s.clone();
                s[0] = n;
                (Vec::with_capacity(s.iter().product()), s)
            })
            .collect();
        let mut at = 0;
        for k in chunks {
            let c = self.tapes.get_mut(&k).expect("prepared above");
            let r = c.tape.values(&x[at * per..(at + k) * per]);
            for (o, v) in outs.iter_mut().zip(r) {
                o.0.extend_from_slice(&v);
            }
            at += k;
        }
        Ok(outs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At batch 1 on two threads, convolutions split over the team (Winograd bands, pointwise
    /// row bands, depthwise output rows) give the values of the unsplit run, to the bit.
    #[test]
    fn split_convolutions_equal_the_unsplit_ones() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for name in ["digits_bn", "mobile_dw"] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fixtures")
                .join(name)
                .join("model.onnx");
            let g = crate::onnx::read_model(&path).unwrap().graph;
            pool.install(|| {
                let mut whole = match FloatModel::new(&g) {
                    Ok(m) => m,
                    Err(NotCovered::Refused(r)) => panic!("{name}: the tape refuses it: {r}"),
                    Err(NotCovered::Failed(e)) => panic!("{name}: {e}"),
                };
                let Ok(mut split) = FloatModel::new(&g) else {
                    unreachable!()
                };
                split.set_split_grain(0);
                let per = whole.tapes[&1].tape.input_len();
                let x: Vec<f32> = (0..per)
                    .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
                    .collect();
                let a = whole.run(&x, 1).unwrap();
                let b = split.run(&x, 1).unwrap();
                assert_eq!(a, b, "{name}");
            });
        }
    }
}
