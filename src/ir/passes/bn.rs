//! BatchNormalization: the one rule that decides whether a BN folds into the layer producing its
//! input ([`fold_target`]), the fold itself ([`fold_bn`], so weights are quantized as the model
//! will run them), and the report `zq inspect` gives ([`bn_layers`]). The folded layer remembers
//! the BN's affine parameters: each output channel after BN is ~ N(beta, gamma^2) on training
//! data, which calibration can use to widen activation ranges.

use std::collections::{HashMap, HashSet};

use crate::ir::{Graph, Node, Op, Tensor, ValueId};

/// Per output channel: BN beta and |gamma| of the folded layer, keyed by its output value.
pub type BnPrior = HashMap<ValueId, (Vec<f32>, Vec<f32>)>;

/// The graph facts the rule needs, computed once per graph.
struct Links {
    prod: HashMap<ValueId, usize>,
    cons: HashMap<ValueId, Vec<usize>>,
    outputs: HashSet<ValueId>,
}

impl Links {
    fn of(g: &Graph) -> Links {
        Links {
            prod: g.producers(),
            cons: g.consumers(),
            outputs: g.outputs.iter().copied().collect(),
        }
    }
}

/// The index of the node BatchNormalization `bn` folds into, or why it cannot fold. Used both by
/// the fold and by `inspect`, so what `inspect` promises is what `quantize` does.
fn fold_target(g: &Graph, l: &Links, bn: &Node) -> Result<usize, String> {
    let x = bn.input(0).ok_or("it has no input")?;
    let &pi = l.prod.get(&x).ok_or("its input is a graph input")?;
    let params: Option<Vec<&Tensor>> = (1..5)
        .map(|i| bn.input(i).and_then(|v| g.konst(v)))
        .collect();
    let params = params.ok_or("its parameters are not constant")?;
    let p = &g.nodes[pi];
    match &p.op {
        Op::Conv(_) => {}
        Op::Gemm {
            trans_b: true,
            alpha,
            beta,
            trans_a: false,
        } if *alpha == 1.0 && *beta == 1.0 => {}
        Op::Gemm { .. } => {
            return Err(format!(
                "its producer {} is a Gemm without transB=1, transA=0, alpha=beta=1",
                p.name
            ))
        }
        other => return Err(format!("its producer is {}, not Conv/Gemm", other.name())),
    }
    let w = p
        .input(1)
        .and_then(|v| g.konst(v))
        .ok_or_else(|| format!("its producer {} has a non-constant weight", p.name))?;
    if !w.is_float() {
        return Err(format!("its producer {} has non-float weights", p.name));
    }
    if w.shape.first().copied() != Some(params[0].len()) {
        return Err(format!(
            "its {} channels do not match the {} outputs of {}",
            params[0].len(),
            w.shape.first().copied().unwrap_or(0),
            p.name
        ));
    }
    if p.input(2).is_some_and(|b| g.konst(b).is_none()) {
        return Err(format!(
            "its producer {} has a bias computed at run time",
            p.name
        ));
    }
    if l.cons.get(&x).map(Vec::len) != Some(1) || l.outputs.contains(&x) {
        return Err(format!("the output of {} is also used elsewhere", p.name));
    }
    Ok(pi)
}

