//! Weight packing: done once at model load, into the layouts the SIMD kernels read directly.
//!
//! # GEMM / conv weights ([`PackedWeights`])
//!
//! The logical weights are `w[n][k]` (output column `n`, reduction index `k`). `N` is split into
//! blocks of 16 columns and `K` is zero padded to `kp` (a multiple of 4 for int8, of 8 for int4);
//! columns past `n` in the last block are zero too. Every block is one contiguous run of
//! `block_stride` bytes, blocks one after another, and the buffer starts 64-byte aligned.
//!
//! * **int8** — block `b` holds `kp / 4` *groups* of 64 bytes; group `g` stores, at byte
//!   `col * 4 + j`, the weight `w[16 b + col][4 g + j]` (`col < 16`, `j < 4`). One 64-byte load is
//!   16 columns x 4 consecutive `k`: exactly the operand of `vpdpbusd`, one 32-bit lane per column.
//! * **int4** — block `b` holds `kp / 8` *group pairs* of 64 bytes; byte `col * 4 + j` of pair `h`
//!   carries `w[16 b + col][8 h + j]` in its low nibble and `w[16 b + col][8 h + 4 + j]` in its high
//!   nibble, each stored *offset binary* (`w + 8`, so 0..=15; padding is 8, i.e. weight 0). The
//!   kernels unpack in register: mask (`& 0x0F`) or shift-and-mask (`>> 4 & 0x0F`), then subtract
//!   8, which sign-extends the nibble (the `^ 8` half of the usual `(x ^ 8) - 8` is folded into the
//!   packing). Memory stays at half a byte per weight.
//!
//! Alongside, `col_sums[n] = sum_k w[n][k]` (i32), for the activation zero point correction
//! `sum_k (a - za) w = sum_k a w - za * col_sums[n]`.
//!
//! # Depthwise weights ([`DepthwiseWeights`])
//!
//! Logical `w[c][t]` with tap `t = ky * kw + kx` (ONNX `[C][1][kh][kw]`). Channels are padded to
//! `cp`, a multiple of 16, with zero weights.
//!
//! * **int8** — `taps` rows of `cp` bytes: byte `t * cp + c` is `w[c][t]`.
//! * **int4** — per tap, `cp / 16` blocks of 8 bytes: byte `j` of block `b` of tap `t` (offset
//!   `(t * cp / 16 + b) * 8 + j`) carries channel `16 b + j` in its low nibble and `16 b + 8 + j` in
//!   its high nibble, offset binary as above.

use super::KernelError;

/// How the weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    /// One signed byte per weight, -128..=127.
    I8,
    /// One signed nibble per weight, -8..=7, two per byte.
    I4,
}

impl WeightFormat {
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::I8 => "i8",
            WeightFormat::I4 => "i4",
        }
    }
}

/// 64 bytes, 64-byte aligned: the unit of every packed buffer.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// A zero-initialised byte buffer that starts on a 64-byte boundary, its length a multiple of 64.
#[derive(Clone)]
struct Aligned(Vec<Line>);

impl Aligned {
    fn filled(bytes: usize, value: u8) -> Self {
        Aligned(vec![Line([value; 64]); bytes.div_ceil(64)])
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: `Line` is `repr(C)` around `[u8; 64]` with size 64 and no padding, so the
        // vector's `len * 64` bytes are initialised, contiguous and valid as `u8`.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<u8>(), self.0.len() * 64) }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; the unique borrow of the vector makes the byte view unique.
        unsafe {
            std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u8>(), self.0.len() * 64)
        }
    }
}

impl std::fmt::Debug for Aligned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Aligned({} bytes)", self.0.len() * 64)
    }
}

/// Decode element `e` of an ONNX INT4 buffer: element `2i` in the low nibble of byte `i`, `2i + 1`
/// in the high nibble, two's complement.
#[inline]
pub fn onnx_i4_get(packed: &[u8], e: usize) -> i8 {
    let nib = (packed[e / 2] >> (4 * (e & 1))) & 0x0F;
    ((nib ^ 8) as i8) - 8
}

/// Unpack a whole ONNX INT4 buffer of `len` elements to one i8 per element (load time only).
fn onnx_i4_unpack(packed: &[u8], len: usize, what: &'static str) -> Result<Vec<i8>, KernelError> {
    let need = len.div_ceil(2);
    if packed.len() != need {
        return Err(KernelError::Length {
            what,
            need,
            got: packed.len(),
        });
    }
    Ok((0..len).map(|e| onnx_i4_get(packed, e)).collect())
}

