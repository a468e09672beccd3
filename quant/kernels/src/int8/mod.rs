//! Integer inference kernels: u8 activations x signed 8- or 4-bit weights, exact i32 accumulation,
//! fused requantize / dequantize epilogues, for QDQ networks run in NHWC layout.
//!
//! * [`PackedWeights`] / [`DepthwiseWeights`]: weights packed once at load ([`pack`] has the
//!   layouts).
//! * [`Kernels`]: a table of kernel entry points for one instruction set ([`Variant`]): scalar (the
//!   reference, on every target), AVX2 and AVX-512 VNNI (x86-64, chosen at run time). Pick one with
//!   [`Kernels::best`], [`Kernels::from_env`] (`ZQ_KERNELS`) or [`Kernels::get`]; call
//!   [`Kernels::gemm`], [`Kernels::conv`] and [`Kernels::depthwise`].
//!
//! # Arithmetic (identical in every variant, bit for bit)
//!
//! For output column (channel) `j`:
//!
//! ```text
//! acc = bias[j] + sum_p (a[p] - za) * w[j][p]        (i32, wrapping)
//! I32:  y = acc
//! F32:  y = (acc as f32) * scale[j]
//! U8:   y = clamp(round_ties_even((acc as f32) * scale[j]) + zp, lo, hi)    (all in f32)
//! ```
//!
//! `acc` is exact whenever the true sum fits in i32, which holds for any `k <= 65_536` with
//! `|bias| <= 2^23` (each product is at most 255 * 128 in magnitude); beyond that every variant
//! wraps the same way. The U8 epilogue rounds half to even in f32, adds the zero point in f32 and
//! clamps in f32 before the (then exact) conversion to u8, so it equals the integer formula
//! `clamp(rne(x) + zp, lo, hi)` and behaves identically in scalar and SIMD code even when `x`
//! overflows i32. `lo..=hi` is the activation range: `0..=255` plain, `zp..=255` for a fused ReLU,
//! a Clip's quantized bounds, or `0..=15` for a 4-bit activation output. Scales must be finite.
//! The conversions assume the default floating-point environment (round to nearest even), as
//! all Rust code does.
//!
//! # Threads
//!
//! Every call is single-threaded and only touches what it is given, so split work across threads
//! by rows: [`Kernels::gemm`] on row slices of `a` and the matching `chunks_mut` of the output,
//! [`Kernels::conv`] / [`Kernels::depthwise`] on disjoint output pixel ranges.

pub mod bench;
mod conv;
pub mod pack;
mod scalar;
mod table;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(test)]
mod tests;

pub use conv::{ConvGeometry, ConvPlan};
pub use pack::{onnx_i4_get, DepthwiseWeights, PackedWeights, WeightFormat};
pub use table::{Kernels, Variant};

/// Why a kernel call or a packing was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    #[error(
        "ZQ_KERNELS={0:?}: unknown kernel variant (expected scalar, avx2, avx512vnni or auto)"
    )]
    UnknownVariant(String),
    #[error("kernel variant {0} is not supported by this CPU")]
    Unsupported(&'static str),
    #[error("{what}: need {need} elements, got {got}")]
    Length {
        what: &'static str,
        need: usize,
        got: usize,
    },
    #[error("{0}")]
    Shape(String),
}

/// Where and how the results go. Element `(i, j)` (row or output pixel `i`, column or channel `j`)
/// is written to `data[i * stride + j]`; nothing else in `data` is touched, so `data` may start at
/// a channel offset of a wider NHWC buffer (`stride` = its channel count).
///
/// `scale` holds one value per column (`n` values) or a single value for all columns.
#[derive(Debug)]
pub enum Output<'a> {
    /// Requantized u8: `clamp(round_ties_even(acc * scale[j]) + zero_point, min, max)`.
    U8 {
        data: &'a mut [u8],
        stride: usize,
        scale: &'a [f32],
        zero_point: u8,
        min: u8,
        max: u8,
    },
    /// Requantized u8 as [`Output::U8`], then added to a u8 residual with QLinearAdd's
    /// formula (see [`Residual`]) before it is stored: a residual block's conv and its Add in one
    /// pass.
    U8Add {
        data: &'a mut [u8],
        stride: usize,
        scale: &'a [f32],
        zero_point: u8,
        min: u8,
        max: u8,
        residual: Residual<'a>,
    },
    /// Dequantized f32: `acc * scale[j]`.
    F32 {
        data: &'a mut [f32],
        stride: usize,
        scale: &'a [f32],
    },
    /// The raw i32 accumulator (bias included).
    I32 { data: &'a mut [i32], stride: usize },
}

