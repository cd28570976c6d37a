//! The attention implementations compared, and their names: the one table that `cargo bench`,
//! `repro`'s result files, tables and plots, and `train bench`'s attention kinds go through.

use candle_core::{bail, Result, Tensor};
use flash_ops::AttnOptions;
use flash_ops_models::AttentionKind;

use crate::Workload;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Variant {
    /// FlashAttention (2022): flash-ops' `Algorithm::V1`.
    V1,
    /// FlashAttention-2 (2023): flash-ops' `Algorithm::V2`.
    V2,
    /// Standard attention (`flash_ops::reference::naive_attention`, Candle autograd backward).
    Naive,
    /// candle-nn's CPU `attention::flash_attn`: forward only, f32.
    CandleNn,
    /// PyTorch's `scaled_dot_product_attention`, timed by `scripts/repro_torch_sdpa.py`.
    TorchSdpa,
}

impl Variant {
    pub const ALL: [Variant; 5] = [
        Variant::V1,
        Variant::V2,
        Variant::Naive,
        Variant::CandleNn,
        Variant::TorchSdpa,
    ];

    /// `(key, name)`: the short name on command lines and in result files, and the one in
    /// tables and plots.
    fn names(self) -> (&'static str, &'static str) {
        match self {
            Variant::V1 => ("v1", "flash V1"),
            Variant::V2 => ("v2", "flash V2"),
            Variant::Naive => ("naive", "naive (standard)"),
            Variant::CandleNn => ("candle-nn", "candle-nn flash_attn (fwd only)"),
            Variant::TorchSdpa => ("torch-sdpa", "PyTorch SDPA"),
        }
    }

    /// The short name used on command lines and in result files.
    pub fn key(self) -> &'static str {
        self.names().0
    }

    /// The name in tables and plots.
    pub fn name(self) -> &'static str {
        self.names().1
    }

    /// The variant of a [`key`](Self::key).
    pub fn parse(key: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.key() == key)
    }

    /// The models' attention kind that runs this implementation (`train --attn`), if any.
    pub fn kind(self) -> Option<AttentionKind> {
        match self {
            Variant::V1 => Some(AttentionKind::FlashV1),
            Variant::V2 => Some(AttentionKind::FlashV2),
            Variant::Naive => Some(AttentionKind::Naive),
            Variant::CandleNn | Variant::TorchSdpa => None,
        }
    }

    /// The variant a models' attention kind runs.
    pub fn of_kind(kind: AttentionKind) -> Self {
        match kind {
            AttentionKind::FlashV1 => Variant::V1,
            AttentionKind::FlashV2 => Variant::V2,
            AttentionKind::Naive => Variant::Naive,
        }
    }

    /// Whether the variant has a backward pass to time.
    pub fn has_backward(self) -> bool {
        self != Variant::CandleNn
    }

    /// Runs the variant's forward pass on q, k, v of `w.shape()`.
    pub fn forward(self, q: &Tensor, k: &Tensor, v: &Tensor, w: &Workload) -> Result<Tensor> {
        self.forward_with(q, k, v, w, &w.options())
    }

    /// As [`forward`](Self::forward) with `opts` instead of `w.options()` (e.g. a block mask).
    pub fn forward_with(
        self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        w: &Workload,
        opts: &AttnOptions,
    ) -> Result<Tensor> {
        match (self, self.kind()) {
            (_, Some(kind)) => kind.attend(q, k, v, opts.clone()),
            (Variant::CandleNn, None) => {
                use candle_nn::attention::{flash_attn, AttnMask};
                if w.dropout_and_padding.is_some() || opts.block_mask.is_some() {
                    bail!("candle-nn flash_attn has no dropout, key padding or block mask")
                }
                let mask = if w.causal {
                    AttnMask::causal()
                } else {
                    AttnMask::None
                };
                flash_attn::<f32>(q, k, v, 1.0 / (w.d as f32).sqrt(), mask, None, None)
            }
            _ => bail!(
                "{} is timed by scripts/repro_torch_sdpa.py, not in this process",
                self.name()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_kinds_match() {
        for v in Variant::ALL {
            assert_eq!(Variant::parse(v.key()), Some(v));
            if let Some(k) = v.kind() {
                assert_eq!(Variant::of_kind(k), v);
            }
        }
        for k in AttentionKind::ALL {
            assert_eq!(Variant::of_kind(k).kind(), Some(k));
        }
        assert_eq!(Variant::parse("flash3"), None);
    }
}
