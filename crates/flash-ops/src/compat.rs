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

fn opts(
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
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

fn causal_right(causal: bool) -> Option<usize> {
    causal.then_some(0)
}

pub fn flash_attn(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    softmax_scale: f32,
    causal: bool,
) -> Result<Tensor> {
    let o = opts(softmax_scale, None, causal_right(causal), None, None);
    crate::flash_attn(q, k, v, &o)
}

pub fn flash_attn_windowed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
) -> Result<Tensor> {
    let o = opts(
        softmax_scale,
        window_size_left,
        window_size_right,
        None,
        None,
    );
    crate::flash_attn(q, k, v, &o)
}

pub fn flash_attn_alibi(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alibi_slopes: &Tensor,
    softmax_scale: f32,
    causal: bool,
) -> Result<Tensor> {
    let o = opts(
        softmax_scale,
        None,
        causal_right(causal),
        Some(alibi_slopes),
        None,
    );
    crate::flash_attn(q, k, v, &o)
}

pub fn flash_attn_alibi_windowed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alibi_slopes: &Tensor,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
) -> Result<Tensor> {
    let o = opts(
        softmax_scale,
        window_size_left,
        window_size_right,
        Some(alibi_slopes),
        None,
    );
    crate::flash_attn(q, k, v, &o)
}

#[allow(clippy::too_many_arguments)]
pub fn flash_attn_alibi_windowed_softcap(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alibi_slopes: Option<&Tensor>,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
    softcap: f32,
) -> Result<Tensor> {
    let o = opts(
        softmax_scale,
        window_size_left,
        window_size_right,
        alibi_slopes,
        Some(softcap),
    );
    crate::flash_attn(q, k, v, &o)
}

#[allow(clippy::too_many_arguments)]
pub fn flash_attn_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    softmax_scale: f32,
    causal: bool,
) -> Result<Tensor> {
    let o = opts(softmax_scale, None, causal_right(causal), None, None);
    let batch = Varlen::new(seqlens_q, seqlens_k, max_seqlen_q, max_seqlen_k);
    crate::flash_attn_varlen(q, k, v, &batch, &o)
}

#[allow(clippy::too_many_arguments)]
pub fn flash_attn_varlen_windowed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
) -> Result<Tensor> {
    let o = opts(
        softmax_scale,
        window_size_left,
        window_size_right,
        None,
        None,
    );
    let batch = Varlen::new(seqlens_q, seqlens_k, max_seqlen_q, max_seqlen_k);
    crate::flash_attn_varlen(q, k, v, &batch, &o)
}

#[allow(clippy::too_many_arguments)]
pub fn flash_attn_varlen_alibi(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alibi_slopes: &Tensor,
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    softmax_scale: f32,
    causal: bool,
) -> Result<Tensor> {
    let o = opts(
        softmax_scale,
        None,
        causal_right(causal),
        Some(alibi_slopes),
        None,
    );
    let batch = Varlen::new(seqlens_q, seqlens_k, max_seqlen_q, max_seqlen_k);
    crate::flash_attn_varlen(q, k, v, &batch, &o)
}

#[allow(clippy::too_many_arguments)]
pub fn flash_attn_varlen_alibi_windowed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alibi_slopes: &Tensor,
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
) -> Result<Tensor> {
    let o = opts(
        softmax_scale,
        window_size_left,
        window_size_right,
        Some(alibi_slopes),
        None,
    );
    let batch = Varlen::new(seqlens_q, seqlens_k, max_seqlen_q, max_seqlen_k);
    crate::flash_attn_varlen(q, k, v, &batch, &o)
}

#[allow(clippy::too_many_arguments)]
pub fn flash_attn_varlen_alibi_windowed_softcap(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alibi_slopes: Option<&Tensor>,
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
    softcap: f32,
) -> Result<Tensor> {
    let o = opts(
        softmax_scale,
        window_size_left,
        window_size_right,
        alibi_slopes,
        Some(softcap),
    );
    let batch = Varlen::new(seqlens_q, seqlens_k, max_seqlen_q, max_seqlen_k);
    crate::flash_attn_varlen(q, k, v, &batch, &o)
}
