//! zq's model IR: a topologically ordered graph of closed-enum ops over numbered values.
//!
//! Importers (`crate::onnx`) build it; passes (`passes`) rewrite it; executors (`crate::exec`) run it.
//! Operator attributes are parsed and normalised at import (e.g. Squeeze axes given as an attribute
//! in opset 11 become a constant input, as in opset 13+), so every later stage sees one form per op.

pub mod infer;
pub mod ops;
pub mod passes;
pub mod qdq;
pub mod tensor;

use std::collections::HashMap;
use std::sync::Arc;

pub use ops::*;
pub use tensor::{DType, Data, Tensor};

pub type ValueId = usize;

/// A declared dimension of a graph input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(usize),
    /// Symbolic (named, or unnamed when the name is empty).
    Sym(String),
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Sym(s) if s.is_empty() => f.write_str("?"),
            Dim::Sym(s) => f.write_str(s),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Value {
    pub name: String,
    /// Element type (float tensors flow at run time; integer ones only as constants).
    pub dtype: DType,
    /// Concrete shape, once known (always known after `passes::specialize`).
    pub shape: Option<Vec<usize>>,
    /// Constant contents (initializers, folded values).
    pub konst: Option<Arc<Tensor>>,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub op: Op,
    /// `None` for an omitted optional input.
    pub inputs: Vec<Option<ValueId>>,
    pub outputs: Vec<ValueId>,
}

impl Node {
    /// The i-th input, if present.
    pub fn input(&self, i: usize) -> Option<ValueId> {
        self.inputs.get(i).copied().flatten()
    }
}

#[derive(Debug, Clone)]
pub struct GraphInput {
    pub value: ValueId,
    pub dims: Vec<Dim>,
}

#[derive(Debug, Clone)]
pub struct Graph {
    pub name: String,
    pub values: Vec<Value>,
    /// Topologically sorted.
    pub nodes: Vec<Node>,
    pub inputs: Vec<GraphInput>,
    pub outputs: Vec<ValueId>,
    /// Default-domain opset the model was imported at.
    pub opset: i64,
    pub producer: String,
}

impl Graph {
    /// A graph with no values, nodes, inputs or outputs yet.
    pub fn new(name: String, opset: i64, producer: String) -> Graph {
        Graph {
            name,
            values: Vec::new(),
            nodes: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            opset,
            producer,
        }
    }

    pub fn value(&self, id: ValueId) -> &Value {
        &self.values[id]
    }

    pub fn konst(&self, id: ValueId) -> Option<&Tensor> {
        self.values[id].konst.as_deref()
    }

    pub fn add_value(&mut self, name: String, dtype: DType) -> ValueId {
        self.values.push(Value {
            name,
            dtype,
            shape: None,
            konst: None,
        });
        self.values.len() - 1
    }

    pub fn add_const(&mut self, name: String, t: Tensor) -> ValueId {
        let shape = Some(t.shape.clone());
        self.values.push(Value {
            name,
            dtype: t.dtype,
            shape,
            konst: Some(Arc::new(t)),
        });
        self.values.len() - 1
    }

    /// Index of the node producing each value.
    pub fn producers(&self) -> HashMap<ValueId, usize> {
        let mut m = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for &o in &n.outputs {
                m.insert(o, i);
            }
        }
        m
    }

    /// Indices of the nodes consuming each value.
    pub fn consumers(&self) -> HashMap<ValueId, Vec<usize>> {
        let mut m: HashMap<ValueId, Vec<usize>> = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for v in n.inputs.iter().flatten() {
                m.entry(*v).or_default().push(i);
            }
        }
        m
    }

    /// Histogram of op types, sorted by name.
    pub fn op_histogram(&self) -> Vec<(String, usize)> {
        let mut m: std::collections::BTreeMap<String, usize> = Default::default();
        for n in &self.nodes {
            *m.entry(n.op.name().to_string()).or_default() += 1;
        }
        m.into_iter().collect()
    }

    /// Check the invariants every pass must keep: inputs defined before use, single producer,
    /// outputs defined.
    pub fn check(&self) -> Result<(), String> {
        let mut defined = vec![false; self.values.len()];
        for (i, v) in self.values.iter().enumerate() {
            if v.konst.is_some() {
                defined[i] = true;
            }
        }
        for i in &self.inputs {
            defined[i.value] = true;
        }
        for n in &self.nodes {
            for v in n.inputs.iter().flatten() {
                if !defined[*v] {
                    return Err(format!(
                        "node '{}' ({}): input '{}' is used before it is defined",
                        n.name,
                        n.op.name(),
                        self.values[*v].name
                    ));
                }
            }
            for &o in &n.outputs {
                if defined[o] {
                    return Err(format!(
                        "node '{}' ({}): output '{}' is defined twice",
                        n.name,
                        n.op.name(),
                        self.values[o].name
                    ));
                }
                defined[o] = true;
            }
        }
        for &o in &self.outputs {
            if !defined[o] {
                return Err(format!(
                    "graph output '{}' is never produced",
                    self.values[o].name
                ));
            }
        }
        Ok(())
    }
}
