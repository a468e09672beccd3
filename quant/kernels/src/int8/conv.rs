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

    /// Check the geometry and the pixel range.
    fn validate(&self, pixels: &Range<usize>) -> Result<(), KernelError> {
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
        if pixels.start > pixels.end || pixels.end > self.out_pixels() {
            return Err(KernelError::Shape(format!(
                "output pixel range {pixels:?} outside 0..{}",
                self.out_pixels()
            )));
        }
        Ok(())
    }

    /// Bytes an input image must hold: up to the last pixel's `channels`.
    fn input_need(&self) -> usize {
        let npix = self.in_h * self.in_w;
        if npix == 0 {
            0
        } else {
            (npix - 1) * self.pixel_stride + self.channels
        }
    }

    fn check_input(&self, input_len: usize) -> Result<(), KernelError> {
        let need = self.input_need();
        if input_len < need {
            return Err(KernelError::Length {
                what: "conv input",
                need,
                got: input_len,
            });
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

/// Offset of a padding tap in a [`ConvPlan`].
const PAD: u32 = u32::MAX;

/// A convolution's geometry with its output pixel range, checked once, and the input offset of
/// every tap of every output pixel in the range (the indirection of the implicit-GEMM and
/// depthwise kernels): build it once per layer and pixel range, then run
/// [`Kernels::conv_planned`] / [`Kernels::depthwise_planned`] on any number of images.
#[derive(Debug, Clone)]
pub struct ConvPlan {
    geom: ConvGeometry,
    pixels: Range<usize>,
    /// `pixels.len() * taps` offsets, pixel-major, `PAD` in the padding; empty for a 1x1
    /// convolution that reads its pixels in place.
    offs: Vec<u32>,
}

impl ConvPlan {
    /// Check `geom` and `pixels` (a range of `0..geom.out_pixels()`) and compute the offsets.
    pub fn new(geom: &ConvGeometry, pixels: Range<usize>) -> Result<ConvPlan, KernelError> {
        geom.validate(&pixels)?;
        let g = geom;
        let mut offs = Vec::new();
        if !g.is_pointwise() {
            if g.input_need() >= PAD as usize {
                return Err(KernelError::Shape(format!(
                    "conv geometry {g:?}: an image of {} bytes is beyond the 4 GiB the \
                     indirection offsets address",
                    g.input_need()
                )));
            }
            let taps = g.kernel_h * g.kernel_w;
            let count = pixels.len();
            offs.reserve_exact(count * taps);
            let ow = g.out_w();
            let (mut oy, mut ox) = (pixels.start / ow, pixels.start % ow);
            let span_h = (g.kernel_h - 1) * g.dilation_h;
            let span_w = (g.kernel_w - 1) * g.dilation_w;
            for _ in 0..count {
                // Out-of-image coordinates wrap to huge values and fail the `<` tests.
                let y0 = (oy * g.stride_h).wrapping_sub(g.pad_top);
                let x0 = (ox * g.stride_w).wrapping_sub(g.pad_left);
                let inside =
                    y0 < g.in_h && y0 + span_h < g.in_h && x0 < g.in_w && x0 + span_w < g.in_w;
                let mut iy = y0;
                for _ in 0..g.kernel_h {
                    let mut ix = x0;
                    for _ in 0..g.kernel_w {
                        // Below `input_need() < PAD` when inside the image.
                        offs.push(if inside || (iy < g.in_h && ix < g.in_w) {
                            ((iy * g.in_w + ix) * g.pixel_stride) as u32
                        } else {
                            PAD
                        });
                        ix = ix.wrapping_add(g.dilation_w);
                    }
                    iy = iy.wrapping_add(g.dilation_h);
                }
                ox += 1;
                if ox == ow {
                    ox = 0;
                    oy += 1;
                }
            }
        }
        Ok(ConvPlan {
            geom: *geom,
            pixels,
            offs,
        })
    }
    pub fn geometry(&self) -> &ConvGeometry {
        &self.geom
    }
    pub fn pixels(&self) -> Range<usize> {
        self.pixels.clone()
    }
    fn taps(&self) -> usize {
        self.geom.kernel_h * self.geom.kernel_w
    }
}

impl ConvGeometry {
    /// A 1x1, stride-1, unpadded convolution: a GEMM over the input pixels themselves.
    fn is_pointwise(&self) -> bool {
        self.kernel_h == 1
            && self.kernel_w == 1
            && self.stride_h == 1
            && self.stride_w == 1
            && self.pad_top + self.pad_left + self.pad_bottom + self.pad_right == 0
    }
}

/// Fill `ptrs` (`count * taps` entries) with the indirection rows of plan pixels
/// `first..first + count` (indices into the plan's range): one pointer per tap to its input
/// pixel's `channels` bytes in `input`, or to `za_row` in the padding. After
/// `check_input(input.len())`, every offset of the plan other than `PAD` has `channels` readable
/// bytes of `input` at it, so each pointer points to `channels` readable bytes (formed with
/// `wrapping_add`, so forming them is safe). The loop is the variant's (vectorised for its
/// instruction set).
fn indirection(
    kernels: &Kernels,
    plan: &ConvPlan,
    input: &[u8],
    za_row: &[u8],
    first: usize,
    ptrs: &mut [*const u8],
) {
    debug_assert!(za_row.len() >= plan.geom.channels);
    if plan.geom.is_pointwise() {
        // No offsets are stored: a 1x1 tap reads output pixel `p`'s own input pixel, inside the
        // image (`validate` bounds `p` by `out_pixels()`, equal to the input's pixels here).
        let p0 = plan.pixels.start + first;
        for (i, p) in ptrs.iter_mut().enumerate() {
            *p = input
                .as_ptr()
                .wrapping_add((p0 + i) * plan.geom.pixel_stride);
        }
        return;
    }
    let taps = plan.taps();
    let offs = &plan.offs[first * taps..first * taps + ptrs.len()];
    kernels.fill_ptrs(offs, input.as_ptr(), za_row.as_ptr(), ptrs);
}

/// `out[i] = za` where `offs[i]` is `PAD`, else `base + offs[i]` (wrapping: forming a pointer is
/// safe; what it may be used for is the caller's business).
#[inline(always)]
pub(crate) fn fill_ptrs(offs: &[u32], base: *const u8, za: *const u8, out: &mut [*const u8]) {
    for (p, &o) in out.iter_mut().zip(offs) {
        *p = if o == PAD {
            za
        } else {
            base.wrapping_add(o as usize)
        };
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

pub(crate) fn conv(
    kernels: &Kernels,
    input: &[u8],
    plan: &ConvPlan,
    za: u8,
    w: &PackedWeights,
    bias: Option<&[i32]>,
    out: Output<'_>,
) -> Result<(), KernelError> {
    let (g, pixels) = (&plan.geom, plan.pixels());
    g.check_input(input.len())?;
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
    if g.is_pointwise() {
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
        let mut ptrs = vec![za_row.as_ptr(); rows * taps];
        let mut start = 0;
        while start < m {
            let count = rows.min(m - start);
            let ptrs = &mut ptrs[..count * taps];
            indirection(kernels, plan, input, &za_row, start, ptrs);
            let job = GemmJob {
                src: ASrc::Indirect { ptrs, taps },
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

pub(crate) fn depthwise(
    kernels: &Kernels,
    input: &[u8],
    plan: &ConvPlan,
    za: u8,
    w: &DepthwiseWeights,
    bias: Option<&[i32]>,
    out: Output<'_>,
) -> Result<(), KernelError> {
    let (g, pixels) = (&plan.geom, plan.pixels());
    g.check_input(input.len())?;
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
    let mut ptrs = vec![za_row.as_ptr(); DW_CHUNK.min(m) * taps];
    let mut start = 0;
    while start < m {
        let count = DW_CHUNK.min(m - start);
        let ptrs = &mut ptrs[..count * taps];
        indirection(kernels, plan, input, &za_row, start, ptrs);
        let job = DwJob {
            ptrs,
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
