//! The cost model of mixed precision: multiply-accumulates and bit-operations per image.

/// Multiply-accumulates per image of a layer: output elements per image times the weights that
/// feed each output (`params / out_channels`).
pub fn macs(out_elems_per_image: usize, params: usize, out_channels: usize) -> u64 {
    (out_elems_per_image * (params / out_channels.max(1))) as u64
}

/// Bit-operations (ZeroQ, HAWQ-V3): MACs x weight bits x activation bits.
pub fn bops(macs: u64, weight_bits: u8, act_bits: u8) -> u64 {
    macs * u64::from(weight_bits) * u64::from(act_bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_3x3_conv() {
        // 16 -> 16 channels, 3x3, 32x32 output: 16*16*9 weights, 16*32*32 outputs.
        let m = macs(16 * 32 * 32, 16 * 16 * 9, 16);
        assert_eq!(m, 16 * 32 * 32 * 16 * 9);
        assert_eq!(bops(m, 4, 8), m * 32);
    }
}