impl<'a> Output<'a> {
    /// u8 output over the full range `0..=255`.
    pub fn u8(data: &'a mut [u8], stride: usize, scale: &'a [f32], zero_point: u8) -> Self {
        Output::U8 {
            data,
            stride,
            scale,
            zero_point,
            min: 0,
            max: 255,
        }
    }
    pub fn f32(data: &'a mut [f32], stride: usize, scale: &'a [f32]) -> Self {
        Output::F32 {
            data,
            stride,
            scale,
        }
    }
    pub fn i32(data: &'a mut [i32], stride: usize) -> Self {
        Output::I32 { data, stride }
    }
}

/// The second operand of [`Output::U8Add`]: `b = data[i * stride + j]` for result `(i, j)`, and
/// the sum's quantization. With `q` the conv's requantized u8 result, the stored value is, in f32,
///
/// ```text
/// clamp(round_ties_even(ra * (q - za) + rb * (b - zb)) + zy, min, max)
/// ```
///
/// (`ra = s_q / s_y`, `rb = s_b / s_y`: ONNX Runtime's QLinearAdd). Each product is a separate
/// f32 multiply (no fused multiply-add), in every variant.
#[derive(Debug, Clone, Copy)]
pub struct Residual<'a> {
    pub data: &'a [u8],
    pub stride: usize,
    pub ra: f32,
    pub za: u8,
    pub rb: f32,
    pub zb: u8,
    pub zy: u8,
    pub min: u8,
    pub max: u8,
}

/// A validated residual: row `i < rows`, column `j < cols` readable at `ptr + i * ldc + j`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawRes {
    pub(crate) ptr: *const u8,
    pub(crate) ldc: usize,
    pub(crate) ra: f32,
    pub(crate) za: f32,
    pub(crate) rb: f32,
    pub(crate) zb: f32,
    pub(crate) zy: f32,
    pub(crate) lo: f32,
    pub(crate) hi: f32,
}

impl RawRes {
    /// The scalar definition of the sum; the SIMD variants replicate it operation by operation.
    #[inline]
    pub(crate) fn add(&self, q: u8, b: u8) -> u8 {
        let v = self.ra * (f32::from(q) - self.za) + self.rb * (f32::from(b) - self.zb);
        (v.round_ties_even() + self.zy).max(self.lo).min(self.hi) as u8
    }
}

/// A validated output: a raw pointer with the epilogue constants. Row `i < rows`, column
/// `j < cols` is writable at `ptr + i * ldc + j`, and no two such elements alias.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RawOut {
    U8 {
        ptr: *mut u8,
        ldc: usize,
        zp: f32,
        lo: f32,
        hi: f32,
    },
    U8Add {
        ptr: *mut u8,
        ldc: usize,
        zp: f32,
        lo: f32,
        hi: f32,
        res: RawRes,
    },
    F32 {
        ptr: *mut f32,
        ldc: usize,
    },
    I32 {
        ptr: *mut i32,
        ldc: usize,
    },
}

impl RawOut {
    /// The same output moved down by `rows` rows (within the validated range).
    pub(crate) fn offset_rows(self, rows: usize) -> RawOut {
        // `wrapping_add` keeps this safe; the callers only move within the validated range.
        match self {
            RawOut::U8 {
                ptr,
                ldc,
                zp,
                lo,
                hi,
            } => RawOut::U8 {
                ptr: ptr.wrapping_add(rows * ldc),
                ldc,
                zp,
                lo,
                hi,
            },
            RawOut::U8Add {
                ptr,
                ldc,
                zp,
                lo,
                hi,
                res,
            } => RawOut::U8Add {
                ptr: ptr.wrapping_add(rows * ldc),
                ldc,
                zp,
                lo,
                hi,
                res: RawRes {
                    ptr: res.ptr.wrapping_add(rows * res.ldc),
                    ..res
                },
            },
            RawOut::F32 { ptr, ldc } => RawOut::F32 {
                ptr: ptr.wrapping_add(rows * ldc),
                ldc,
            },
            RawOut::I32 { ptr, ldc } => RawOut::I32 {
                ptr: ptr.wrapping_add(rows * ldc),
                ldc,
            },
        }
    }
}

