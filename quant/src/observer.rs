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
        let zp = (-lo / scale).round_ties_even().clamp(0.0, 255.0) as u8;
        Some((scale, zp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
