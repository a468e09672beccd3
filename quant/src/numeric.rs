//! The numeric helpers every stage shares: ONNX's rounding, float16 rounding, argmax. One
//! definition each, so the quantizers, the QDQ arithmetic and the reports cannot drift apart.

/// Round half to even (ONNX QuantizeLinear's rounding; `f32::round` rounds half away from zero).
#[inline]
pub fn round_half_even(x: f32) -> f32 {
    if x.abs() < SMALL {
        round_half_even_small(x)
    } else {
        x.round_ties_even()
    }
}

/// Below this magnitude [`round_half_even_small`] is exact.
pub const SMALL: f32 = 4_194_304.0;

/// [`round_half_even`] for `|x| < 2^22` ([`SMALL`]), branch-free so that loops over it
/// vectorize: adding and removing 1.5 * 2^23 rounds to nearest, ties to even, in the default
/// rounding mode (`round_ties_even` is a libm call on baseline x86-64).
#[inline]
pub fn round_half_even_small(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
}

/// `x` rounded to the nearest float16 value (what float16 storage keeps of it).
#[inline]
pub fn f16_round(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// Index of the largest entry of a row (the first on ties; NaN never wins).
pub fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |m, (j, &v)| if v > m.1 { (j, v) } else { m },
        )
        .0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_matches_the_library_ties_to_even() {
        for i in -4000..4000 {
            let x = i as f32 * 0.25;
            assert_eq!(round_half_even(x), x.round_ties_even(), "{x}");
        }
        for x in [
            4_194_303.5f32,
            4_194_304.5,
            1e9,
            -1e9,
            0.5,
            1.5,
            2.5,
            -0.5,
            -2.5,
        ] {
            assert_eq!(round_half_even(x), x.round_ties_even(), "{x}");
        }
    }

    #[test]
    fn argmax_takes_the_first_of_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5]), 1);
        assert_eq!(f16_round(1.0 + 1e-4), 1.0);
    }
}
