//! Integer grids and weight quantizers.

use crate::numeric::round_half_even;

/// The integer range of a signed `bits`-bit grid, symmetric (e.g. 8 bits: -127..=127, so that
/// zero maps to zero and the grid is sign-symmetric, as ONNX Runtime's int8 weights expect).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QRange {
    pub min: i32,
    pub max: i32,
}

impl QRange {
    /// The full signed range `-2^(bits-1) ..= 2^(bits-1) - 1` (int4: -8..=7), the grid of
    /// affine weights with a zero point.
    pub fn signed_full(bits: u8) -> QRange {
        assert!(
            (2..=8).contains(&bits),
            "weight bits must be 2..=8, got {bits}"
        );
        QRange {
            min: -(1i32 << (bits - 1)),
            max: (1i32 << (bits - 1)) - 1,
        }
    }

    pub fn signed_symmetric(bits: u8) -> QRange {
        assert!(
            (2..=8).contains(&bits),
            "weight bits must be 2..=8, got {bits}"
        );
        let m = (1i32 << (bits - 1)) - 1;
        QRange { min: -m, max: m }
    }
}

/// How a weight scale is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipSearch {
    /// scale = max|w| / qmax.
    MinMax,
    /// Try clipping max|w| by factors in (0.5, 1] and keep the one with the least squared error.
    Mse,
}

/// The integer grid of a weight's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grid {
    /// Zero point 0, levels `-(2^(b-1) - 1) ..= 2^(b-1) - 1` (what integer kernels expect).
    Symmetric,
    /// Every row its own zero point on the full signed range (2^b levels, e.g. 16 at 4 bits):
    /// a row whose values lean to one side spends no levels on the other (Genie-M's weights).
    Affine,
}

impl Grid {
    /// The integer range of a `bits`-bit weight on this grid.
    pub fn range(self, bits: u8) -> QRange {
        match self {
            Grid::Symmetric => QRange::signed_symmetric(bits),
            Grid::Affine => QRange::signed_full(bits),
        }
    }
}

/// Per-output-channel quantization of a weight laid out `[channels, rest...]`: the value of
/// `q` in row `c` is `(q - zero_points[c]) * scales[c]`.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightQuant {
    pub bits: u8,
    pub q: Vec<i8>,
    pub scales: Vec<f32>,
    /// One per row, or empty: all zero (a symmetric grid).
    pub zero_points: Vec<i8>,
}

impl WeightQuant {
    /// The zero point of row `c`.
    pub fn zero_point(&self, c: usize) -> i8 {
        self.zero_points.get(c).copied().unwrap_or(0)
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let per = self.q.len() / self.scales.len();
        self.q
            .iter()
            .enumerate()
            .map(|(i, &q)| {
                let c = i / per;
                (f32::from(q) - f32::from(self.zero_point(c))) * self.scales[c]
            })
            .collect()
    }
}

fn quantize_row(row: &[f32], scale: f32, zp: f32, r: QRange, out: &mut Vec<i8>) {
    for &w in row {
        let q = if scale > 0.0 {
            round_half_even(w / scale) + zp
        } else {
            zp
        };
        out.push(q.clamp(r.min as f32, r.max as f32) as i8);
    }
}

fn row_error(row: &[f32], scale: f32, zp: f32, r: QRange) -> f64 {
    row.iter()
        .map(|&w| {
            let q = (round_half_even(w / scale) + zp).clamp(r.min as f32, r.max as f32);
            let d = f64::from(w - (q - zp) * scale);
            d * d
        })
        .sum()
}

/// Step and zero point of an affine row covering `[lo, hi]` (which holds 0) on `r`.
fn affine_params(lo: f32, hi: f32, r: QRange) -> (f32, f32) {
    let scale = (hi - lo) / (r.max - r.min) as f32;
    if scale <= 0.0 {
        return (0.0, 0.0);
    }
    let zp = (r.min as f32 - round_half_even(lo / scale)).clamp(r.min as f32, r.max as f32);
    (scale, zp)
}

