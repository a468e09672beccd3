//! Calibration observers: running statistics of an activation tensor over calibration batches.

/// Tracks the minimum and maximum seen.
#[derive(Debug, Clone, PartialEq)]
pub struct MinMax {
    pub min: f32,
    pub max: f32,
}

impl Default for MinMax {
    fn default() -> Self {
        MinMax {
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
        }
    }
}

impl MinMax {
    pub fn update(&mut self, x: &[f32]) {
        for &v in x {
            if v.is_finite() {
                self.min = self.min.min(v);
                self.max = self.max.max(v);
            }
        }
    }

    /// uint8 affine parameters (scale, zero point) covering [min, max] and always 0.
    pub fn uint8_params(&self) -> Option<(f32, u8)> {
        if self.min > self.max {
            return None;
        }
        let (lo, hi) = (self.min.min(0.0), self.max.max(0.0));
        if hi == lo {
            return Some((1.0, 0));
        }
        let scale = (hi - lo) / 255.0;
        let zp = crate::numeric::round_half_even(-lo / scale).clamp(0.0, 255.0) as u8;
        Some((scale, zp))
    }
}

/// Per-channel means of an `[N, C, inner..]` activation over calibration batches (for bias
/// correction), accumulated in f64.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChannelMeans {
    sums: Vec<f64>,
    count: usize,
}

impl ChannelMeans {
    /// Add a batch laid out `[N, channels, inner]` (`inner`: the product of the trailing dims).
    pub fn update(&mut self, x: &[f32], channels: usize, inner: usize) {
        if channels == 0 {
            return;
        }
        if self.sums.len() != channels {
            self.sums = vec![0.0; channels];
        }
        for (k, run) in x.chunks(inner.max(1)).enumerate() {
            self.sums[k % channels] += run.iter().map(|&v| f64::from(v)).sum::<f64>();
        }
        self.count += x.len() / channels;
    }

    pub fn means(&self) -> Vec<f32> {
        self.sums
            .iter()
            .map(|s| (s / self.count.max(1) as f64) as f32)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_means_over_batches() {
        let mut m = ChannelMeans::default();
        // [1, 2, 2]: channel 0 = 1, 3; channel 1 = 10, 20.
        m.update(&[1.0, 3.0, 10.0, 20.0], 2, 2);
        m.update(&[2.0, 2.0, 0.0, 0.0], 2, 2);
        assert_eq!(m.means(), vec![2.0, 7.5]);
    }

    #[test]
    fn minmax() {
        let mut o = MinMax::default();
        assert_eq!(o.uint8_params(), None);
        o.update(&[0.5, 2.0, f32::NAN]);
        o.update(&[-1.0]);
        assert_eq!((o.min, o.max), (-1.0, 2.0));
        let (s, zp) = o.uint8_params().unwrap();
        assert!((s - 3.0 / 255.0).abs() < 1e-7);
        assert_eq!(zp, 85);
    }
}
