//! The run-time attention choice shared by both models.
//!
//! Every kind takes the flash layout `(batch, seq, heads, head_dim)` and the same
//! [`AttnOptions`], so the models build their options once and never branch on the kind
//! elsewhere. `Naive` is flash-ops' reference (matmul, written-out softmax, matmul; backward by
//! Candle's autograd); the flash kinds run the fused op with its own backward.

use std::fmt;
use std::str::FromStr;

use candle_core::{bail, DType, Result, Tensor};
use flash_ops::{flash_attn, reference::naive_attention, Algorithm, AttnOptions};

/// Which attention implementation a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionKind {
    /// Standard attention materialising the `N×N` scores (the baseline).
    Naive,
    /// FlashAttention (Dao et al., 2022).
    FlashV1,
    /// FlashAttention-2 (Dao, 2023).
    #[default]
    FlashV2,
}

impl AttentionKind {
    pub const ALL: [AttentionKind; 3] = [Self::Naive, Self::FlashV1, Self::FlashV2];

    /// Attention over q `(b, sq, hq, d)`, k/v `(b, sk, hk, d)`; returns `(b, sq, hq, d)`.
    /// `opts.algorithm` is overridden by the kind.
    pub fn attend(self, q: &Tensor, k: &Tensor, v: &Tensor, opts: AttnOptions) -> Result<Tensor> {
        match self {
            Self::Naive => naive_attention(q, k, v, &opts),
            Self::FlashV1 | Self::FlashV2 => {
                if q.dtype() == DType::F64 {
                    // The fused kernels run f32/f16/bf16; f64 models (gradient checks) use Naive.
                    bail!("attention {self}: f64 is only supported by the naive attention")
                }
                let algorithm = if self == Self::FlashV1 {
                    Algorithm::V1
                } else {
                    Algorithm::V2
                };
                flash_attn(q, k, v, &opts.algorithm(algorithm))
            }
        }
    }
}

impl fmt::Display for AttentionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Naive => "naive",
            Self::FlashV1 => "flash1",
            Self::FlashV2 => "flash2",
        })
    }
}

impl FromStr for AttentionKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "naive" | "standard" => Ok(Self::Naive),
            "flash1" | "flashv1" | "flash-v1" | "v1" => Ok(Self::FlashV1),
            "flash2" | "flashv2" | "flash-v2" | "v2" | "flash" => Ok(Self::FlashV2),
            other => Err(format!(
                "unknown attention `{other}` (expected naive, flash1 or flash2)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_display_round_trip() {
        for kind in AttentionKind::ALL {
            assert_eq!(kind.to_string().parse::<AttentionKind>().unwrap(), kind);
        }
        assert!("flash3".parse::<AttentionKind>().is_err());
    }
}
