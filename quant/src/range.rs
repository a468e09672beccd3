//! Activation ranges: what calibration observed, widened by what the model itself says about a
//! value (its input box, the affine parameters of a folded BatchNormalization), turned into
//! per-tensor affine parameters.

use crate::observer::MinMax;

/// What the model says about an activation's range beyond the calibration images.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Prior {
    /// A fixed interval: the input box, or `beta +- k*|gamma|` after a folded BN (and its ReLU).
    Range(f32, f32),
    /// The residual stream (Add outputs and what follows them elementwise): distilled images
    /// match BN moments but not tails, and sums of branches reach further on real data, so the
    /// observed range is widened by this factor.
    Widen(f32),
}

impl Prior {
    /// `beta +- k * |gamma|` over every channel of a folded BatchNormalization.
    pub fn from_bn(beta: &[f32], abs_gamma: &[f32], k: f32) -> Prior {
        let lo = beta
            .iter()
            .zip(abs_gamma)
            .map(|(b, g)| b - k * g)
            .fold(f32::INFINITY, f32::min);
        let hi = beta
            .iter()
            .zip(abs_gamma)
            .map(|(b, g)| b + k * g)
            .fold(f32::NEG_INFINITY, f32::max);
        Prior::Range(lo, hi)
    }

    /// The prior of a ReLU's output given its input's.
    pub fn relu(self) -> Prior {
        match self {
            Prior::Range(a, b) => Prior::Range(a.max(0.0), b.max(0.0)),
            w => w,
        }
    }
}

/// The range to quantize: the observed one (0..0 when nothing was seen) joined with the prior.
pub fn calibrated_range(observed: &MinMax, prior: Option<Prior>) -> (f32, f32) {
    let (mut lo, mut hi) = if observed.min <= observed.max {
        (observed.min, observed.max)
    } else {
        (0.0, 0.0)
    };
    match prior {
        Some(Prior::Range(a, b)) => {
            lo = lo.min(a);
            hi = hi.max(b);
        }
        Some(Prior::Widen(f)) => {
            lo *= f;
            hi *= f;
        }
        None => {}
    }
    (lo, hi)
}

/// Per-tensor affine activation quantization.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ActQuant {
    pub scale: f32,
    pub zero_point: u8,
    /// Integer width of the quantized value (8: uint8).
    pub bits: u8,
}

impl ActQuant {
    /// uint8 parameters covering [lo, hi] and 0 (scale 1, zero point 0 for an empty range).
    pub fn uint8(lo: f32, hi: f32) -> ActQuant {
        Self::unsigned(lo, hi, 8)
    }

    /// Unsigned `bits`-bit parameters (2..=8) covering [lo, hi] and 0: levels 0..2^bits-1.
    pub fn unsigned(lo: f32, hi: f32, bits: u8) -> ActQuant {
        assert!(
            (2..=8).contains(&bits),
            "activation bits must be 2..=8, got {bits}"
        );
        let (lo, hi) = (lo.min(0.0), hi.max(0.0));
        let levels = ((1u32 << bits) - 1) as f32;
        if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
            return ActQuant {
                scale: 1.0,
                zero_point: 0,
                bits,
            };
        }
        let scale = (hi - lo) / levels;
        let zero_point = crate::numeric::round_half_even(-lo / scale).clamp(0.0, levels) as u8;
        ActQuant {
            scale,
            zero_point,
            bits,
        }
    }

    /// The largest integer level, `2^bits - 1`.
    pub fn qmax(&self) -> u8 {
        ((1u32 << self.bits) - 1) as u8
    }

    /// The represented interval `[(0 - z) s, (qmax - z) s]`.
    pub fn interval(&self) -> (f32, f32) {
        (
            -f32::from(self.zero_point) * self.scale,
            f32::from(self.qmax() - self.zero_point.min(self.qmax())) * self.scale,
        )
    }

    /// Fake quantization of one value (round half to even, saturate), as QuantizeLinear then
    /// DequantizeLinear compute it.
    pub fn fake(&self, x: f32) -> f32 {
        let q = (crate::numeric::round_half_even(x / self.scale) + f32::from(self.zero_point))
            .clamp(0.0, f32::from(self.qmax()));
        (q - f32::from(self.zero_point)) * self.scale
    }
}

/// The sub-range of [lo, hi] whose `bits`-bit quantization has the least squared error on
/// `samples`: both ends shrunk by one factor from 1 down to 0.2 (low-bit activations cannot
/// afford min/max: at 4 bits a rare tail costs every other value its resolution).
pub fn mse_range(samples: &[f32], lo: f32, hi: f32, bits: u8) -> (f32, f32) {
    if samples.is_empty() || hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
        return (lo, hi);
    }
    let err = |f: f32| -> f64 {
        let a = ActQuant::unsigned(lo * f, hi * f, bits);
        samples
            .iter()
            .map(|&x| f64::from(x - a.fake(x)).powi(2))
            .sum()
    };
    let mut best = (err(1.0), 1.0f32);
    for k in 1..=80 {
        let f = 1.0 - 0.01 * k as f32;
        let e = err(f);
        if e < best.0 {
            best = (e, f);
        }
    }
    (lo * best.1, hi * best.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priors_join_and_widen_the_observed_range() {
        let seen = MinMax {
            min: -1.0,
            max: 2.0,
        };
        assert_eq!(calibrated_range(&seen, None), (-1.0, 2.0));
        assert_eq!(
            calibrated_range(&seen, Some(Prior::Range(-0.5, 3.0))),
            (-1.0, 3.0)
        );
        assert_eq!(
            calibrated_range(&seen, Some(Prior::Widen(1.5))),
            (-1.5, 3.0)
        );
        assert_eq!(calibrated_range(&MinMax::default(), None), (0.0, 0.0));
        let bn = Prior::from_bn(&[0.0, 1.0], &[1.0, 0.5], 2.0);
        assert_eq!(bn, Prior::Range(-2.0, 2.0));
        assert_eq!(bn.relu(), Prior::Range(0.0, 2.0));
        let q = ActQuant::uint8(0.0, 0.0);
        assert_eq!((q.scale, q.zero_point), (1.0, 0));
    }

    #[test]
    fn low_bit_parameters_and_the_mse_range() {
        let a = ActQuant::unsigned(-1.0, 2.0, 4);
        assert_eq!((a.scale, a.zero_point, a.qmax()), (0.2, 5, 15));
        assert_eq!(a.interval(), (-1.0, 2.0));
        assert_eq!(a.fake(10.0), 2.0);
        assert_eq!(a.fake(-10.0), -1.0);
        assert!((a.fake(0.31) - 0.4).abs() < 1e-6);
        // A long thin tail: 10,000 values in [0, 1], one at 10. At 4 bits the best range clips it.
        let mut x: Vec<f32> = (0..10_000).map(|i| i as f32 / 10_000.0).collect();
        x.push(10.0);
        let (lo, hi) = mse_range(&x, 0.0, 10.0, 4);
        assert_eq!(lo, 0.0);
        assert!(hi < 5.0, "{hi}");
        let e = |r: (f32, f32)| -> f32 {
            let a = ActQuant::unsigned(r.0, r.1, 4);
            x.iter().map(|&v| (v - a.fake(v)).powi(2)).sum()
        };
        assert!(e((lo, hi)) < e((0.0, 10.0)));
    }
}
