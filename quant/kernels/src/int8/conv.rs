//! Convolution drivers (safe code): geometry checks, im2col-by-panel for group-1 convolutions,
//! indirection buffers for depthwise ones; the arithmetic is the variant's GEMM / depthwise kernel.

use std::ops::Range;

use super::{
    prepare, ASrc, DepthwiseWeights, DwJob, GemmJob, KernelError, Kernels, Output, PackedWeights,
    WeightFormat,
};

/// The shape of a 2-D convolution over one NHWC image.
///
/// Input pixel `(y, x)` (`y < in_h`, `x < in_w`) is the `channels` bytes at
/// `(y * in_w + x) * pixel_stride` (`pixel_stride >= channels`; larger when the input is a channel
/// slice of a wider tensor). Output pixel `(oy, ox)` reads input `(oy * stride_h + ky * dilation_h
/// - pad_top, ox * stride_w + kx * dilation_w - pad_left)` for each tap `(ky, kx)`; positions
/// outside the image are padding (value `za`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConvGeometry {
    pub in_h: usize,
    pub in_w: usize,
    pub channels: usize,
    pub pixel_stride: usize,
    pub kernel_h: usize,
    pub kernel_w: usize,
    pub stride_h: usize,
    pub stride_w: usize,
    pub dilation_h: usize,
    pub dilation_w: usize,
    pub pad_top: usize,
    pub pad_left: usize,
    pub pad_bottom: usize,
    pub pad_right: usize,
}

impl ConvGeometry {
    /// A `kernel_h x kernel_w` convolution, stride 1, dilation 1, no padding, dense pixels.
    pub fn new(
        in_h: usize,
        in_w: usize,
        channels: usize,
        kernel_h: usize,
        kernel_w: usize,
    ) -> Self {
        ConvGeometry {
            in_h,
            in_w,
            channels,
            pixel_stride: channels,
            kernel_h,
            kernel_w,
            stride_h: 1,
            stride_w: 1,
            dilation_h: 1,
            dilation_w: 1,
            pad_top: 0,
            pad_left: 0,
            pad_bottom: 0,
            pad_right: 0,
        }
    }
    pub fn with_stride(mut self, stride_h: usize, stride_w: usize) -> Self {
        self.stride_h = stride_h;
        self.stride_w = stride_w;
        self
    }
    pub fn with_dilation(mut self, dilation_h: usize, dilation_w: usize) -> Self {
        self.dilation_h = dilation_h;
        self.dilation_w = dilation_w;
        self
    }
    /// ONNX `pads` order is `[top, left, bottom, right]`.
    pub fn with_padding(mut self, top: usize, left: usize, bottom: usize, right: usize) -> Self {
        self.pad_top = top;
        self.pad_left = left;
        self.pad_bottom = bottom;
        self.pad_right = right;
        self
    }
    pub fn with_pixel_stride(mut self, pixel_stride: usize) -> Self {
        self.pixel_stride = pixel_stride;
        self
    }

    fn out_dim(input: usize, pad: usize, kernel: usize, dilation: usize, stride: usize) -> usize {
        if kernel == 0 || stride == 0 {
            return 0;
        }
        let span = dilation.saturating_mul(kernel - 1).saturating_add(1);
        let padded = input.saturating_add(pad);
        if padded < span {
            0
        } else {
            (padded - span) / stride + 1
        }
    }
    /// Output rows (0 for an invalid geometry).
    pub fn out_h(&self) -> usize {
        Self::out_dim(
            self.in_h,
            self.pad_top.saturating_add(self.pad_bottom),
            self.kernel_h,
            self.dilation_h,
            self.stride_h,
        )
    }
    /// Output columns (0 for an invalid geometry).
    pub fn out_w(&self) -> usize {
        Self::out_dim(
            self.in_w,
            self.pad_left.saturating_add(self.pad_right),
            self.kernel_w,
            self.dilation_w,
            self.stride_w,
        )
    }
    pub fn out_pixels(&self) -> usize {
        self.out_h().saturating_mul(self.out_w())
    }

