//! Host tensors for constants (initializers, folded shape arithmetic).
//!
//! Float element types are stored as `f32`, integer and boolean types as `i64`; `DType` keeps the
//! declared ONNX element type so a writer can emit what was read.

use std::fmt;

/// The ONNX element type a constant was declared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    U16,
    U32,
    U64,
    Bool,
    /// 4-bit integers (opset 21), packed two per byte, first element in the low nibble.
    U4,
    I4,
}

impl DType {
    /// ONNX `TensorProto.DataType` code.
    pub fn onnx_code(self) -> i32 {
        match self {
            DType::F32 => 1,
            DType::U8 => 2,
            DType::I8 => 3,
            DType::U16 => 4,
            DType::I16 => 5,
            DType::I32 => 6,
            DType::I64 => 7,
            DType::Bool => 9,
            DType::F16 => 10,
            DType::F64 => 11,
            DType::U32 => 12,
            DType::U64 => 13,
            DType::U4 => 21,
            DType::I4 => 22,
        }
    }

    pub fn from_onnx_code(code: i32) -> Option<DType> {
        Some(match code {
            1 => DType::F32,
            2 => DType::U8,
            3 => DType::I8,
            4 => DType::U16,
            5 => DType::I16,
            6 => DType::I32,
            7 => DType::I64,
            9 => DType::Bool,
            10 => DType::F16,
            11 => DType::F64,
            12 => DType::U32,
            13 => DType::U64,
            21 => DType::U4,
            22 => DType::I4,
            _ => return None,
        })
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::F64)
    }

    /// Bytes of `n` elements in ONNX raw_data (4-bit types pack two per byte).
    pub fn raw_len(self, n: usize) -> usize {
        match self {
            DType::U4 | DType::I4 => n.div_ceil(2),
            _ => n * self.size_of(),
        }
    }

    /// Bytes per element in ONNX raw_data (1 for the packed 4-bit types; see `raw_len`).
    pub fn size_of(self) -> usize {
        match self {
            DType::Bool | DType::I8 | DType::U8 | DType::U4 | DType::I4 => 1,
            DType::F16 | DType::I16 | DType::U16 => 2,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F64 | DType::I64 | DType::U64 => 8,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::F64 => "float64",
            DType::I64 => "int64",
            DType::I32 => "int32",
            DType::I16 => "int16",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::U16 => "uint16",
            DType::U32 => "uint32",
            DType::U64 => "uint64",
            DType::Bool => "bool",
            DType::U4 => "uint4",
            DType::I4 => "int4",
        };
        f.write_str(s)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// A dense host tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Data,
}

impl Tensor {
    pub fn f32(shape: Vec<usize>, v: Vec<f32>) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), v.len());
        Tensor {
            dtype: DType::F32,
            shape,
            data: Data::F32(v),
        }
    }

    pub fn i64(shape: Vec<usize>, v: Vec<i64>) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), v.len());
        Tensor {
            dtype: DType::I64,
            shape,
            data: Data::I64(v),
        }
    }

    pub fn scalar_f32(v: f32) -> Tensor {
        Tensor::f32(vec![], vec![v])
    }

    pub fn len(&self) -> usize {
        match &self.data {
            Data::F32(v) => v.len(),
            Data::I64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_float(&self) -> bool {
        matches!(self.data, Data::F32(_))
    }

    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            Data::F32(v) => Some(v),
            Data::I64(_) => None,
        }
    }

    /// Values as f32, converting integers.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.data {
            Data::F32(v) => v.clone(),
            Data::I64(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    /// Values as i64; float values are truncated toward zero (ONNX Cast semantics).
    pub fn to_i64_vec(&self) -> Vec<i64> {
        match &self.data {
            Data::F32(v) => v.iter().map(|&x| x as i64).collect(),
            Data::I64(v) => v.clone(),
        }
    }

    /// Convert to another element type (ONNX Cast).
    pub fn cast(&self, to: DType) -> Tensor {
        let data = if to.is_float() {
            let mut v = self.to_f32_vec();
            if to == DType::F16 {
                for x in &mut v {
                    *x = zq_quant::f16_round(*x);
                }
            }
            Data::F32(v)
        } else if to == DType::Bool {
            Data::I64(
                self.to_f32_vec()
                    .iter()
                    .map(|&x| i64::from(x != 0.0))
                    .collect(),
            )
        } else {
            Data::I64(self.to_i64_vec())
        };
        Tensor {
            dtype: to,
            shape: self.shape.clone(),
            data,
        }
    }

    pub fn reshape(&self, shape: Vec<usize>) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), self.len());
        Tensor {
            dtype: self.dtype,
            shape,
            data: self.data.clone(),
        }
    }

    /// Gather elements by flat indices (used by slice/transpose/gather).
    pub fn take(&self, shape: Vec<usize>, idx: &[usize]) -> Tensor {
        let data = match &self.data {
            Data::F32(v) => Data::F32(idx.iter().map(|&i| v[i]).collect()),
            Data::I64(v) => Data::I64(idx.iter().map(|&i| v[i]).collect()),
        };
        Tensor {
            dtype: self.dtype,
            shape,
            data,
        }
    }

    /// Number of bytes this tensor occupies at its declared dtype.
    pub fn nbytes(&self) -> usize {
        self.dtype.raw_len(self.len())
    }
}

/// Row-major strides of a shape.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Numpy-style broadcast of two shapes.
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i + a.len() >= n {
            a[i + a.len() - n]
        } else {
            1
        };
        let db = if i + b.len() >= n {
            b[i + b.len() - n]
        } else {
            1
        };
        out[i] = if da == db {
            da
        } else if da == 1 {
            db
        } else if db == 1 {
            da
        } else {
            return None;
        };
    }
    Some(out)
}

/// Flat source indices that broadcast `from` to `to`.
pub fn broadcast_index(from: &[usize], to: &[usize]) -> Vec<usize> {
    let n = to.len();
    let fs = strides(from);
    let total: usize = to.iter().product();
    let mut out = Vec::with_capacity(total);
    let mut idx = vec![0usize; n];
    for _ in 0..total {
        let mut off = 0;
        for (d, &i) in idx.iter().enumerate() {
            if d + from.len() >= n {
                let fd = d + from.len() - n;
                if from[fd] != 1 {
                    off += i * fs[fd];
                }
            }
        }
        out.push(off);
        for d in (0..n).rev() {
            idx[d] += 1;
            if idx[d] < to[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast() {
        assert_eq!(broadcast_shapes(&[2, 1, 3], &[4, 1]), Some(vec![2, 4, 3]));
        assert_eq!(broadcast_shapes(&[2, 3], &[4]), None);
        assert_eq!(broadcast_index(&[1, 3], &[2, 3]), vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(broadcast_index(&[2, 1], &[2, 3]), vec![0, 0, 0, 1, 1, 1]);
    }

    #[test]
    fn cast() {
        let t = Tensor::f32(vec![3], vec![1.7, -2.5, 0.0]);
        assert_eq!(t.cast(DType::I64).to_i64_vec(), vec![1, -2, 0]);
        assert_eq!(t.cast(DType::Bool).to_i64_vec(), vec![1, 1, 0]);
    }
}