/// Per-column constants of one call, padded to whole 16-column blocks.
pub(crate) struct Epilogue {
    /// `bias[j]` (0 past `n`).
    pub(crate) bias: Vec<i32>,
    /// `bias[j] - za * colsum[j]`, wrapping: what the SIMD kernels add to `sum a * w`.
    pub(crate) corr: Vec<i32>,
    /// `scale[j]` (0 past `n`, and 0 for I32 output).
    pub(crate) scale: Vec<f32>,
    pub(crate) out: RawOut,
}

/// Check `out` for `rows x cols` results and build the call's constants.
pub(crate) fn prepare(
    out: Output<'_>,
    rows: usize,
    cols: usize,
    bias: Option<&[i32]>,
    sums: &[i32],
    za: u8,
) -> Result<Epilogue, KernelError> {
    let padded = sums.len();
    debug_assert!(padded >= cols && padded.is_multiple_of(16));
    let check_rows = |what: &'static str, len: usize, stride: usize| {
        if rows > 1 && stride < cols {
            return Err(KernelError::Shape(format!(
                "{what} stride {stride} is below the {cols} columns of a row"
            )));
        }
        let need = if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1)
                .checked_mul(stride)
                .and_then(|x| x.checked_add(cols))
                .ok_or_else(|| KernelError::Shape(format!("{what} stride overflows")))?
        };
        if len < need {
            return Err(KernelError::Length {
                what,
                need,
                got: len,
            });
        }
        Ok(())
    };
    let check = |len: usize, stride: usize| -> Result<(), KernelError> {
        check_rows("output", len, stride)
    };
    let scales = |scale: &[f32]| -> Result<Vec<f32>, KernelError> {
        if scale.len() != cols && scale.len() != 1 {
            return Err(KernelError::Length {
                what: "output scales (one per column, or one)",
                need: cols,
                got: scale.len(),
            });
        }
        if let Some(s) = scale.iter().find(|s| !s.is_finite()) {
            return Err(KernelError::Shape(format!(
                "output scale {s} is not finite"
            )));
        }
        let mut v = vec![0f32; padded];
        for (j, s) in v.iter_mut().take(cols).enumerate() {
            *s = scale[if scale.len() == 1 { 0 } else { j }];
        }
        Ok(v)
    };
    let (out, scale) = match out {
        Output::U8 {
            data,
            stride,
            scale,
            zero_point,
            min,
            max,
        } => {
            check(data.len(), stride)?;
            if min > max {
                return Err(KernelError::Shape(format!(
                    "output range {min}..={max} is empty"
                )));
            }
            let raw = RawOut::U8 {
                ptr: data.as_mut_ptr(),
                ldc: stride,
                zp: f32::from(zero_point),
                lo: f32::from(min),
                hi: f32::from(max),
            };
            (raw, scales(scale)?)
        }
        Output::U8Add {
            data,
            stride,
            scale,
            zero_point,
            min,
            max,
            residual: r,
        } => {
            check(data.len(), stride)?;
            check_rows("residual", r.data.len(), r.stride)?;
            if min > max || r.min > r.max {
                return Err(KernelError::Shape(format!(
                    "output range {min}..={max} or sum range {}..={} is empty",
                    r.min, r.max
                )));
            }
            if !(r.ra.is_finite() && r.rb.is_finite()) {
                return Err(KernelError::Shape(format!(
                    "residual scales {} and {} must be finite",
                    r.ra, r.rb
                )));
            }
            let raw = RawOut::U8Add {
                ptr: data.as_mut_ptr(),
                ldc: stride,
                zp: f32::from(zero_point),
                lo: f32::from(min),
                hi: f32::from(max),
                res: RawRes {
                    ptr: r.data.as_ptr(),
                    ldc: r.stride,
                    ra: r.ra,
                    za: f32::from(r.za),
                    rb: r.rb,
                    zb: f32::from(r.zb),
                    zy: f32::from(r.zy),
                    lo: f32::from(r.min),
                    hi: f32::from(r.max),
                },
            };
            (raw, scales(scale)?)
        }
        Output::F32 {
            data,
            stride,
            scale,
        } => {
            check(data.len(), stride)?;
            let raw = RawOut::F32 {
                ptr: data.as_mut_ptr(),
                ldc: stride,
            };
            (raw, scales(scale)?)
        }
        Output::I32 { data, stride } => {
            check(data.len(), stride)?;
            let raw = RawOut::I32 {
                ptr: data.as_mut_ptr(),
                ldc: stride,
            };
            (raw, vec![0f32; padded])
        }
    };
    let mut b = vec![0i32; padded];
    if let Some(bias) = bias {
        if bias.len() != cols {
            return Err(KernelError::Length {
                what: "bias",
                need: cols,
                got: bias.len(),
            });
        }
        b[..cols].copy_from_slice(bias);
    }
    let corr = b
        .iter()
        .zip(sums)
        .map(|(&b, &s)| b.wrapping_sub(i32::from(za).wrapping_mul(s)))
        .collect();
    Ok(Epilogue {
        bias: b,
        corr,
        scale,
        out,
    })
}