fn checked_len(dims: &[usize], what: &'static str) -> Result<usize, KernelError> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&l| l <= isize::MAX as usize / 16)
        .ok_or_else(|| KernelError::Shape(format!("{what}: dimensions {dims:?} overflow")))
}

/// Reorder ONNX conv weights `[cout][cin][kh][kw]` to GEMM rows `[cout][(ky * kw + kx) * cin + ci]`
/// (the im2col order of an NHWC input).
fn oihw_to_rows(w: &[i8], cout: usize, cin: usize, kh: usize, kw: usize) -> Vec<i8> {
    let k = cin * kh * kw;
    let mut rows = vec![0i8; cout * k];
    for o in 0..cout {
        for ci in 0..cin {
            for ky in 0..kh {
                for kx in 0..kw {
                    rows[o * k + (ky * kw + kx) * cin + ci] =
                        w[((o * cin + ci) * kh + ky) * kw + kx];
                }
            }
        }
    }
    rows
}

/// Weights of a GEMM or a group-1 convolution, packed for the integer kernels (layout in the
/// [module docs](self)). Immutable once built; share it between threads freely.
#[derive(Debug, Clone)]
pub struct PackedWeights {
    n: usize,
    k: usize,
    kp: usize,
    format: WeightFormat,
    data: Aligned,
    /// `sum_k w[n][k]`, zero padded to a whole number of 16-column blocks.
    colsum: Vec<i32>,
}

impl PackedWeights {
    /// Pack int8 weights `w`, row-major `[n][k]` (`w[j * k + p]` is column `j`, reduction index
    /// `p`). Errors when `w.len() != n * k`.
    pub fn pack_i8(w: &[i8], n: usize, k: usize) -> Result<Self, KernelError> {
        let len = checked_len(&[n, k], "pack_i8")?;
        if w.len() != len {
            return Err(KernelError::Length {
                what: "int8 weights",
                need: len,
                got: w.len(),
            });
        }
        Ok(Self::build(w, n, k, WeightFormat::I8))
    }

    /// Pack int4 weights in ONNX INT4 order: the row-major `[n][k]` tensor flattened, element `2i`
    /// in the low nibble of byte `i`, `2i + 1` in the high nibble, signed (two's complement), an odd
    /// total padded with one nibble; so `packed.len()` must be `(n * k).div_ceil(2)`. The result
    /// keeps the weights as nibbles.
    pub fn pack_i4(packed: &[u8], n: usize, k: usize) -> Result<Self, KernelError> {
        let len = checked_len(&[n, k], "pack_i4")?;
        let w = onnx_i4_unpack(packed, len, "int4 weights")?;
        Ok(Self::build(&w, n, k, WeightFormat::I4))
    }

    /// Pack ONNX Conv weights (`group == 1`), int8, `[cout][cin][kh][kw]` row-major, as the GEMM
    /// `n = cout`, `k = kh * kw * cin` with `k` ordered `(ky, kx, ci)` to match an NHWC input (see
    /// [`Kernels::conv`](super::Kernels::conv)).
    pub fn pack_conv_i8(
        w: &[i8],
        cout: usize,
        cin: usize,
        kh: usize,
        kw: usize,
    ) -> Result<Self, KernelError> {
        let len = checked_len(&[cout, cin, kh, kw], "pack_conv_i8")?;
        if w.len() != len {
            return Err(KernelError::Length {
                what: "int8 conv weights",
                need: len,
                got: w.len(),
            });
        }
        let rows = oihw_to_rows(w, cout, cin, kh, kw);
        Ok(Self::build(&rows, cout, cin * kh * kw, WeightFormat::I8))
    }

    /// [`pack_conv_i8`](Self::pack_conv_i8) for int4 weights in ONNX INT4 order over the flattened
    /// `[cout][cin][kh][kw]` tensor (`packed.len() == (cout * cin * kh * kw).div_ceil(2)`).
    pub fn pack_conv_i4(
        packed: &[u8],
        cout: usize,
        cin: usize,
        kh: usize,
        kw: usize,
    ) -> Result<Self, KernelError> {
        let len = checked_len(&[cout, cin, kh, kw], "pack_conv_i4")?;
        let w = onnx_i4_unpack(packed, len, "int4 conv weights")?;
        let rows = oihw_to_rows(&w, cout, cin, kh, kw);
        Ok(Self::build(&rows, cout, cin * kh * kw, WeightFormat::I4))
    }

