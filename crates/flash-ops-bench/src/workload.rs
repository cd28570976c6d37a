//! The attention problems measured and the FlashAttention-2 paper's FLOP count.
//!
//! FLOPs: forward 4·N²·d·H (half when causal), backward [`BWD_PER_FWD_FLOPS`]× forward.

use flash_ops::AttnOptions;

/// Backward FLOPs per forward FLOP in the FlashAttention-2 paper's count (2 matmuls forward, 5
/// backward); forward+backward is `1 + BWD_PER_FWD_FLOPS`.
pub const BWD_PER_FWD_FLOPS: f64 = 2.5;

/// Forward FLOPs of one sequence: 4·N²·d·H, half if causal.
pub fn flops_fwd(n: usize, d: usize, h: usize, causal: bool) -> f64 {
    let f = 4.0 * (n * n) as f64 * d as f64 * h as f64;
    if causal {
        f / 2.0
    } else {
        f
    }
}

/// One attention problem of the benchmarks: dense `(batch, n, heads, d)` self-attention.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Workload {
    pub batch: usize,
    pub heads: usize,
    pub n: usize,
    pub d: usize,
    pub causal: bool,
    /// FlashAttention's "dropout + masking" setting: attention dropout with this probability and
    /// a key-padding mask (batch element `i` keeps `n − i·n/(4·batch)` keys).
    pub dropout_and_padding: Option<f32>,
}

impl Workload {
    pub fn new(batch: usize, heads: usize, n: usize, d: usize, causal: bool) -> Self {
        Self {
            batch,
            heads,
            n,
            d,
            causal,
            dropout_and_padding: None,
        }
    }

    /// The `(batch, n, heads, d)` shape of q, k, v and the output gradient.
    pub fn shape(&self) -> (usize, usize, usize, usize) {
        (self.batch, self.n, self.heads, self.d)
    }

    pub fn options(&self) -> AttnOptions {
        let mut o = AttnOptions::new().causal(self.causal);
        if let Some(p) = self.dropout_and_padding {
            let lengths = (0..self.batch)
                .map(|i| self.n - i * self.n / (4 * self.batch))
                .collect();
            o = o.dropout(p, 0x5EED).key_lengths(lengths);
        }
        o
    }

    /// Forward FLOPs of the whole batch ([`flops_fwd`] per sequence).
    pub fn fwd_flops(&self) -> f64 {
        self.batch as f64 * flops_fwd(self.n, self.d, self.heads, self.causal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_flop_count() {
        // 4·N²·d·H: two N×N×d matmuls of 2 FLOPs per multiply-add, per head.
        assert_eq!(
            flops_fwd(1024, 64, 12, false),
            4.0 * 1024.0 * 1024.0 * 64.0 * 12.0
        );
        assert_eq!(
            flops_fwd(1024, 64, 12, true),
            flops_fwd(1024, 64, 12, false) / 2.0
        );
        let w = Workload::new(3, 12, 1024, 64, true);
        assert_eq!(w.fwd_flops(), 3.0 * flops_fwd(1024, 64, 12, true));
    }

    #[test]
    fn padding_keeps_the_first_sequence_whole() {
        let mut w = Workload::new(4, 2, 64, 16, false);
        w.dropout_and_padding = Some(0.1);
        let o = w.options();
        assert_eq!(o.key_lengths.as_deref(), Some(&[64usize, 60, 56, 52][..]));
    }
}
