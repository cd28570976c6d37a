//! `candle-flash-attn` replaced by flash-ops.
//!
//! Same package name, crate name and public functions as candle-flash-attn 0.11.1, so a crate
//! that depends on it (for instance candle-transformers with its `flash-attn` feature) runs
//! flash-ops instead when the final workspace patches it in:
//!
//! ```toml
//! [patch.crates-io]
//! candle-flash-attn = { git = "https://github.com/flash-ops/flash-ops" }   # or { path = ".../crates/candle-flash-attn" }
//! ```
//!
//! What changes for callers: the functions also run on the CPU, take f32 as well as f16/bf16,
//! and are differentiable (`Tensor::backward` yields dq, dk, dv). Not provided:
//! `flash_attn_varlen_paged_windowed` (paged KV cache) and the public `FlashAttn` op struct.

pub use flash_ops::compat::{
    flash_attn, flash_attn_alibi, flash_attn_alibi_windowed, flash_attn_alibi_windowed_softcap,
    flash_attn_varlen, flash_attn_varlen_alibi, flash_attn_varlen_alibi_windowed,
    flash_attn_varlen_alibi_windowed_softcap, flash_attn_varlen_windowed, flash_attn_windowed,
};
