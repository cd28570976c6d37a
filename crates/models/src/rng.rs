//! The hashes every seeded stream of the models and of `train` derives from: SplitMix64 (Steele,
//! Lea & Flood, 2014) and 64-bit FNV-1a.
//!
//! Dropout masks, sampling, parameter init, data order and masking all depend on these exact
//! numbers, and checkpoints resume them: a change here changes every run's losses.

/// SplitMix64's increment γ = ⌊2⁶⁴/φ⌋ (odd): multiples of it spread over the 64-bit range.
pub const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function (Stafford's Mix13): a bijection that decorrelates nearby inputs.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One SplitMix64 step from state `z`: `mix(z + γ)`.
pub fn splitmix64(z: u64) -> u64 {
    mix(z.wrapping_add(GOLDEN_GAMMA))
}

/// `seed ^ n·γ`: the `n`-th offset of `seed`, unmixed, for generators that hash their seed
/// themselves (ChaCha's `seed_from_u64`).
pub fn offset(seed: u64, n: u64) -> u64 {
    seed ^ n.wrapping_mul(GOLDEN_GAMMA)
}

/// The seed of the `n`-th stream derived from `seed`: `mix(seed ^ n·γ)`.
pub fn derive(seed: u64, n: u64) -> u64 {
    mix(offset(seed, n))
}

/// A counter hashed by [`splitmix64`]: draw `i` (from 1) is `splitmix64(seed + i)`.
#[derive(Debug, Clone)]
pub struct CounterRng(u64);

impl CounterRng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        splitmix64(self.0)
    }

    /// Uniform in `[0, 1)`, from the top 53 bits of a draw.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// 64-bit FNV-1a over `words`, each XORed in whole (bytes for a name, token ids for a corpus).
pub fn fnv1a(words: impl IntoIterator<Item = u64>) -> u64 {
    words.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, w| {
        (h ^ w).wrapping_mul(0x100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference values: SplitMix64 from state 0 (Vigna's `splitmix64.c`), FNV-1a of "a" and of
    /// nothing (the offset basis).
    #[test]
    fn known_values() {
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(
            splitmix64(GOLDEN_GAMMA),
            0x6E78_9E6A_A1B9_65F4,
            "second output of the stream"
        );
        assert_eq!(fnv1a([]), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a("a".bytes().map(u64::from)), 0xAF63_DC4C_8601_EC8C);
        let mut r = CounterRng::new(u64::MAX);
        assert_eq!(r.next_u64(), splitmix64(0));
        assert_eq!(derive(5, 0), mix(5));
        assert_eq!(offset(1, 1), 1 ^ GOLDEN_GAMMA);
    }

    #[test]
    fn uniform_is_in_unit_interval() {
        let mut r = CounterRng::new(3);
        let xs: Vec<f64> = (0..10_000).map(|_| r.uniform()).collect();
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
    }
}
