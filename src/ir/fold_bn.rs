//! Fold BatchNormalization into the Conv (or Gemm with transB=1) producing its input, so weights
//! are quantized as the model will run them. The folded layer remembers the BN's affine
//! parameters: each output channel after BN is ~ N(beta, gamma^2) on training data, which
//! calibration uses to widen activation ranges.

use std::collections::{HashMap, HashSet};

use super::{Graph, Op, Tensor, ValueId};

/// Per output channel: BN beta and |gamma| of the folded layer, keyed by its output value.
pub type BnPrior = HashMap<ValueId, (Vec<f32>, Vec<f32>)>;

/// Returns the folded graph, the BN priors of folded layers and how many BN layers were folded.
pub fn fold_bn(g: &Graph) -> (Graph, BnPrior, usize) {
    let mut g = g.clone();
    let prod = g.producers();
    let cons = g.consumers();
    let outputs: HashSet<ValueId> = g.outputs.iter().copied().collect();
    let mut drop = HashSet::new();
    let mut prior = BnPrior::new();
    for bi in 0..g.nodes.len() {
        let Op::BatchNorm { epsilon } = g.nodes[bi].op else {
            continue;
        };
        let bn = g.nodes[bi].clone();
        let x = bn.input(0).unwrap();
        let Some(&pi) = prod.get(&x) else { continue };
        if cons.get(&x).map(Vec::len) != Some(1) || outputs.contains(&x) {
            continue;
        }
        let params: Option<Vec<Vec<f32>>> = (1..5)
            .map(|i| bn.input(i).and_then(|v| g.konst(v)).map(Tensor::to_f32_vec))
            .collect();
        let Some(params) = params else { continue };
        let (gamma, beta, mean, var) = (&params[0], &params[1], &params[2], &params[3]);
        let p = g.nodes[pi].clone();
        let ok = match &p.op {
            Op::Conv(_) => true,
            Op::Gemm {
                trans_b: true,
                alpha,
                beta: gb,
                trans_a: false,
            } => *alpha == 1.0 && *gb == 1.0,
            _ => false,
        };
        let Some(w) = p.input(1).and_then(|v| g.konst(v)).cloned() else {
            continue;
        };
        let m = w.shape.first().copied().unwrap_or(0);
        if !ok || m != gamma.len() || !w.is_float() {
            continue;
        }
        let k: Vec<f32> = (0..m)
            .map(|c| gamma[c] / (var[c] + epsilon).sqrt())
            .collect();
        let per = w.shape.iter().skip(1).product::<usize>();
        let wv: Vec<f32> = w
            .to_f32_vec()
            .iter()
            .enumerate()
            .map(|(i, &v)| v * k[i / per])
            .collect();
        let b0 = match p.input(2).and_then(|v| g.konst(v)) {
            Some(b) => b.to_f32_vec(),
            None if p.input(2).is_some() => continue, // a run-time bias: leave it alone
            None => vec![0.0; m],
        };
        let bv: Vec<f32> = (0..m).map(|c| (b0[c] - mean[c]) * k[c] + beta[c]).collect();
        let wname = format!("{}.weight_bnfolded", p.name);
        let bname = format!("{}.bias_bnfolded", p.name);
        let wid = g.add_const(wname, Tensor::f32(w.shape.clone(), wv));
        let bid = g.add_const(bname, Tensor::f32(vec![m], bv));
        let y = bn.outputs[0];
        let node = &mut g.nodes[pi];
        node.inputs[1] = Some(wid);
        if node.inputs.len() < 3 {
            node.inputs.push(Some(bid));
        } else {
            node.inputs[2] = Some(bid);
        }
        node.outputs[0] = y;
        prior.insert(y, (beta.clone(), gamma.iter().map(|v| v.abs()).collect()));
        drop.insert(bi);
    }
    let n = drop.len();
    let mut i = 0;
    g.nodes.retain(|_| {
        i += 1;
        !drop.contains(&(i - 1))
    });
    (g, prior, n)
}
