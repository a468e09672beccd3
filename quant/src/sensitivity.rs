//! ZeroQ sensitivity: KL(FP32 output || output with one layer quantized), on distilled data.

use crate::QuantModel;

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

/// Index of the largest entry (the first on ties).
pub fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |m, (j, &v)| if v > m.1 { (j, v) } else { m },
        )
        .0
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

/// Omega_i(k) for every layer i and bit width k: a `[layers][bits]` table.
pub fn sensitivities<M: QuantModel>(
    model: &mut M,
    bits: &[u8],
    classes: usize,
) -> Result<Vec<Vec<f64>>, M::Error> {
    let n = model.layers().len();
    let reference = model.outputs(&vec![None; n])?;
    let mut table = Vec::with_capacity(n);
    for i in 0..n {
        let mut row = Vec::with_capacity(bits.len());
        for &b in bits {
            let mut assign = vec![None; n];
            assign[i] = Some(b);
            row.push(kl_divergence(&reference, &model.outputs(&assign)?, classes));
        }
        table.push(row);
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{quantize_weights, ClipSearch, LayerInfo};

    /// Two "layers" scaling a fixed input: a toy model to check the plumbing and the ordering.
    struct Toy {
        layers: Vec<LayerInfo>,
        w: Vec<Vec<f32>>,
    }

    impl QuantModel for Toy {
        type Error = std::convert::Infallible;
        fn layers(&self) -> &[LayerInfo] {
            &self.layers
        }
        fn outputs(&mut self, bits: &[Option<u8>]) -> Result<Vec<f32>, Self::Error> {
            let ws: Vec<Vec<f32>> = self
                .w
                .iter()
                .zip(bits)
                .map(|(w, b)| match b {
                    Some(b) => quantize_weights(w, 1, *b, ClipSearch::MinMax).dequantize(),
                    None => w.clone(),
                })
                .collect();
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
        let info = |n: &str| LayerInfo {
            name: n.into(),
            params: 8,
            channels: 1,
        };
        let mut toy = Toy {
            layers: vec![info("a"), info("b")],
            w: vec![w0, w1],
        };
        let t = sensitivities(&mut toy, &[2, 4, 8], 4).unwrap();
        for row in &t {
            assert!(
                row[0] >= row[1] && row[1] >= row[2] && row[2] >= 0.0,
                "{row:?}"
            );
        }
        // Layer a is scaled by 3 in the output, so it is the more sensitive one.
        assert!(t[0][0] > t[1][0]);
        assert_eq!(kl_divergence(&[1.0, 2.0], &[1.0, 2.0], 2), 0.0);
    }
}
