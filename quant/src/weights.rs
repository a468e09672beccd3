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

/// Per-output-channel symmetric quantization of a weight laid out `[channels, rest...]`.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightQuant {
    pub bits: u8,
    pub q: Vec<i8>,
    pub scales: Vec<f32>,
}

impl WeightQuant {
    pub fn dequantize(&self) -> Vec<f32> {
        let per = self.q.len() / self.scales.len();
        self.q
            .iter()
            .enumerate()
            .map(|(i, &q)| f32::from(q) * self.scales[i / per])
            .collect()
    }
}

fn quantize_row(row: &[f32], scale: f32, r: QRange, out: &mut Vec<i8>) {
    for &w in row {
        let q = if scale > 0.0 {
            round_half_even(w / scale)
        } else {
            0.0
        };
        out.push(q.clamp(r.min as f32, r.max as f32) as i8);
    }
}

fn row_error(row: &[f32], scale: f32, r: QRange) -> f64 {
    row.iter()
        .map(|&w| {
            let q = round_half_even(w / scale).clamp(r.min as f32, r.max as f32);
            let d = f64::from(w - q * scale);
            d * d
        })
        .sum()
}

/// Quantize `w` (`channels` rows) to `bits` with one scale per row.
pub fn quantize_weights(w: &[f32], channels: usize, bits: u8, search: ClipSearch) -> WeightQuant {
    assert!(
        channels > 0 && w.len().is_multiple_of(channels),
        "weight of {} values is not {channels} rows",
        w.len()
    );
    let r = QRange::signed_symmetric(bits);
    let per = w.len() / channels;
    let mut q = Vec::with_capacity(w.len());
    let mut scales = Vec::with_capacity(channels);
    for row in w.chunks(per) {
        let amax = row.iter().fold(0f32, |m, &x| m.max(x.abs()));
        let base = amax / r.max as f32;
        let scale = match search {
            _ if amax == 0.0 => 0.0,
            ClipSearch::MinMax => base,
            ClipSearch::Mse => {
                (0..=50)
                    .map(|k| base * (1.0 - 0.01 * k as f32))
                    .map(|s| (row_error(row, s, r), s))
                    .fold(
                        (f64::INFINITY, base),
                        |best, c| if c.0 < best.0 { c } else { best },
                    )
                    .1
            }
        };
        quantize_row(row, scale, r, &mut q);
        scales.push(scale);
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
    WeightQuant { bits, q, scales }
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
        let q = quantize_weights(&w, 2, 2, ClipSearch::MinMax);
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
            let q = quantize_weights(&w, 3, bits, ClipSearch::MinMax);
            assert!(q.scales.iter().all(|&s| s > 0.0), "{:?}", q.scales);
            assert_eq!(&q.dequantize()[2..], &[0.0; 4]);
            let b = crate::bias::quantize_bias(&[0.1, 0.7, -0.3], 0.05, &q.scales, true);
            for (got, want) in b.dequantize(true).iter().zip([0.1, 0.7, -0.3]) {
                assert!((got - want).abs() < 1e-3, "{got} vs {want}");
            }
        }
    }

    proptest! {
        #[test]
        fn error_bounds(w in proptest::collection::vec(-10f32..10.0, 8..64), bits in 2u8..=8) {
            let channels = if w.len().is_multiple_of(2) { 2 } else { 1 };
            let mm = quantize_weights(&w, channels, bits, ClipSearch::MinMax);
            let mse = quantize_weights(&w, channels, bits, ClipSearch::Mse);
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