/// Returns the folded graph, the BN priors of folded layers and how many BN layers were folded.
pub fn fold_bn(g: &Graph) -> (Graph, BnPrior, usize) {
    let l = Links::of(g);
    let mut g = g.clone();
    let mut drop = HashSet::new();
    let mut prior = BnPrior::new();
    for bi in 0..g.nodes.len() {
        let Op::BatchNorm { epsilon } = g.nodes[bi].op else {
            continue;
        };
        let bn = g.nodes[bi].clone();
        let Ok(pi) = fold_target(&g, &l, &bn) else {
            continue;
        };
        let param = |i: usize| g.konst(bn.input(i).unwrap()).unwrap().to_f32_vec();
        let (gamma, beta, mean, var) = (param(1), param(2), param(3), param(4));
        let p = g.nodes[pi].clone();
        let w = g.konst(p.input(1).unwrap()).unwrap().clone();
        let m = gamma.len();
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

/// Why a BatchNormalization can or cannot be folded into the layer producing its input.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BnInfo {
    pub node: String,
    pub channels: usize,
    pub producer: Option<String>,
    pub producer_op: Option<String>,
    pub foldable: bool,
    pub reason: String,
}

/// Analyse every BatchNormalization of a graph with the rule [`fold_bn`] applies.
pub fn bn_layers(g: &Graph) -> Vec<BnInfo> {
    let l = Links::of(g);
    let mut out = Vec::new();
    for n in &g.nodes {
        if !matches!(n.op, Op::BatchNorm { .. }) {
            continue;
        }
        let x = n.input(0);
        let channels = x
            .and_then(|x| g.values[x].shape.as_ref())
            .and_then(|s| s.get(1).copied())
            .unwrap_or(0);
        let p = x.and_then(|x| l.prod.get(&x)).map(|&i| &g.nodes[i]);
        let (foldable, reason) = match fold_target(g, &l, n) {
            Ok(pi) => (true, format!("fold into {}", g.nodes[pi].name)),
            Err(why) => (false, why),
        };
        out.push(BnInfo {
            node: n.name.clone(),
            channels,
            producer: p.map(|p| p.name.clone()),
            producer_op: p.map(|p| p.op.name().to_string()),
            foldable,
            reason,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{ConvAttrs, DType};

    /// x -> producer (weight w, flags) -> BN -> y.
    fn graph(op: Op, w: Tensor) -> Graph {
        let mut g = Graph::new("t".into(), 13, String::new());
        let x = g.add_value("x".into(), DType::F32);
        let wid = g.add_const("w".into(), w);
        let h = g.add_value("h".into(), DType::F32);
        let y = g.add_value("y".into(), DType::F32);
        let p: Vec<Option<ValueId>> = ["g", "b", "m", "v"]
            .iter()
            .map(|n| Some(g.add_const((*n).into(), Tensor::f32(vec![2], vec![1.0, 1.0]))))
            .collect();
        g.inputs.push(crate::ir::GraphInput {
            value: x,
            dims: vec![crate::ir::Dim::Fixed(1), crate::ir::Dim::Fixed(2)],
        });
        g.nodes.push(Node {
            name: "layer".into(),
            op,
            inputs: vec![Some(x), Some(wid)],
            outputs: vec![h],
        });
        let mut inputs = vec![Some(h)];
        inputs.extend(p);
        g.nodes.push(Node {
            name: "bn".into(),
            op: Op::BatchNorm { epsilon: 1e-5 },
            inputs,
            outputs: vec![y],
        });
        g.outputs.push(y);
        g
    }

    fn gemm(trans_b: bool, alpha: f32) -> Op {
        Op::Gemm {
            alpha,
            beta: 1.0,
            trans_a: false,
            trans_b,
        }
    }

    #[test]
    fn inspect_promises_exactly_the_folds_quantize_does() {
        let w = Tensor::f32(vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]);
        let conv = Op::Conv(ConvAttrs {
            kernel_shape: None,
            strides: vec![],
            dilations: vec![],
            pads: vec![],
            auto_pad: crate::ir::AutoPad::NotSet,
            group: 1,
        });
        let cases = [
            (gemm(true, 1.0), w.clone(), true),
            // The fold handles only transB=1, alpha=1: inspect used to promise these anyway.
            (gemm(false, 1.0), w.clone(), false),
            (gemm(true, 2.0), w.clone(), false),
            // Integer weights are not folded either.
            (gemm(true, 1.0), w.cast(DType::I8), false),
            (conv, Tensor::f32(vec![2, 1, 1, 1], vec![1.0, 2.0]), true),
        ];
        for (op, w, want) in cases {
            let g = graph(op.clone(), w);
            let info = bn_layers(&g);
            let (_, _, folded) = fold_bn(&g);
            assert_eq!(info[0].foldable, want, "{op:?}: {}", info[0].reason);
            assert_eq!(folded == 1, want, "{op:?}");
        }
    }
}