    /// Check the geometry, the input length and the pixel range.
    fn validate(&self, input_len: usize, pixels: &Range<usize>) -> Result<(), KernelError> {
        let bad = |what: &str| {
            Err(KernelError::Shape(format!(
                "conv geometry {self:?}: {what}"
            )))
        };
        if self.kernel_h == 0 || self.kernel_w == 0 {
            return bad("empty kernel");
        }
        if self.stride_h == 0 || self.stride_w == 0 || self.dilation_h == 0 || self.dilation_w == 0
        {
            return bad("zero stride or dilation");
        }
        if self.pixel_stride < self.channels {
            return bad("pixel stride below the channel count");
        }
        let dims = [
            self.in_h,
            self.in_w,
            self.channels,
            self.pixel_stride,
            self.kernel_h,
            self.kernel_w,
        ];
        let size = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d.max(1)))
            .filter(|&s| s <= isize::MAX as usize / 4);
        let span_ok = self.dilation_h.checked_mul(self.kernel_h).is_some()
            && self.dilation_w.checked_mul(self.kernel_w).is_some()
            && [self.in_h, self.pad_top, self.pad_bottom]
                .iter()
                .try_fold(0usize, |a, &d| a.checked_add(d))
                .is_some_and(|s| s <= isize::MAX as usize / 4)
            && [self.in_w, self.pad_left, self.pad_right]
                .iter()
                .try_fold(0usize, |a, &d| a.checked_add(d))
                .is_some_and(|s| s <= isize::MAX as usize / 4);
        if size.is_none() || !span_ok {
            return bad("dimensions overflow");
        }
        if self.out_pixels() == 0 {
            return bad("no output pixels");
        }
        let npix = self.in_h * self.in_w;
        let need = if npix == 0 {
            0
        } else {
            (npix - 1) * self.pixel_stride + self.channels
        };
        if input_len < need {
            return Err(KernelError::Length {
                what: "conv input",
                need,
                got: input_len,
            });
        }
        if pixels.start > pixels.end || pixels.end > self.out_pixels() {
            return Err(KernelError::Shape(format!(
                "output pixel range {pixels:?} outside 0..{}",
                self.out_pixels()
            )));
        }
        Ok(())
    }

    /// The input offset of tap `(ky, kx)` for output pixel `(oy, ox)`, `None` in the padding.
    #[inline]
    fn tap(&self, oy: usize, ox: usize, ky: usize, kx: usize) -> Option<usize> {
        let iy = (oy * self.stride_h + ky * self.dilation_h).checked_sub(self.pad_top)?;
        let ix = (ox * self.stride_w + kx * self.dilation_w).checked_sub(self.pad_left)?;
        (iy < self.in_h && ix < self.in_w).then(|| (iy * self.in_w + ix) * self.pixel_stride)
    }
}

/// Fill `ptrs` with the indirection rows of output pixels `first..first + count`: for each pixel,
/// one pointer per tap `(ky, kx)` to its input pixel's `channels` bytes, or to `za_row` in the
/// padding. The pointers are formed with `wrapping_add` from `input` after `validate` checked that
/// every in-image pixel holds `channels` bytes, so each one points to `channels` readable bytes.
fn indirection(
    g: &ConvGeometry,
    input: &[u8],
    za_row: &[u8],
    first: usize,
    count: usize,
    ptrs: &mut Vec<*const u8>,
) {
    debug_assert!(za_row.len() >= g.channels);
    let base = input.as_ptr();
    let ow = g.out_w();
    let (mut oy, mut ox) = (first / ow, first % ow);
    let taps = g.kernel_h * g.kernel_w;
    ptrs.clear();
    ptrs.resize(count * taps, za_row.as_ptr());
    // Offsets of the taps from the window's top-left input pixel, for windows inside the image.
    let mut tap_off = Vec::with_capacity(taps);
    for ky in 0..g.kernel_h {
        for kx in 0..g.kernel_w {
            tap_off.push((ky * g.dilation_h * g.in_w + kx * g.dilation_w) * g.pixel_stride);
        }
    }
    let span_h = (g.kernel_h - 1) * g.dilation_h;
    let span_w = (g.kernel_w - 1) * g.dilation_w;
    for pixel in ptrs.chunks_exact_mut(taps) {
        // Out-of-image coordinates wrap to huge values and fail the `<` tests.
        let y0 = (oy * g.stride_h).wrapping_sub(g.pad_top);
        let x0 = (ox * g.stride_w).wrapping_sub(g.pad_left);
        if y0 < g.in_h && y0 + span_h < g.in_h && x0 < g.in_w && x0 + span_w < g.in_w {
            let origin = base.wrapping_add((y0 * g.in_w + x0) * g.pixel_stride);
            for (slot, &off) in pixel.iter_mut().zip(&tap_off) {
                *slot = origin.wrapping_add(off);
            }
        } else {
            let mut slots = pixel.iter_mut();
            let mut iy = y0;
            for _ in 0..g.kernel_h {
                let mut ix = x0;
                for slot in slots.by_ref().take(g.kernel_w) {
                    if iy < g.in_h && ix < g.in_w {
                        *slot = base.wrapping_add((iy * g.in_w + ix) * g.pixel_stride);
                    }
                    ix = ix.wrapping_add(g.dilation_w);
                }
                iy = iy.wrapping_add(g.dilation_h);
            }
        }
        ox += 1;
        if ox == ow {
            ox = 0;
            oy += 1;
        }
    }
}

