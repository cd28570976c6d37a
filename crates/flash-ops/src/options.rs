//! User-facing attention options, shared by every backend.

use candle_core::Tensor;

use crate::BlockMask;

/// Which FlashAttention schedule runs.
///
/// Both compute the same function; they differ in work partitioning and in what forward saves for
/// backward, which is what the FA1-vs-FA2 comparison measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithm {
    /// FlashAttention (Dao et al., 2022, Algorithms 1/2/4): the outer loop runs over K/V blocks, the
    /// output is rescaled in memory after every block, and forward saves the row max `m` and the
    /// row sum `l`. Parallel over (batch, head) only.
    V1,
    /// FlashAttention-2 (Dao, 2023, Algorithms 1/2): the outer loop runs over Q blocks with an
    /// unscaled accumulator normalised once at the end, forward saves only the log-sum-exp, and
    /// work is split over (batch, head, block).
    #[default]
    V2,
}

/// Attention dropout (applied to the normalised probabilities, as in the papers).
///
/// The keep mask is a pure function of `(seed, sequence, head, query, key)` through a counter-based
/// generator (Philox4x32-10), so backward regenerates it instead of storing an N×N mask.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    /// Probability of dropping an attention weight, in `[0, 1)`.
    pub p: f32,
    pub seed: u64,
}

impl Dropout {
    /// A weight is kept iff its 32-bit draw is `>= threshold()`: `p · 2^32`, clamped to
    /// `u32::MAX` (computed in f64 so that every f32 `p` maps exactly). Every backend, the GPU
    /// kernels (through their launch parameters) and the models' residual dropout use this one.
    pub fn threshold(&self) -> u32 {
        ((self.p as f64) * 4_294_967_296.0).min(4_294_967_295.0) as u32
    }

    /// `1 / (1 - p)`: kept weights are rescaled so that the expectation is unchanged.
    pub fn keep_scale(&self) -> f32 {
        1.0 / (1.0 - self.p)
    }
}

/// A variable-length batch packed into one token axis: sequence `i` spans
/// `cu_seqlens_q[i]..cu_seqlens_q[i+1]` of q's tokens and `cu_seqlens_k[i]..cu_seqlens_k[i+1]`
/// of k's and v's (1-D, u32 or i64, batch+1 entries starting at 0); no sequence is longer than
/// its `max_seqlen`. The layout of `flash-attn`'s varlen functions.
#[derive(Debug, Clone)]
pub struct Varlen {
    pub cu_seqlens_q: Tensor,
    pub cu_seqlens_k: Tensor,
    pub max_seqlen_q: usize,
    pub max_seqlen_k: usize,
}

impl Varlen {
    pub fn new(
        cu_seqlens_q: &Tensor,
        cu_seqlens_k: &Tensor,
        max_seqlen_q: usize,
        max_seqlen_k: usize,
    ) -> Self {
        Self {
            cu_seqlens_q: cu_seqlens_q.clone(),
            cu_seqlens_k: cu_seqlens_k.clone(),
            max_seqlen_q,
            max_seqlen_k,
        }
    }
}

/// Options of [`crate::flash_attn`] and its variants. `AttnOptions::default()` is plain
/// non-causal attention with scale `1/sqrt(head_dim)`, computed by [`Algorithm::V2`].
#[derive(Debug, Clone, Default)]
pub struct AttnOptions {
    /// Softmax scale; `None` means `1/sqrt(head_dim)`.
    pub softmax_scale: Option<f32>,
    /// Causal mask, bottom-right aligned when `seqlen_q != seqlen_k` (FlashAttention-2's
    /// convention): query `i` sees key `j` iff `j <= i + seqlen_k - seqlen_q`.
    pub causal: bool,
    /// Sliding window: query `i` sees keys in
    /// `[i + sk - sq - window_left, i + sk - sq + window_right]`; `None` is unbounded on that side.
    pub window_left: Option<usize>,
    pub window_right: Option<usize>,
    /// ALiBi slopes, f32, shape `(heads_q)` or `(batch, heads_q)`: the score of query `i` and key
    /// `j` gets `-slope * |i + sk - sq - j|`.
    pub alibi_slopes: Option<Tensor>,
    /// Logit soft-capping: scores become `softcap * tanh(scores / softcap)` (before ALiBi and masks).
    pub softcap: Option<f32>,
    /// Number of valid keys per batch element (right padding): a key-padding mask without an N×N
    /// tensor. Length must equal the batch size. Ignored by the varlen entry points, whose
    /// `cu_seqlens_k` already say it.
    pub key_lengths: Option<Vec<usize>>,
    pub dropout: Option<Dropout>,
    pub algorithm: Algorithm,
    /// Bit-reproducible backward. The CPU and Metal backends always are (dQ is reduced in a fixed
    /// order); the CUDA V2 backward by default accumulates dQ with f32 atomics (FlashAttention-2 §3.2)
    /// and with this set computes dQ in a separate query-stationary kernel instead (more work:
    /// the scores are recomputed once more).
    pub deterministic: bool,
    /// Block-sparse attention (FlashAttention §3.3): only the blocks the mask lists are visited,
    /// its element bits applied in partial blocks, on top of the rules above (see
    /// [`BlockMask`]). Its lengths must be the call's (varlen: the `max_seqlen`s).
    pub block_mask: Option<BlockMask>,
}

/// Builder setters that store their argument in the field of the same name (in `Some` for the
/// optional ones).
macro_rules! setters {
    (plain: $($p:ident: $pt:ty),+; optional: $($o:ident: $ot:ty),+ $(,)?) => {
        $(
            #[doc = concat!("Sets [`AttnOptions::", stringify!($p), "`].")]
            pub fn $p(mut self, $p: $pt) -> Self {
                self.$p = $p;
                self
            }
        )+
        $(
            #[doc = concat!("Sets [`AttnOptions::", stringify!($o), "`].")]
            pub fn $o(mut self, $o: $ot) -> Self {
                self.$o = Some($o);
                self
            }
        )+
    };
}

impl AttnOptions {
    pub fn new() -> Self {
        Self::default()
    }
    setters! {
        plain: causal: bool, algorithm: Algorithm, deterministic: bool;
        optional: softmax_scale: f32, alibi_slopes: Tensor, softcap: f32, key_lengths: Vec<usize>,
            block_mask: BlockMask,
    }
    pub fn window(mut self, left: Option<usize>, right: Option<usize>) -> Self {
        self.window_left = left;
        self.window_right = right;
        self
    }
    pub fn dropout(mut self, p: f32, seed: u64) -> Self {
        self.dropout = Some(Dropout { p, seed });
        self
    }
}
