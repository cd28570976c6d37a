//! Counter-based dropout mask: Philox4x32-10 (Salmon et al., 2011), the generator FlashAttention
//! uses, so backward regenerates exactly the mask forward used from `(seed, position)` alone.

use crate::options::Dropout;

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

/// Philox4x32 with 10 rounds.
#[inline(always)]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (counter, key);
    for _ in 0..10 {
        let (hi0, lo0) = mulhilo(M0, c[0]);
        let (hi1, lo1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
        k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
    }
    c
}

/// The keep/drop decision of one attention weight, shared by every backend.
#[derive(Debug, Clone, Copy)]
pub struct DropoutMask {
    key: [u32; 2],
    /// A weight is kept iff its 32-bit draw is `>= threshold` ([`Dropout::threshold`]).
    threshold: u32,
    /// `1 / (1 - p)`: kept weights are rescaled so the expectation is unchanged.
    pub keep_scale: f32,
    /// `sequence * heads_q + head`: one stream per (sequence, head).
    stream: u32,
}

impl DropoutMask {
    pub fn new(p: f32, seed: u64, seq: usize, heads_q: usize, head: usize) -> Self {
        let dropout = Dropout { p, seed };
        Self {
            key: [seed as u32, (seed >> 32) as u32],
            threshold: dropout.threshold(),
            keep_scale: dropout.keep_scale(),
            stream: (seq * heads_q + head) as u32,
        }
    }

    /// Writes `keep_scale` (kept) or 0 (dropped) for keys `j0..j0 + out.len()` of query row `i`.
    /// One Philox call gives the draws of four consecutive keys (`j / 4` is the counter).
    pub fn row_factors(&self, i: usize, j0: usize, out: &mut [f32]) {
        let mut j = j0;
        let end = j0 + out.len();
        while j < end {
            let draws = philox4x32_10([(j / 4) as u32, i as u32, self.stream, 0], self.key);
            let block_end = ((j / 4) + 1) * 4;
            while j < end.min(block_end) {
                out[j - j0] = if draws[j % 4] >= self.threshold {
                    self.keep_scale
                } else {
                    0.0
                };
                j += 1;
            }
        }
    }

    pub fn keeps(&self, i: usize, j: usize) -> bool {
        let draws = philox4x32_10([(j / 4) as u32, i as u32, self.stream, 0], self.key);
        draws[j % 4] >= self.threshold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_matches_random123_known_answer() {
        // Known-answer vectors of Random123's kat_vectors for philox4x32_10.
        assert_eq!(
            philox4x32_10([0, 0, 0, 0], [0, 0]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
    }

    #[test]
    fn row_factors_agree_with_keeps() {
        let m = DropoutMask::new(0.3, 42, 1, 4, 2);
        let mut out = vec![0f32; 37];
        m.row_factors(5, 3, &mut out);
        for (t, f) in out.iter().enumerate() {
            assert_eq!(*f > 0.0, m.keeps(5, 3 + t));
        }
    }
}
