//! The kernel table: one set of entry points per instruction set, chosen once at run time.

use std::ops::Range;
use std::str::FromStr;
use std::sync::OnceLock;

use super::conv::{self, ConvGeometry, ConvPlan};
use super::{
    prepare, scalar, ASrc, DepthwiseWeights, DwJob, GemmJob, KernelError, Output, PackedWeights,
    WeightFormat,
};

/// An instruction set the integer kernels are compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Variant {
    /// Portable Rust, the reference every other variant must match bit for bit.
    Scalar,
    /// x86-64 AVX2: `vpmaddwd` on i16-widened operands (exact; no `vpmaddubsw` saturation).
    Avx2,
    /// x86-64 AVX-512 F/BW/VL + VNNI: `vpdpbusd` on zmm registers.
    Avx512Vnni,
}

impl Variant {
    pub const ALL: [Variant; 3] = [Variant::Scalar, Variant::Avx2, Variant::Avx512Vnni];

    /// The name `ZQ_KERNELS` accepts and reports print.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Scalar => "scalar",
            Variant::Avx2 => "avx2",
            Variant::Avx512Vnni => "avx512vnni",
        }
    }

    /// Whether this CPU can run the variant.
    pub fn is_supported(self) -> bool {
        match self {
            Variant::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Variant::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            Variant::Avx512Vnni => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Variant {
    type Err = KernelError;
    fn from_str(s: &str) -> Result<Self, KernelError> {
        Variant::ALL
            .into_iter()
            .find(|v| v.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| KernelError::UnknownVariant(s.to_string()))
    }
}

type GemmFn = for<'a> unsafe fn(&GemmJob<'a>);
type DwFn = for<'a> unsafe fn(&DwJob<'a>);
type FillFn = unsafe fn(&[u32], *const u8, *const u8, &mut [*const u8]);

/// A table of kernel entry points for one [`Variant`]. Obtain one with [`Kernels::best`],
/// [`Kernels::from_env`] or [`Kernels::get`]; all are `'static` and shareable across threads.
///
/// The entries start as the scalar kernels and each is overwritten by a faster one the CPU
/// supports (tract's scheme), so a variant may reuse another's kernel for an entry it does not
/// specialise.
#[derive(Debug, Clone, Copy)]
pub struct Kernels {
    variant: Variant,
    gemm_i8: GemmFn,
    gemm_i4: GemmFn,
    dw_i8: DwFn,
    dw_i4: DwFn,
    fill: FillFn,
}

const SCALAR: Kernels = Kernels {
    variant: Variant::Scalar,
    gemm_i8: scalar::gemm,
    gemm_i4: scalar::gemm,
    dw_i8: scalar::depthwise,
    dw_i4: scalar::depthwise,
    fill: scalar::fill_ptrs,
};

static TABLES: OnceLock<Vec<Kernels>> = OnceLock::new();
static BEST: OnceLock<&'static Kernels> = OnceLock::new();
static FROM_ENV: OnceLock<Result<&'static Kernels, KernelError>> = OnceLock::new();

/// Build the table of every variant this CPU supports, lowest first.
fn build_tables() -> Vec<Kernels> {
    // Only x86-64 has variants to add (aarch64 builds the scalar table alone).
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut tables = vec![SCALAR];
    #[cfg(target_arch = "x86_64")]
    {
        let mut k = SCALAR;
        if Variant::Avx2.is_supported() {
            k.variant = Variant::Avx2;
            k.gemm_i8 = super::avx2::gemm_i8;
            k.gemm_i4 = super::avx2::gemm_i4;
            k.dw_i8 = super::avx2::depthwise_i8;
            k.dw_i4 = super::avx2::depthwise_i4;
            k.fill = super::avx2::fill_ptrs;
            tables.push(k);
        }
        if Variant::Avx512Vnni.is_supported() {
            k.variant = Variant::Avx512Vnni;
            k.gemm_i8 = super::avx512::gemm_i8;
            k.gemm_i4 = super::avx512::gemm_i4;
            k.dw_i8 = super::avx512::depthwise_i8;
            k.dw_i4 = super::avx512::depthwise_i4;
            k.fill = super::avx512::fill_ptrs;
            tables.push(k);
        }
    }
    tables
}