    fn build(w: &[i8], n: usize, k: usize, format: WeightFormat) -> Self {
        let kp = match format {
            WeightFormat::I8 => k.next_multiple_of(4),
            WeightFormat::I4 => k.next_multiple_of(8),
        };
        let blocks = n.div_ceil(16);
        let block_stride = match format {
            WeightFormat::I8 => kp * 16,
            WeightFormat::I4 => kp * 8,
        };
        let fill = match format {
            WeightFormat::I8 => 0,
            WeightFormat::I4 => 0x88,
        };
        let mut data = Aligned::filled(blocks * block_stride, fill);
        let bytes = data.bytes_mut();
        let mut colsum = vec![0i32; blocks * 16];
        for j in 0..n {
            let (b, col) = (j / 16, j % 16);
            for p in 0..k {
                let v = w[j * k + p];
                colsum[j] += i32::from(v);
                match format {
                    WeightFormat::I8 => {
                        bytes[b * block_stride + (p / 4) * 64 + col * 4 + p % 4] = v as u8;
                    }
                    WeightFormat::I4 => {
                        assert!((-8..=7).contains(&v), "int4 weight out of range");
                        let at = b * block_stride + (p / 8) * 64 + col * 4 + p % 4;
                        let nib = (v + 8) as u8;
                        bytes[at] = if p % 8 < 4 {
                            (bytes[at] & 0xF0) | nib
                        } else {
                            (bytes[at] & 0x0F) | (nib << 4)
                        };
                    }
                }
            }
        }
        PackedWeights {
            n,
            k,
            kp,
            format,
            data,
            colsum,
        }
    }

    /// Output columns.
    pub fn n(&self) -> usize {
        self.n
    }
    /// Reduction length (bytes of an activation row that are read).
    pub fn k(&self) -> usize {
        self.k
    }
    /// `k` rounded up to the packing granularity (4 for int8, 8 for int4).
    pub fn k_padded(&self) -> usize {
        self.kp
    }
    pub fn format(&self) -> WeightFormat {
        self.format
    }
    /// `sum_k w[j][k]` for each column `j < n`.
    pub fn col_sums(&self) -> &[i32] {
        &self.colsum[..self.n]
    }
    /// Bytes of packed weight storage.
    pub fn packed_bytes(&self) -> usize {
        self.data.bytes().len()
    }
    /// The logical weight `w[j][p]`, read back from the packed storage.
    pub fn get(&self, j: usize, p: usize) -> i8 {
        assert!(j < self.n && p < self.k, "PackedWeights::get out of range");
        let g = self.group(j / 16, p / 4);
        g[(j % 16) * 4 + p % 4]
    }

    /// Number of 16-column blocks.
    pub(crate) fn blocks(&self) -> usize {
        self.n.div_ceil(16)
    }
    /// Bytes from one 16-column block to the next.
    pub(crate) fn block_stride(&self) -> usize {
        match self.format {
            WeightFormat::I8 => self.kp * 16,
            WeightFormat::I4 => self.kp * 8,
        }
    }
    /// The packed bytes (64-byte aligned, `blocks() * block_stride()` long).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn data(&self) -> &[u8] {
        self.data.bytes()
    }
    /// Column sums padded with zeros to `blocks() * 16`.
    pub(crate) fn colsum_padded(&self) -> &[i32] {
        &self.colsum
    }
    /// Group `g` (k in `4g..4g+4`) of block `b` as 64 signed values, `[col][j]` (col * 4 + j).
    pub(crate) fn group(&self, b: usize, g: usize) -> [i8; 64] {
        let bytes = self.data.bytes();
        let mut out = [0i8; 64];
        match self.format {
            WeightFormat::I8 => {
                let at = b * self.block_stride() + g * 64;
                for (o, &v) in out.iter_mut().zip(&bytes[at..at + 64]) {
                    *o = v as i8;
                }
            }
            WeightFormat::I4 => {
                let at = b * self.block_stride() + (g / 2) * 64;
                let shift = 4 * (g % 2);
                for (o, &v) in out.iter_mut().zip(&bytes[at..at + 64]) {
                    *o = ((v >> shift) & 0x0F) as i8 - 8;
                }
            }
        }
        out
    }
}

