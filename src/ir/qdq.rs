//! QuantizeLinear / DequantizeLinear arithmetic, exactly as ONNX defines it (round half to even,
//! saturate to the integer type), written once for constant folding and for execution.

use super::DType;

/// The representable range of an integer element type.
pub fn qrange(dt: DType) -> Option<(f32, f32)> {
    Some(match dt {
        DType::U8 => (0.0, 255.0),
        DType::I8 => (-128.0, 127.0),
        DType::U16 => (0.0, 65535.0),
        DType::I16 => (-32768.0, 32767.0),
        DType::I32 => (i32::MIN as f32, i32::MAX as f32),
        DType::U4 => (0.0, 15.0),
        DType::I4 => (-8.0, 7.0),
        _ => return None,
    })
}

/// Round half to even (ONNX QuantizeLinear's rounding), zq-quant's one definition.
pub use zq_quant::round_half_even;

/// Check the parameter lengths and resolve a negative axis.
pub fn resolve(
    shape: &[usize],
    axis: i64,
    scale_len: usize,
    zp_len: Option<usize>,
) -> Result<(usize, bool), String> {
    let r = shape.len() as i64;
    let a = if axis < 0 { axis + r } else { axis };
    let per_axis = scale_len != 1;
    if per_axis {
        if a < 0 || a >= r {
            return Err(format!("axis {axis} out of range for rank {r}"));
        }
        if shape[a as usize] != scale_len {
            return Err(format!(
                "{scale_len} scales for dimension {} of size {}",
                a, shape[a as usize]
            ));
        }
    }
    if let Some(z) = zp_len {
        if z != scale_len {
            return Err(format!("{z} zero points for {scale_len} scales"));
        }
    }
    if scale_len == 0 {
        return Err("empty scale".into());
    }
    Ok((a.max(0) as usize, per_axis))
}

/// Apply `f(value, channel)` to every element in parallel chunks.
fn map_channels(
    x: &[f32],
    shape: &[usize],
    axis: usize,
    per_axis: bool,
    f: impl Fn(f32, usize) -> f32 + Sync,
) -> Vec<f32> {
    use rayon::prelude::*;
    // Runs of `inner` consecutive elements share a channel.
    let inner: usize = if per_axis {
        shape
            .get(axis + 1..)
            .map_or(1, |s| s.iter().product::<usize>())
            .max(1)
    } else {
        1 << 14
    };
    let dim = shape.get(axis).copied().unwrap_or(1).max(1);
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(inner)
        .zip(x.par_chunks(inner))
        .enumerate()
        .for_each(|(k, (o, xs))| {
            let c = if per_axis { k % dim } else { 0 };
            for (o, &v) in o.iter_mut().zip(xs) {
                *o = f(v, c);
            }
        });
    out
}

/// `saturate(round(x / scale) + zero_point)` into `[lo, hi]`.
pub fn quantize(
    x: &[f32],
    shape: &[usize],
    axis: usize,
    per_axis: bool,
    scale: &[f32],
    zp: &[f32],
    (lo, hi): (f32, f32),
) -> Vec<f32> {
    map_channels(x, shape, axis, per_axis, |v, c| {
        (round_half_even(v / scale[c]) + zp.get(c).copied().unwrap_or(0.0)).clamp(lo, hi)
    })
}

/// `(q - zero_point) * scale`.
pub fn dequantize(
    q: &[f32],
    shape: &[usize],
    axis: usize,
    per_axis: bool,
    scale: &[f32],
    zp: &[f32],
) -> Vec<f32> {
    map_channels(q, shape, axis, per_axis, |v, c| {
        (v - zp.get(c).copied().unwrap_or(0.0)) * scale[c]
    })
}

/// 4-bit values two per byte, element 2i in the low nibble (ONNX INT4/UINT4 raw data).
pub fn pack4(v: &[i64]) -> Vec<u8> {
    v.chunks(2)
        .map(|p| {
            let lo = (p[0] as u8) & 0x0F;
            let hi = p.get(1).map_or(0, |&h| (h as u8) & 0x0F);
            lo | (hi << 4)
        })
        .collect()
}

/// Inverse of [`pack4`] for `n` values, sign-extended when `signed`.
pub fn unpack4(b: &[u8], n: usize, signed: bool) -> Vec<i64> {
    (0..n)
        .map(|i| {
            let nib = if i % 2 == 0 {
                b[i / 2] & 0x0F
            } else {
                b[i / 2] >> 4
            };
            if signed {
                i64::from(((nib << 4) as i8) >> 4)
            } else {
                i64::from(nib)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_half_to_even() {
        for (x, want) in [
            (0.5, 0.0),
            (1.5, 2.0),
            (2.5, 2.0),
            (-0.5, 0.0),
            (-1.5, -2.0),
            (-2.5, -2.0),
            (1.4, 1.0),
            (-1.6, -2.0),
            (254.5, 254.0),
            (255.5, 256.0),
            (5e6, 5e6),
            (-4194305.5, -4194306.0),
        ] {
            assert_eq!(round_half_even(x), want, "{x}");
        }
    }

    #[test]
    fn fast_rounding_matches_the_library() {
        let mut s = 0x1234_5678u32;
        for _ in 0..100_000 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let x = f32::from_bits(s) % 1e7;
            if x.is_finite() {
                assert_eq!(round_half_even(x), x.round_ties_even(), "{x}");
            }
            let h = (s % 2000) as f32 / 2.0 - 500.0; // exact halves
            assert_eq!(round_half_even(h), h.round_ties_even(), "{h}");
        }
    }

    #[test]
    fn per_axis_round_trip() {
        let shape = [2, 3];
        let x = [0.1, -0.2, 0.3, 10.0, -10.0, 0.0];
        let (axis, per) = resolve(&shape, 0, 2, Some(2)).unwrap();
        let q = quantize(
            &x,
            &shape,
            axis,
            per,
            &[0.1, 1.0],
            &[0.0, 0.0],
            (-128.0, 127.0),
        );
        assert_eq!(q, vec![1.0, -2.0, 3.0, 10.0, -10.0, 0.0]);
        let d = dequantize(&q, &shape, axis, per, &[0.1, 1.0], &[0.0, 0.0]);
        assert!((d[0] - 0.1).abs() < 1e-7 && d[3] == 10.0);
        // uint8 with a zero point saturates at both ends.
        let q = quantize(
            &[-1.0, 0.0, 100.0],
            &[3],
            0,
            false,
            &[0.1],
            &[10.0],
            (0.0, 255.0),
        );
        assert_eq!(q, vec![0.0, 10.0, 255.0]);
        assert!(resolve(&shape, 1, 2, None).is_err());
        assert!(resolve(&shape, 0, 2, Some(1)).is_err());
    }
}