/// Quantize `w` (`channels` rows) to `bits` with one scale (and, on the affine grid, one zero
/// point) per row.
pub fn quantize_weights(
    w: &[f32],
    channels: usize,
    bits: u8,
    search: ClipSearch,
    grid: Grid,
) -> WeightQuant {
    assert!(
        channels > 0 && w.len().is_multiple_of(channels),
        "weight of {} values is not {channels} rows",
        w.len()
    );
    let r = grid.range(bits);
    let per = w.len() / channels;
    let mut q = Vec::with_capacity(w.len());
    let mut scales = Vec::with_capacity(channels);
    let mut zero_points = Vec::new();
    for row in w.chunks(per) {
        // The row's parameters when its range (with 0 in it) is shrunk by `f` (1: no clipping).
        let lo = row.iter().fold(0f32, |m, &x| m.min(x));
        let hi = row.iter().fold(0f32, |m, &x| m.max(x));
        let params = |f: f32| -> (f32, f32) {
            match grid {
                Grid::Symmetric => ((-lo).max(hi) * f / r.max as f32, 0.0),
                Grid::Affine => affine_params(lo * f, hi * f, r),
            }
        };
        let base = params(1.0);
        let (scale, zp) = match search {
            _ if base.0 == 0.0 => (0.0, 0.0),
            ClipSearch::MinMax => base,
            ClipSearch::Mse => {
                (0..=50)
                    .map(|k| params(1.0 - 0.01 * k as f32))
                    .map(|(s, z)| (row_error(row, s, z, r), (s, z)))
                    .fold(
                        (f64::INFINITY, base),
                        |best, c| {
                            if c.0 < best.0 {
                                c
                            } else {
                                best
                            }
                        },
                    )
                    .1
            }
        };
        quantize_row(row, scale, zp, r, &mut q);
        scales.push(scale);
        if grid == Grid::Affine {
            zero_points.push(zp as i8);
        }
    }
    // An all-zero row (a dead channel) quantizes to zeros at any step, but a zero step would
    // zero its bias too (stored on the step s_x * s_w): give it the tensor's largest step.
    let fill = scales.iter().copied().fold(0f32, f32::max);
    let fill = if fill > 0.0 { fill } else { 1.0 };
    for s in &mut scales {
        if *s == 0.0 {
            *s = fill;
        }
    }
    WeightQuant {
        bits,
        q,
        scales,
        zero_points,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges() {
        assert_eq!(
            QRange::signed_symmetric(8),
            QRange {
                min: -127,
                max: 127
            }
        );
        assert_eq!(QRange::signed_symmetric(4), QRange { min: -7, max: 7 });
        assert_eq!(QRange::signed_symmetric(2), QRange { min: -1, max: 1 });
    }

    #[test]
    fn exact_grid_values_survive() {
        // Rows on the 2-bit grid {-1, 0, 1} x amax (row 2 uses a different amax).
        let w = [-1.0, 0.0, 1.0, 1.0, 2.0, -2.0, 0.0, 2.0];
        let q = quantize_weights(&w, 2, 2, ClipSearch::MinMax, Grid::Symmetric);
        assert_eq!(q.scales, vec![1.0, 2.0]);
        let back = q.dequantize();
        for (a, b) in w.iter().zip(&back) {
            assert!((a - b).abs() < 1e-6, "{w:?} -> {back:?}");
        }
    }

    #[test]
    fn a_dead_channel_keeps_a_step_for_its_bias() {
        // Channel 1 has no weights left (pruned, or dead after training); its bias must survive.
        let w = [0.5, -0.25, 0.0, 0.0, 0.0, 0.0];
        for bits in [8, 4] {
            for grid in [Grid::Symmetric, Grid::Affine] {
                let q = quantize_weights(&w, 3, bits, ClipSearch::MinMax, grid);
                assert!(q.scales.iter().all(|&s| s > 0.0), "{:?}", q.scales);
                assert_eq!(&q.dequantize()[2..], &[0.0; 4]);
                let b = crate::bias::quantize_bias(&[0.1, 0.7, -0.3], 0.05, &q.scales, true);
                for (got, want) in b.dequantize(true).iter().zip([0.1, 0.7, -0.3]) {
                    assert!((got - want).abs() < 1e-3, "{got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn an_affine_row_spends_its_levels_on_the_side_it_has() {
        // A row in [-0.1, 1.5]: symmetric 4-bit steps are 1.5/7, affine ones 1.6/15.
        let w: Vec<f32> = (0..=16).map(|i| -0.1 + 0.1 * i as f32).collect();
        let s = quantize_weights(&w, 1, 4, ClipSearch::MinMax, Grid::Symmetric);
        let a = quantize_weights(&w, 1, 4, ClipSearch::MinMax, Grid::Affine);
        assert!(s.zero_points.is_empty());
        assert!((a.scales[0] - 1.6 / 15.0).abs() < 1e-6, "{:?}", a.scales);
        assert_eq!(a.zero_points.len(), 1);
        assert!(a.q.iter().all(|&q| (-8..=7).contains(&q)));
        let err = |q: &WeightQuant| -> f32 {
            q.dequantize()
                .iter()
                .zip(&w)
                .map(|(a, b)| (a - b).powi(2))
                .sum()
        };
        assert!(err(&a) < 0.3 * err(&s), "{} vs {}", err(&a), err(&s));
        // Zero stays exact (padding and dead inputs dequantize to 0).
        let z = quantize_weights(&[0.0, 0.3, 0.9], 1, 4, ClipSearch::MinMax, Grid::Affine);
        assert_eq!(z.dequantize()[0], 0.0);
    }

    proptest! {
        #[test]
        fn error_bounds(
            w in proptest::collection::vec(-10f32..10.0, 8..64),
            bits in 2u8..=8,
            affine in any::<bool>(),
        ) {
            let grid = if affine { Grid::Affine } else { Grid::Symmetric };
            let channels = if w.len().is_multiple_of(2) { 2 } else { 1 };
            let mm = quantize_weights(&w, channels, bits, ClipSearch::MinMax, grid);
            let mse = quantize_weights(&w, channels, bits, ClipSearch::Mse, grid);
            let per = w.len() / channels;
            let err = |q: &WeightQuant| -> f64 {
                q.dequantize().iter().zip(&w).map(|(a, b)| f64::from(a - b).powi(2)).sum()
            };
            // Min/max never clips: every error is within half a step.
            for (i, (a, b)) in mm.dequantize().iter().zip(&w).enumerate() {
                prop_assert!((a - b).abs() <= mm.scales[i / per] / 2.0 + 1e-5);
            }
            // The MSE search includes the min/max scale, so it is never worse.
            prop_assert!(err(&mse) <= err(&mm) + 1e-9);
        }
    }
}