/// Per-channel weights of a depthwise convolution (`group == channels`, one output channel per
/// input channel), packed for the kernels (layout in the [module docs](self)).
#[derive(Debug, Clone)]
pub struct DepthwiseWeights {
    c: usize,
    kh: usize,
    kw: usize,
    cp: usize,
    format: WeightFormat,
    data: Aligned,
    wsum: Vec<i32>,
}

impl DepthwiseWeights {
    /// Pack int8 depthwise weights, ONNX layout `[c][1][kh][kw]` row-major (`c * kh * kw` values).
    pub fn pack_i8(w: &[i8], c: usize, kh: usize, kw: usize) -> Result<Self, KernelError> {
        let len = checked_len(&[c, kh, kw], "depthwise pack_i8")?;
        if w.len() != len {
            return Err(KernelError::Length {
                what: "int8 depthwise weights",
                need: len,
                got: w.len(),
            });
        }
        Ok(Self::build(w, c, kh, kw, WeightFormat::I8))
    }

    /// Pack int4 depthwise weights: `[c][1][kh][kw]` flattened in ONNX INT4 order (element `2i` in
    /// the low nibble of byte `i`), `packed.len() == (c * kh * kw).div_ceil(2)`.
    pub fn pack_i4(packed: &[u8], c: usize, kh: usize, kw: usize) -> Result<Self, KernelError> {
        let len = checked_len(&[c, kh, kw], "depthwise pack_i4")?;
        let w = onnx_i4_unpack(packed, len, "int4 depthwise weights")?;
        Ok(Self::build(&w, c, kh, kw, WeightFormat::I4))
    }

    fn build(w: &[i8], c: usize, kh: usize, kw: usize, format: WeightFormat) -> Self {
        let taps = kh * kw;
        let cp = c.next_multiple_of(16);
        let (bytes_len, fill) = match format {
            WeightFormat::I8 => (taps * cp, 0),
            WeightFormat::I4 => (taps * cp / 2, 0x88),
        };
        let mut data = Aligned::filled(bytes_len, fill);
        let bytes = data.bytes_mut();
        let mut wsum = vec![0i32; cp];
        for ch in 0..c {
            for t in 0..taps {
                let v = w[ch * taps + t];
                wsum[ch] += i32::from(v);
                match format {
                    WeightFormat::I8 => bytes[t * cp + ch] = v as u8,
                    WeightFormat::I4 => {
                        assert!((-8..=7).contains(&v), "int4 weight out of range");
                        let (b, j) = (ch / 16, ch % 16);
                        let at = (t * cp / 16 + b) * 8 + j % 8;
                        let nib = (v + 8) as u8;
                        bytes[at] = if j < 8 {
                            (bytes[at] & 0xF0) | nib
                        } else {
                            (bytes[at] & 0x0F) | (nib << 4)
                        };
                    }
                }
            }
        }
        DepthwiseWeights {
            c,
            kh,
            kw,
            cp,
            format,
            data,
            wsum,
        }
    }

    pub fn channels(&self) -> usize {
        self.c
    }
    pub fn kernel(&self) -> (usize, usize) {
        (self.kh, self.kw)
    }
    pub fn format(&self) -> WeightFormat {
        self.format
    }
    /// `sum_t w[c][t]` for each channel.
    pub fn weight_sums(&self) -> &[i32] {
        &self.wsum[..self.c]
    }
    /// The logical weight of channel `ch` at tap `t = ky * kw + kx`.
    pub fn get(&self, ch: usize, t: usize) -> i8 {
        assert!(
            ch < self.c && t < self.kh * self.kw,
            "DepthwiseWeights::get out of range"
        );
        self.at(ch, t)
    }

    pub(crate) fn at(&self, ch: usize, t: usize) -> i8 {
        let bytes = self.data.bytes();
        match self.format {
            WeightFormat::I8 => bytes[t * self.cp + ch] as i8,
            WeightFormat::I4 => {
                let (b, j) = (ch / 16, ch % 16);
                let v = bytes[(t * self.cp / 16 + b) * 8 + j % 8];
                let nib = if j < 8 { v & 0x0F } else { v >> 4 };
                nib as i8 - 8
            }
        }
    }
    pub(crate) fn taps(&self) -> usize {
        self.kh * self.kw
    }
    /// Channels padded to a multiple of 16.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn channels_padded(&self) -> usize {
        self.cp
    }
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn data(&self) -> &[u8] {
        self.data.bytes()
    }
    pub(crate) fn wsum_padded(&self) -> &[i32] {
        &self.wsum
    }
}
