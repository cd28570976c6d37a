//! Drop-in replacements for `candle-flash-attn`'s public functions: same names, same argument
//! order, same `(batch, seq, heads, head_dim)` / varlen layouts. Code written for
//! candle-flash-attn switches by changing one import, and gains a CPU backend, f32 and a
//! backward pass.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! // Was: use candle_flash_attn::flash_attn;
//! use flash_ops::compat::flash_attn;
//!
//! # fn main() -> candle_core::Result<()> {
//! let q = Tensor::randn(0f32, 1.0, (1, 10, 4, 32), &Device::Cpu)?;
//! let out = flash_attn(&q, &q, &q, 1.0 / 32f32.sqrt(), true)?;
//! assert_eq!(out.dims(), q.dims());
//! # Ok(())
//! # }
//! ```

use candle_core::{Result, Tensor};

use crate::{AttnOptions, Varlen};

/// candle-flash-attn's mask and score arguments as [`AttnOptions`].
fn opts(
    softmax_scale: f32,
    (window_size_left, window_size_right): (Option<usize>, Option<usize>),
    alibi_slopes: Option<&Tensor>,
    softcap: Option<f32>,
) -> AttnOptions {
    AttnOptions {
        softmax_scale: Some(softmax_scale),
        window_left: window_size_left,
        window_right: window_size_right,
        alibi_slopes: alibi_slopes.cloned(),
        softcap,
        ..AttnOptions::default()
    }
}

/// `causal` as candle-flash-attn passes it on: the window with nothing to the right.
fn causal_window(causal: bool) -> (Option<usize>, Option<usize>) {
    (None, causal.then_some(0))
}

/// Each candle-flash-attn function comes as a pair: the dense form over `(batch, seq, heads,
/// head_dim)` tensors, and the varlen form over packed `(total_tokens, heads, head_dim)` tensors,
/// which takes the cumulative `seqlens_q`, `seqlens_k` and the longest lengths (see [`Varlen`])
/// after the tensor arguments, as candle-flash-attn orders them. `$opts` builds
/// the [`AttnOptions`] from the scalar arguments.
macro_rules! entry_points {
    ($(
        $(#[$doc:meta])*
        $dense:ident, $varlen:ident
        ($($tensor:ident: $tensor_ty:ty),*; $($scalar:ident: $scalar_ty:ty),*) => $opts:expr;
    )*) => {$(
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        pub fn $dense(
            q: &Tensor,
            k: &Tensor,
            v: &Tensor,
            $($tensor: $tensor_ty,)*
            $($scalar: $scalar_ty,)*
        ) -> Result<Tensor> {
            crate::flash_attn(q, k, v, &$opts)
        }

        #[doc = concat!("[`", stringify!($dense), "`] over a packed variable-length batch.")]
        #[allow(clippy::too_many_arguments)]
        pub fn $varlen(
            q: &Tensor,
            k: &Tensor,
            v: &Tensor,
            $($tensor: $tensor_ty,)*
            seqlens_q: &Tensor,
            seqlens_k: &Tensor,
            max_seqlen_q: usize,
            max_seqlen_k: usize,
            $($scalar: $scalar_ty,)*
        ) -> Result<Tensor> {
            let batch = Varlen::new(seqlens_q, seqlens_k, max_seqlen_q, max_seqlen_k);
            crate::flash_attn_varlen(q, k, v, &batch, &$opts)
        }
    )*};
}

entry_points! {
    /// Attention over every key, or causal.
    flash_attn, flash_attn_varlen
    (; softmax_scale: f32, causal: bool)
    => opts(softmax_scale, causal_window(causal), None, None);

    /// A sliding window ([`AttnOptions::window_left`]; `None` is unbounded on that side).
    flash_attn_windowed, flash_attn_varlen_windowed
    (; softmax_scale: f32, window_size_left: Option<usize>, window_size_right: Option<usize>)
    => opts(softmax_scale, (window_size_left, window_size_right), None, None);

    /// With ALiBi biases ([`AttnOptions::alibi_slopes`]).
    flash_attn_alibi, flash_attn_varlen_alibi
    (alibi_slopes: &Tensor; softmax_scale: f32, causal: bool)
    => opts(softmax_scale, causal_window(causal), Some(alibi_slopes), None);

    /// A sliding window with ALiBi biases.
    flash_attn_alibi_windowed, flash_attn_varlen_alibi_windowed
    (
        alibi_slopes: &Tensor;
        softmax_scale: f32,
        window_size_left: Option<usize>,
        window_size_right: Option<usize>
    ) => opts(
        softmax_scale,
        (window_size_left, window_size_right),
        Some(alibi_slopes),
        None,
    );

    /// A sliding window, optional ALiBi biases and soft-capped scores ([`AttnOptions::softcap`]).
    flash_attn_alibi_windowed_softcap, flash_attn_varlen_alibi_windowed_softcap
    (
        alibi_slopes: Option<&Tensor>;
        softmax_scale: f32,
        window_size_left: Option<usize>,
        window_size_right: Option<usize>,
        softcap: f32
    ) => opts(
        softmax_scale,
        (window_size_left, window_size_right),
        alibi_slopes,
        Some(softcap),
    );
}