fn tables() -> &'static [Kernels] {
    TABLES.get_or_init(build_tables)
}

/// What `ZQ_KERNELS` asks for: unset, empty or `auto` means the best supported variant.
pub(crate) fn select(request: Option<&str>) -> Result<&'static Kernels, KernelError> {
    match request.map(str::trim) {
        None | Some("") => Ok(Kernels::best()),
        Some(s) if s.eq_ignore_ascii_case("auto") => Ok(Kernels::best()),
        Some(s) => {
            let v: Variant = s.parse()?;
            Kernels::get(v).ok_or(KernelError::Unsupported(v.name()))
        }
    }
}

impl Kernels {
    /// The fastest variant this CPU supports (probed once).
    pub fn best() -> &'static Kernels {
        BEST.get_or_init(|| tables().last().expect("the scalar table is always present"))
    }

    /// The variant `ZQ_KERNELS` names (`scalar`, `avx2`, `avx512vnni`; unset, empty or `auto`:
    /// [`best`](Self::best)), read once per process. An unknown name, or a variant this CPU
    /// cannot run, is an error.
    pub fn from_env() -> Result<&'static Kernels, KernelError> {
        FROM_ENV
            .get_or_init(|| {
                let var = std::env::var("ZQ_KERNELS").ok();
                select(var.as_deref())
            })
            .clone()
    }

    /// The table for `v`, if this CPU supports it.
    pub fn get(v: Variant) -> Option<&'static Kernels> {
        tables().iter().find(|k| k.variant == v)
    }

    /// Every variant this CPU supports, scalar first.
    pub fn available() -> impl Iterator<Item = &'static Kernels> {
        tables().iter()
    }

    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// The variant's name, for reports.
    pub fn name(&self) -> &'static str {
        self.variant.name()
    }

    /// `out[i][j] = epilogue(bias[j] + sum_p (a[i * lda + p] - za) * w[j][p])` for `i < m`,
    /// `j < w.n()`, `p < w.k()`.
    ///
    /// `a` is u8 activations, row `i` at `a[i * lda ..][.. w.k()]` (an NHWC image is `m` pixels
    /// with `lda` = its channel count; any stride works, rows may even overlap). `bias` has
    /// `w.n()` entries (`None`: zero). See [`Output`] for where results go and the
    /// [module docs](super) for the exact arithmetic.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        a: &[u8],
        m: usize,
        lda: usize,
        za: u8,
        w: &PackedWeights,
        bias: Option<&[i32]>,
        out: Output<'_>,
    ) -> Result<(), KernelError> {
        let need = if m == 0 || w.k() == 0 {
            0
        } else {
            (m - 1)
                .checked_mul(lda)
                .and_then(|x| x.checked_add(w.k()))
                .ok_or_else(|| KernelError::Shape("activation stride overflows".into()))?
        };
        if a.len() < need {
            return Err(KernelError::Length {
                what: "activations",
                need,
                got: a.len(),
            });
        }
        let ep = prepare(out, m, w.n(), bias, w.colsum_padded(), za)?;
        if m == 0 || w.n() == 0 {
            return Ok(());
        }
        let job = GemmJob {
            src: ASrc::Dense {
                a: a.as_ptr(),
                // With nothing to read, no row pointer may move past the (maybe empty) slice.
                lda: if w.k() == 0 { 0 } else { lda },
            },
            m,
            k: w.k(),
            za,
            w,
            bias: &ep.bias,
            corr: &ep.corr,
            scale: &ep.scale,
            out: ep.out,
        };
        // SAFETY: `a` holds `(m - 1) * lda + k` bytes (checked above), `prepare` checked the
        // output for `m x n` and padded the per-column vectors to whole blocks, `k == w.k()`, and
        // this table only holds variants the CPU supports.
        unsafe { self.run_gemm(&job) };
        Ok(())
    }

    /// A 2-D convolution, `group == 1`, NHWC, for output pixels `pixels` (row-major index
    /// `oy * out_w + ox`; `0..geom.out_pixels()` for the whole image).
    ///
    /// `input` is one image, pixel `(y, x)` at `input[(y * in_w + x) * geom.pixel_stride ..]`,
    /// `geom.channels` bytes. `w` must come from [`PackedWeights::pack_conv_i8`] / `_i4` (or any
    /// packing with `k = kh * kw * channels` in `(ky, kx, c)` order). Padded positions read as
    /// `za`, so they contribute 0. Output pixel `pixels.start + i`, channel `j` goes to row `i`
    /// of `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn conv(
        &self,
        input: &[u8],
        geom: &ConvGeometry,
        za: u8,
        w: &PackedWeights,
        bias: Option<&[i32]>,
        out: Output<'_>,
        pixels: Range<usize>,
    ) -> Result<(), KernelError> {
        conv::conv(self, input, &ConvPlan::new(geom, pixels)?, za, w, bias, out)
    }

    /// [`conv`](Self::conv) over the geometry and pixel range of `plan`, whose indirection is
    /// computed once instead of on every call.
    pub fn conv_planned(
        &self,
        input: &[u8],
        plan: &ConvPlan,
        za: u8,
        w: &PackedWeights,
        bias: Option<&[i32]>,
        out: Output<'_>,
    ) -> Result<(), KernelError> {
        conv::conv(self, input, plan, za, w, bias, out)
    }

    /// A depthwise convolution (`group == channels`, one output channel per input channel), NHWC,
    /// for output pixels `pixels` (as in [`conv`](Self::conv)); `geom.channels` and the kernel
    /// size must match `w`. Output pixel `pixels.start + i`, channel `c` goes to row `i` of `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn depthwise(
        &self,
        input: &[u8],
        geom: &ConvGeometry,
        za: u8,
        w: &DepthwiseWeights,
        bias: Option<&[i32]>,
        out: Output<'_>,
        pixels: Range<usize>,
    ) -> Result<(), KernelError> {
        conv::depthwise(self, input, &ConvPlan::new(geom, pixels)?, za, w, bias, out)
    }

    /// [`depthwise`](Self::depthwise) over the geometry and pixel range of `plan`.
    pub fn depthwise_planned(
        &self,
        input: &[u8],
        plan: &ConvPlan,
        za: u8,
        w: &DepthwiseWeights,
        bias: Option<&[i32]>,
        out: Output<'_>,
    ) -> Result<(), KernelError> {
        conv::depthwise(self, input, plan, za, w, bias, out)
    }

    /// # Safety
    /// `job` satisfies the [`GemmJob`] invariants.
    pub(crate) unsafe fn run_gemm(&self, job: &GemmJob<'_>) {
        let f = match job.w.format() {
            WeightFormat::I8 => self.gemm_i8,
            WeightFormat::I4 => self.gemm_i4,
        };
        // SAFETY: forwarded from the caller; the table only holds entries the CPU supports.
        unsafe { f(job) }
    }

    /// `out[i] = za` where `offs[i]` is a padding tap, else `base + offs[i]` (see
    /// [`conv::fill_ptrs`]), vectorised for this variant.
    pub(crate) fn fill_ptrs(
        &self,
        offs: &[u32],
        base: *const u8,
        za: *const u8,
        out: &mut [*const u8],
    ) {
        // SAFETY: the entry only forms pointers (no access through them), and this table only
        // holds variants the CPU supports.
        unsafe { (self.fill)(offs, base, za, out) }
    }

    /// # Safety
    /// `job` satisfies the [`DwJob`] invariants.
    pub(crate) unsafe fn run_depthwise(&self, job: &DwJob<'_>) {
        let f = match job.w.format() {
            WeightFormat::I8 => self.dw_i8,
            WeightFormat::I4 => self.dw_i4,
        };
        // SAFETY: forwarded from the caller; the table only holds entries the CPU supports.
        unsafe { f(job) }
    }
}
