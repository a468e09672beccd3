//! Biases of quantized layers: bias correction (the expected output shift weight rounding causes,
//! subtracted from the bias) and int32 bias quantization with scale `s_x * s_w`.

use crate::numeric::round_half_even;

/// How a layer's weight `[out, rest..]` maps onto its input channels, as far as the bias
/// correction needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// Convolution, weight `[out, in/groups, k..]`.
    Conv,
    /// Dense layer with the weight stored output-major (`Gemm` with `transB = 1`).
    DenseOutMajor,
    /// Anything else (MatMul, Gemm with input-major weights): no per-channel structure known.
    Other,
}

impl LayerKind {
    /// Whether axis 0 of the weight is the output axis (per-channel scales go along it).
    pub fn out_axis_first(self) -> bool {
        matches!(self, LayerKind::Conv | LayerKind::DenseOutMajor)
    }
}

/// The expected output shift a weight's quantization error causes: for each output channel, the
/// sum over its weights of (dequantized - float) x the mean of the input channel it reads.
/// `None` where the layer's structure does not match the means given.
pub fn bias_shift(
    kind: LayerKind,
    w: &[f32],
    wd: &[f32],
    shape: &[usize],
    mean: &[f32],
) -> Option<Vec<f32>> {
    let m = *shape.first()?;
    if m == 0 || w.len() != wd.len() {
        return None;
    }
    let per = w.len() / m;
    let (cg, groups, spatial) = match kind {
        LayerKind::Conv => {
            let cg = *shape.get(1)?;
            (cg, (mean.len() / cg.max(1)).max(1), per / cg.max(1))
        }
        LayerKind::DenseOutMajor => (per, 1, 1),
        LayerKind::Other => return None,
    };
    if cg * groups != mean.len() || !m.is_multiple_of(groups) {
        return None;
    }
    let mg = m / groups;
    Some(
        (0..m)
            .map(|oc| {
                let base = (oc / mg) * cg;
                (0..per)
                    .map(|j| (wd[oc * per + j] - w[oc * per + j]) * mean[base + j / spatial])
                    .sum()
            })
            .collect(),
    )
}

/// An int32 bias and its scales (one per channel, or one for the tensor).
#[derive(Debug, Clone, PartialEq)]
pub struct BiasQuant {
    pub q: Vec<i32>,
    pub scales: Vec<f32>,
}

impl BiasQuant {
    /// The float bias these integers stand for (`per_channel`: one scale per channel).
    pub fn dequantize(&self, per_channel: bool) -> Vec<f32> {
        self.q
            .iter()
            .enumerate()
            .map(|(c, &q)| q as f32 * self.scales[if per_channel { c } else { 0 }])
            .collect()
    }
}

/// Quantize `bias` to int32 with scale `x_scale * w_scales[c]` (per channel), or
/// `x_scale * w_scales[0]` for every channel. A zero scale gives 0.
pub fn quantize_bias(bias: &[f32], x_scale: f32, w_scales: &[f32], per_channel: bool) -> BiasQuant {
    let scale = |c: usize| x_scale * w_scales[if per_channel { c } else { 0 }];
    let q = bias
        .iter()
        .enumerate()
        .map(|(c, &v)| {
            let s = scale(c);
            if s > 0.0 {
                round_half_even(v / s).clamp(i32::MIN as f32, i32::MAX as f32) as i32
            } else {
                0
            }
        })
        .collect();
    let scales = if per_channel {
        (0..bias.len()).map(scale).collect()
    } else {
        vec![scale(0)]
    };
    BiasQuant { q, scales }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shift_is_the_rounding_error_times_the_input_mean() {
        // One output channel of a 1x1 conv over 2 input channels with means 1 and 2.
        let shift = bias_shift(
            LayerKind::Conv,
            &[0.5, 0.25],
            &[0.5, 0.5],
            &[1, 2, 1, 1],
            &[1.0, 2.0],
        );
        assert_eq!(shift, Some(vec![0.5]));
        assert_eq!(
            bias_shift(LayerKind::Other, &[1.0], &[1.0], &[1, 1], &[1.0]),
            None
        );
        // Means that do not fit the weight's input channels: no correction.
        assert_eq!(
            bias_shift(
                LayerKind::Conv,
                &[1.0],
                &[1.0],
                &[1, 1, 1, 1],
                &[1.0, 2.0, 3.0]
            ),
            None
        );
    }

    #[test]
    fn int32_bias_on_the_product_scale() {
        let b = quantize_bias(&[1.0, -2.0], 0.5, &[0.25, 0.5], true);
        assert_eq!(b.q, vec![8, -8]);
        assert_eq!(b.scales, vec![0.125, 0.25]);
        let t = quantize_bias(&[1.0, 3.0], 2.0, &[0.0], false);
        assert_eq!(t.q, vec![0, 0]);
        assert_eq!(t.scales, vec![0.0]);
    }
}
