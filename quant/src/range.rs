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
        let m = MinMax {
            min: lo.min(0.0),
            max: hi.max(0.0),
        };
        let (scale, zero_point) = m.uint8_params().unwrap_or((1.0, 0));
        ActQuant {
            scale,
            zero_point,
            bits: 8,
        }
    }
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
}