/// Output pixels per implicit-GEMM call (a multiple of every tile height).
const IGEMM_ROWS: usize = 240;

/// Target size of one im2col panel.
const PANEL_BYTES: usize = 96 * 1024;

/// Write the im2col rows of output pixels `first..first + count` into `buf` (`kq` bytes per row,
/// `(ky, kx, c)` order, padding as `za`, bytes past `kh * kw * c` zero).
fn gather(
    input: &[u8],
    g: &ConvGeometry,
    za: u8,
    first: usize,
    count: usize,
    kq: usize,
    buf: &mut [u8],
) {
    let (c, ow) = (g.channels, g.out_w());
    let k = g.kernel_h * g.kernel_w * c;
    let contiguous = g.pixel_stride == c && g.dilation_w == 1;
    for (i, row) in buf.chunks_exact_mut(kq).take(count).enumerate() {
        let (oy, ox) = ((first + i) / ow, (first + i) % ow);
        for ky in 0..g.kernel_h {
            let mut kx = 0;
            while kx < g.kernel_w {
                let dst = (ky * g.kernel_w + kx) * c;
                match g.tap(oy, ox, ky, kx) {
                    None => {
                        row[dst..dst + c].fill(za);
                        kx += 1;
                    }
                    Some(src) => {
                        // A run of taps adjacent in memory is one copy.
                        let run = if contiguous {
                            let ix = ox * g.stride_w + kx - g.pad_left;
                            (g.kernel_w - kx).min(g.in_w - ix)
                        } else {
                            1
                        };
                        row[dst..dst + run * c].copy_from_slice(&input[src..src + run * c]);
                        kx += run;
                    }
                }
            }
        }
        row[k..].fill(0);
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn conv(
    kernels: &Kernels,
    input: &[u8],
    g: &ConvGeometry,
    za: u8,
    w: &PackedWeights,
    bias: Option<&[i32]>,
    out: Output<'_>,
    pixels: Range<usize>,
) -> Result<(), KernelError> {
    g.validate(input.len(), &pixels)?;
    let k = g.kernel_h * g.kernel_w * g.channels;
    if w.k() != k {
        return Err(KernelError::Shape(format!(
            "conv weights have k = {}, the geometry needs {}x{}x{} = {k}",
            w.k(),
            g.kernel_h,
            g.kernel_w,
            g.channels
        )));
    }
    let m = pixels.len();
    let ep = prepare(out, m, w.n(), bias, w.colsum_padded(), za)?;
    if m == 0 || w.n() == 0 {
        return Ok(());
    }
    let direct = g.kernel_h == 1
        && g.kernel_w == 1
        && g.stride_h == 1
        && g.stride_w == 1
        && g.pad_top + g.pad_left + g.pad_bottom + g.pad_right == 0;
    if direct {
        // A 1x1 convolution is a GEMM over the input pixels themselves.
        let a = &input[pixels.start * g.pixel_stride..];
        let job = GemmJob {
            src: ASrc::Dense {
                a: a.as_ptr(),
                lda: g.pixel_stride,
            },
            m,
            k,
            za,
            w,
            bias: &ep.bias,
            corr: &ep.corr,
            scale: &ep.scale,
            out: ep.out,
        };
        // SAFETY: output pixel p is input pixel p here, and `validate` checked that all
        // `in_h * in_w >= pixels.end` input pixels hold `channels == k` bytes; `prepare` checked
        // the output for `m x n`.
        unsafe { kernels.run_gemm(&job) };
        return Ok(());
    }
    let granule = match w.format() {
        WeightFormat::I8 => 4,
        WeightFormat::I4 => 8,
    };
    if g.channels.is_multiple_of(granule) {
        // Implicit GEMM: each A row is the kernel's taps, read in place through an indirection
        // buffer (padding points to a row of `za`).
        let taps = g.kernel_h * g.kernel_w;
        let c = g.channels;
        let za_row = vec![za; c];
        let rows = IGEMM_ROWS.min(m);
        let mut ptrs: Vec<*const u8> = Vec::with_capacity(rows * taps);
        let mut start = 0;
        while start < m {
            let count = rows.min(m - start);
            indirection(g, input, &za_row, pixels.start + start, count, &mut ptrs);
            let job = GemmJob {
                src: ASrc::Indirect { ptrs: &ptrs, taps },
                m: count,
                k,
                za,
                w,
                bias: &ep.bias,
                corr: &ep.corr,
                scale: &ep.scale,
                out: ep.out.offset_rows(start),
            };
            // SAFETY: `count * taps` pointers, each to `c` readable bytes of `input` or `za_row`
            // (see `indirection`; both alive for the call); `k == taps * c` with `c` a multiple of the weight
            // group size; the output rows `start..start + count` lie in the `m` rows `prepare`
            // checked.
            unsafe { kernels.run_gemm(&job) };
            start += count;
        }
        return Ok(());
    }
    let kq = w.k_padded();
    let rows = (PANEL_BYTES / kq.max(1)).clamp(48, 1536) / 48 * 48;
    let rows = rows.min(m);
    let mut buf = vec![0u8; rows * kq];
    let mut start = 0;
    while start < m {
        let count = rows.min(m - start);
        gather(input, g, za, pixels.start + start, count, kq, &mut buf);
        let job = GemmJob {
            src: ASrc::Dense {
                a: buf.as_ptr(),
                lda: kq,
            },
            m: count,
            k: kq,
            za,
            w,
            bias: &ep.bias,
            corr: &ep.corr,
            scale: &ep.scale,
            out: ep.out.offset_rows(start),
        };
        // SAFETY: `buf` holds `count` rows of `kq == w.k_padded()` bytes whose bytes past `w.k()`
        // are zero (and their weights are zero); the output rows `start..start + count` lie in the
        // `m` rows `prepare` checked.
        unsafe { kernels.run_gemm(&job) };
        start += count;
    }
    Ok(())
}

/// Output pixels per depthwise kernel call (the indirection buffer is `taps` pointers each).
const DW_CHUNK: usize = 64;

#[allow(clippy::too_many_arguments)]
pub(crate) fn depthwise(
    kernels: &Kernels,
    input: &[u8],
    g: &ConvGeometry,
    za: u8,
    w: &DepthwiseWeights,
    bias: Option<&[i32]>,
    out: Output<'_>,
    pixels: Range<usize>,
) -> Result<(), KernelError> {
    g.validate(input.len(), &pixels)?;
    if g.channels != w.channels() || (g.kernel_h, g.kernel_w) != w.kernel() {
        return Err(KernelError::Shape(format!(
            "depthwise weights are {} channels {:?}, the geometry is {} channels {}x{}",
            w.channels(),
            w.kernel(),
            g.channels,
            g.kernel_h,
            g.kernel_w
        )));
    }
    let (m, c) = (pixels.len(), g.channels);
    let ep = prepare(out, m, c, bias, w.wsum_padded(), za)?;
    if m == 0 || c == 0 {
        return Ok(());
    }
    let za_row = vec![za; c];
    let taps = w.taps();
    let mut ptrs: Vec<*const u8> = Vec::with_capacity(DW_CHUNK.min(m) * taps);
    let mut start = 0;
    while start < m {
        let count = DW_CHUNK.min(m - start);
        indirection(g, input, &za_row, pixels.start + start, count, &mut ptrs);
        let job = DwJob {
            ptrs: &ptrs,
            npix: count,
            za,
            w,
            bias: &ep.bias,
            corr: &ep.corr,
            scale: &ep.scale,
            out: ep.out.offset_rows(start),
        };
        // SAFETY: every pointer points to `c` readable bytes of `input` or `za_row` (see
        // `indirection`; both alive for the call); the output rows `start..start + count` lie in the `m` rows `prepare`
        // checked; the per-channel vectors are padded to `w.channels_padded()`.
        unsafe { kernels.run_depthwise(&job) };
        start += count;
    }
    Ok(())
}
