//! Graph passes. Each returns a graph that satisfies `Graph::check`: specialisation for a batch
//! size and dead-code elimination here; BatchNormalization folding (with the one rule that
//! decides foldability) in `bn`; QuantizeLinear/DequantizeLinear insertion from a quantization
//! plan in `insert_qdq`.

pub mod bn;
pub mod insert_qdq;

pub use bn::{bn_layers, fold_bn, BnInfo, BnPrior};
pub use insert_qdq::insert_qdq;

use std::collections::HashSet;
use std::sync::Arc;

use super::infer::{self, R};
use super::{Dim, Graph, Node, Tensor, ValueId};
use crate::error::{Error, Result};

/// Folds nodes whose inputs are all constant with a numeric backend (the host evaluator only
/// handles shape arithmetic). Returns `None` to leave the node in the graph.
pub type FloatFolder<'a> = &'a dyn Fn(&Graph, &Node, &[Vec<usize>]) -> R<Option<Vec<Tensor>>>;

fn node_err(n: &Node, msg: String) -> Error {
    Error::node(&n.name, n.op.name(), msg)
}

/// The most elements any value may have (2^30: 4 GiB of f32), checked during specialisation so
/// that absurd declared sizes are an error rather than an allocation failure.
pub const MAX_ELEMENTS: usize = 1 << 30;

/// The element count of `shape` when it is within [`MAX_ELEMENTS`] (`None`: over the limit, or
/// overflowing). Every path that sizes a buffer from a file checks it here.
pub fn checked_elements(shape: &[usize]) -> Option<usize> {
    shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&e| e <= MAX_ELEMENTS)
}

/// Fix the batch size, infer every shape, fold shape arithmetic and constant subgraphs, and drop
/// dead nodes. Symbolic input dims other than the leading (batch) one are an error.
pub fn specialize(g: &Graph, batch: usize, fold_float: FloatFolder) -> Result<Graph> {
    let mut g = g.clone();
    for inp in &g.inputs {
        let mut shape = Vec::with_capacity(inp.dims.len());
        for (i, d) in inp.dims.iter().enumerate() {
            match d {
                Dim::Fixed(n) if i > 0 || *n != 0 => shape.push(*n),
                _ if i == 0 => shape.push(batch),
                Dim::Sym(s) => {
                    return Err(Error::Usage(format!(
                        "input '{}' has a symbolic dimension '{s}' at position {i}; zq needs fixed sizes except the batch",
                        g.values[inp.value].name
                    )))
                }
                Dim::Fixed(_) => unreachable!(),
            }
        }
        if checked_elements(&shape).is_none() {
            return Err(Error::Usage(format!(
                "input '{}' of shape {shape:?} has more than {MAX_ELEMENTS} elements",
                g.values[inp.value].name
            )));
        }
        g.values[inp.value].shape = Some(shape);
    }
    let mut keep = Vec::with_capacity(g.nodes.len());
    let nodes = std::mem::take(&mut g.nodes);
    for n in nodes {
        let shapes = infer::infer(&g, &n).map_err(|m| node_err(&n, m))?;
        if shapes.len() < n.outputs.len() {
            return Err(node_err(
                &n,
                format!(
                    "has {} outputs, expected at most {}",
                    n.outputs.len(),
                    shapes.len()
                ),
            ));
        }
        for (&o, s) in n.outputs.iter().zip(&shapes) {
            // A corrupt or hostile model can declare absurd sizes (a mutated ConstantOfShape
            // argument, say): refuse them before anything is allocated.
            if checked_elements(s).is_none() {
                return Err(node_err(
                    &n,
                    format!(
                        "output '{}' of shape {s:?} has more than {MAX_ELEMENTS} elements",
                        g.values[o].name
                    ),
                ));
            }
            g.values[o].shape = Some(s.clone());
        }
        let folded = match infer::fold_host(&g, &n, &shapes).map_err(|m| node_err(&n, m))? {
            Some(t) => Some(t),
            None if n
                .inputs
                .iter()
                .flatten()
                .all(|&v| g.values[v].konst.is_some()) =>
            {
                fold_float(&g, &n, &shapes).map_err(|m| node_err(&n, m))?
            }
            None => None,
        };
        match folded {
            Some(ts) => {
                for (&o, t) in n.outputs.iter().zip(ts) {
                    g.values[o].dtype = t.dtype;
                    g.values[o].konst = Some(Arc::new(t));
                }
            }
            None => keep.push(n),
        }
    }
    g.nodes = keep;
    dce(&mut g);
    g.check().map_err(Error::Usage)?;
    Ok(g)
}

/// Remove nodes none of whose outputs reach a graph output.
pub fn dce(g: &mut Graph) {
    let mut live: HashSet<ValueId> = g.outputs.iter().copied().collect();
    let mut keep = vec![false; g.nodes.len()];
    for (i, n) in g.nodes.iter().enumerate().rev() {
        if n.outputs.iter().any(|o| live.contains(o)) {
            keep[i] = true;
            live.extend(n.inputs.iter().flatten());
        }
    }
    let mut it = keep.iter();
    g.nodes.retain(|_| *it.next().unwrap());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{DType, Op};

    #[test]
    fn absurd_declared_sizes_are_an_error_not_an_allocation() {
        // ConstantOfShape of [2^21, 2^21, 2^21] (found by the mutation fuzzer, which aborted on
        // the allocation): refused while specialising, naming the node.
        let mut g = Graph::new("t".into(), 13, String::new());
        let shape = g.add_const("shape".into(), Tensor::i64(vec![3], vec![1 << 21; 3]));
        let y = g.add_value("y".into(), DType::F32);
        g.nodes.push(Node {
            name: "huge".into(),
            op: Op::ConstantOfShape {
                value: Tensor::f32(vec![1], vec![0.0]),
            },
            inputs: vec![Some(shape)],
            outputs: vec![y],
        });
        g.outputs.push(y);
        let no_float =
            |_: &Graph, _: &Node, _: &[Vec<usize>]| -> R<Option<Vec<Tensor>>> { Ok(None) };
        let e = specialize(&g, 1, &no_float)
            .expect_err("must be refused")
            .to_string();
        assert!(e.contains("huge") && e.contains("elements"), "{e}");
    }
}