/// Where the rows of A are.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ASrc<'a> {
    /// Row `r` is the `k` bytes at `a + r * lda`.
    Dense { a: *const u8, lda: usize },
    /// Row `r` is `taps` segments of `k / taps` bytes, segment `t` at `ptrs[r * taps + t]` (an
    /// implicit-GEMM convolution: one segment per kernel tap, padding pointing to a row of `za`).
    /// `k / taps` is a multiple of 4 (int8 weights) or 8 (int4), so segments hold whole groups.
    Indirect { ptrs: &'a [*const u8], taps: usize },
}

/// One validated GEMM call for a kernel variant.
///
/// Invariants (what the safe callers check): every row `r < m` of `src` is readable (`k` bytes);
/// `w.k() <= k <= w.k_padded()`, and the bytes past `w.k()` have zero weight (for `Indirect`,
/// `k == w.k()`); `bias`, `corr` and `scale` have `w.blocks() * 16` entries; `out` is valid for
/// `m` rows of `w.n()` columns.
pub(crate) struct GemmJob<'a> {
    pub(crate) src: ASrc<'a>,
    pub(crate) m: usize,
    pub(crate) k: usize,
    pub(crate) za: u8,
    pub(crate) w: &'a PackedWeights,
    pub(crate) bias: &'a [i32],
    /// Read by the SIMD variants only.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) corr: &'a [i32],
    pub(crate) scale: &'a [f32],
    pub(crate) out: RawOut,
}

impl GemmJob<'_> {
    /// Copy row `r` (`k` bytes) into `dst`.
    ///
    /// # Safety
    /// `r < m` and the job's invariants hold.
    #[inline]
    pub(crate) unsafe fn copy_row(&self, r: usize, dst: &mut [u8]) {
        debug_assert!(r < self.m && dst.len() >= self.k);
        if self.k == 0 {
            return;
        }
        match self.src {
            ASrc::Dense { a, lda } => {
                // SAFETY: row `r < m` has `k` readable bytes.
                let row = unsafe { std::slice::from_raw_parts(a.add(r * lda), self.k) };
                dst[..self.k].copy_from_slice(row);
            }
            ASrc::Indirect { ptrs, taps } => {
                let seg = self.k / taps;
                for (t, d) in dst[..self.k].chunks_exact_mut(seg).enumerate() {
                    // SAFETY: segment `t` of row `r` has `seg` readable bytes.
                    let src = unsafe { std::slice::from_raw_parts(ptrs[r * taps + t], seg) };
                    d.copy_from_slice(src);
                }
            }
        }
    }
}

/// One validated depthwise call: `npix` output pixels, each with `taps` input pointers.
///
/// Invariants: `ptrs.len() == npix * w.taps()`; `ptrs[p * taps + t]` points to `w.channels()`
/// readable bytes (input pixel of tap `t` for output pixel `p`, or a row of `za` for padding);
/// `bias`, `corr`, `scale` have `w.channels_padded()` entries; `out` is valid for `npix` rows of
/// `w.channels()` columns.
pub(crate) struct DwJob<'a> {
    pub(crate) ptrs: &'a [*const u8],
    pub(crate) npix: usize,
    pub(crate) za: u8,
    pub(crate) w: &'a DepthwiseWeights,
    pub(crate) bias: &'a [i32],
    /// Read by the SIMD variants only.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) corr: &'a [i32],
    pub(crate) scale: &'a [f32],
    pub(crate) out: RawOut,
}

/// The scalar definition of the U8 epilogue; the SIMD variants replicate it operation by operation.
#[inline]
pub(crate) fn requant(acc: i32, scale: f32, zp: f32, lo: f32, hi: f32) -> u8 {
    ((acc as f32 * scale).round_ties_even() + zp)
        .max(lo)
        .min(hi) as u8
}
