//! Moment arithmetic shared by the engines that compute activation statistics (the distillation
//! tape in zq, the reference moments in zq-synth), so both round the same way.

/// The sum of squared deviations about the exact mean `m`, from `sq`, the sum taken about its
/// f32 rounding (where f32 loops centre): `sum (x - m)^2 = sum (x - mf)^2 - n (m - mf)^2`.
#[inline(always)]
pub fn m2_about_mean(m: f64, sq: f64, n: usize) -> f64 {
    let shift = m - f64::from(m as f32);
    (sq - n as f64 * shift * shift).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centres_on_the_exact_mean() {
        // Values 0.1 and 0.3: exact mean 0.2; about the f32 mean the sum differs by n * shift^2.
        let m = (0.1f64 + 0.3) / 2.0;
        let mf = f64::from(m as f32);
        let sq = (0.1 - mf).powi(2) + (0.3 - mf).powi(2);
        assert!((m2_about_mean(m, sq, 2) - 0.02).abs() < 1e-15);
        assert_eq!(m2_about_mean(0.0, 0.0, 3), 0.0);
    }
}
