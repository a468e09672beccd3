//! SplitMix64: the one seeded stream zq's algorithms draw from (distillation's initial pixels and
//! swing offsets, reconstruction's batches and QDrop masks), identical on every machine.

/// SplitMix64's finaliser: a well-mixed hash of one word.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The golden-ratio increment of SplitMix64's state.
pub const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// A SplitMix64 stream.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN);
        mix(self.0)
    }

    /// Uniform in (0, 1), never 0 or 1.
    pub fn next_unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n > 0`), from the unit interval.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_unit() * n as f64) as usize % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_published_splitmix64_stream() {
        // The reference implementation's first outputs for seed 1234567.
        let mut r = SplitMix64::new(1234567);
        assert_eq!(r.next_u64(), 6457827717110365317);
        assert_eq!(r.next_u64(), 3203168211198807973);
    }

    #[test]
    fn units_and_indices_stay_in_range() {
        let mut r = SplitMix64::new(7);
        for n in [1, 2, 3, 10, 1000] {
            for _ in 0..1000 {
                let u = r.next_unit();
                assert!(u > 0.0 && u < 1.0);
                assert!(r.below(n) < n);
            }
        }
    }
}
