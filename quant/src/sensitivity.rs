//! ZeroQ sensitivity: KL(FP32 output || output with one layer quantized), on distilled data.

use crate::numeric::{argmax, f16_round};
use crate::weights::{quantize_weights, ClipSearch, Grid};

fn softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let e: Vec<f64> = row.iter().map(|&x| f64::from(x - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

/// A row of model output as a probability distribution: used as it is when it already is one
/// (non-negative, summing to 1: a Softmax output), otherwise the softmax of the logits.
pub fn distribution(row: &[f32]) -> Vec<f64> {
    let s: f32 = row.iter().sum();
    if row.iter().all(|&v| v >= 0.0) && (s - 1.0).abs() < 1e-3 {
        row.iter().map(|&v| f64::from(v)).collect()
    } else {
        softmax(row)
    }
}

/// Mean over rows of KL(p || q) for `[N, k]` outputs (logits or probabilities).
pub fn kl_divergence(p: &[f32], q: &[f32], k: usize) -> f64 {
    assert!(k > 0 && p.len() == q.len() && p.len().is_multiple_of(k));
    let rows = p.len() / k;
    let mut total = 0.0;
    for (a, b) in p.chunks(k).zip(q.chunks(k)) {
        let (pa, pb) = (distribution(a), distribution(b));
        total += pa
            .iter()
            .zip(&pb)
            .map(|(x, y)| {
                if *x > 0.0 {
                    x * (x / y.max(1e-300)).ln()
                } else {
                    0.0
                }
            })
            .sum::<f64>();
    }
    total / rows as f64
}

/// Fraction of rows of two `[N, k]` outputs whose argmax agrees.
pub fn agreement(p: &[f32], q: &[f32], k: usize) -> f64 {
    assert!(k > 0 && p.len() == q.len() && p.len().is_multiple_of(k));
    let rows = p.len() / k;
    let same = p
        .chunks(k)
        .zip(q.chunks(k))
        .filter(|(a, b)| argmax(a) == argmax(b))
        .count();
    same as f64 / rows.max(1) as f64
}

/// A model whose output on the calibration images can be recomputed with one layer's weights
/// replaced (the executor starts at that layer from cached FP32 activations).
pub trait Perturb {
    type Error;
    /// Flattened `[N, K]` outputs with layer `layer`'s weights set to `weights`.
    fn with_weights(&mut self, layer: usize, weights: Vec<f32>) -> Result<Vec<f32>, Self::Error>;
}

/// A candidate layer's float weights, `channels` rows (one scale each).
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub weight: &'a [f32],
    pub channels: usize,
}

/// How candidate weights are quantized: the scale search, and the grid of 2..=4-bit weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheme {
    pub clip: ClipSearch,
    pub int4: Grid,
}

/// The weights as stored at `bits`: 16 is float16, 2..=8 the integer grid, dequantized.
pub fn stored_weights(c: &Candidate, bits: u8, s: Scheme) -> Vec<f32> {
    if bits == 16 {
        c.weight.iter().map(|&v| f16_round(v)).collect()
    } else {
        let grid = crate::plan::grid_for(bits, s.int4);
        quantize_weights(c.weight, c.channels, bits, s.clip, grid).dequantize()
    }
}

/// ZeroQ's Omega_i(k) for every candidate layer i and width k: KL of the output against
/// `reference` (`[N, classes]`) when only that layer's weights are quantized to k bits.
/// `progress(done, total)` is called before each measurement.
pub fn sensitivity_table<M: Perturb>(
    model: &mut M,
    reference: &[f32],
    classes: usize,
    layers: &[Candidate],
    bits: &[u8],
    scheme: Scheme,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Vec<(u8, f64)>>, M::Error> {
    let total = layers.len() * bits.len();
    let mut table = Vec::with_capacity(layers.len());
    for (i, c) in layers.iter().enumerate() {
        let mut row = Vec::with_capacity(bits.len());
        for (k, &b) in bits.iter().enumerate() {
            progress(i * bits.len() + k + 1, total);
            let out = model.with_weights(i, stored_weights(c, b, scheme))?;
            row.push((b, kl_divergence(reference, &out, classes)));
        }
        table.push(row);
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two "layers" scaling a fixed input: a toy model to check the plumbing and the ordering.
    struct Toy {
        w: Vec<Vec<f32>>,
    }

    impl Perturb for Toy {
        type Error = std::convert::Infallible;
        fn with_weights(
            &mut self,
            layer: usize,
            weights: Vec<f32>,
        ) -> Result<Vec<f32>, Self::Error> {
            let mut ws = self.w.clone();
            ws[layer] = weights;
            Ok(ws[0].iter().zip(&ws[1]).map(|(a, b)| a * 3.0 + b).collect())
        }
    }

    #[test]
    fn probabilities_are_taken_as_they_are() {
        // A Softmax output row is already a distribution; logits go through softmax.
        assert_eq!(distribution(&[0.25, 0.75]), vec![0.25, 0.75]);
        let d = distribution(&[0.0, 2f32.ln()]);
        assert!((d[0] - 1.0 / 3.0).abs() < 1e-9 && (d[1] - 2.0 / 3.0).abs() < 1e-9);
        // KL of two distributions is computed on them directly.
        let kl = kl_divergence(&[0.5, 0.5], &[0.25, 0.75], 2);
        let want = 0.5 * (0.5f64 / 0.25).ln() + 0.5 * (0.5f64 / 0.75).ln();
        assert!((kl - want).abs() < 1e-9, "{kl} vs {want}");
        assert_eq!(
            agreement(&[1.0, 2.0, 3.0, 0.0], &[0.0, 5.0, 1.0, 2.0], 2),
            0.5
        );
    }

    #[test]
    fn fewer_bits_hurt_more() {
        let w0: Vec<f32> = (0..8).map(|i| (i as f32 * 0.37).sin()).collect();
        let w1: Vec<f32> = (0..8).map(|i| (i as f32 * 0.91).cos() * 0.1).collect();
        let mut toy = Toy {
            w: vec![w0.clone(), w1.clone()],
        };
        let reference = toy.with_weights(0, w0.clone()).unwrap();
        let layers = [
            Candidate {
                weight: &w0,
                channels: 1,
            },
            Candidate {
                weight: &w1,
                channels: 1,
            },
        ];
        let mut calls = 0;
        let t = sensitivity_table(
            &mut toy,
            &reference,
            4,
            &layers,
            &[2, 4, 8],
            Scheme {
                clip: ClipSearch::MinMax,
                int4: Grid::Affine,
            },
            &mut |_, _| calls += 1,
        )
        .unwrap();
        assert_eq!(calls, 6);
        for row in &t {
            // Strictly: a table that comes out flat (all zero, say) must fail.
            assert!(
                row[0].1 > row[1].1 && row[1].1 > row[2].1 && row[2].1 > 0.0,
                "{row:?}"
            );
        }
        // Layer a is scaled by 3 in the output, so it is the more sensitive one.
        assert!(t[0][0].1 > t[1][0].1);
        assert_eq!(kl_divergence(&[1.0, 2.0], &[1.0, 2.0], 2), 0.0);
    }
}
