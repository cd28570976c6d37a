//! # flash-ops: trainable FlashAttention for Candle
//!
//! Exact attention that never materialises the `N×N` score matrix (tiling plus online softmax,
//! Dao et al. 2022) and has a backward pass, so Candle models can train with it:
//! `Tensor::backward()` through [`flash_attn`] yields dq, dk and dv, recomputed tile by tile from
//! the saved log-sum-exp. Both schedules are here, [`Algorithm::V1`] (FlashAttention) and
//! [`Algorithm::V2`] (FlashAttention-2), so the papers' comparison can be rerun.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use flash_ops::{flash_attn, AttnOptions};
//!
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! // (batch, seq, heads, head_dim), the layout of the `flash-attn` package.
//! let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 100, 4, 32), &dev)?)?;
//! let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 80, 2, 32), &dev)?)?; // GQA: 2 kv heads
//! let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 80, 2, 32), &dev)?)?;
//! let out = flash_attn(&q, &k, &v, &AttnOptions::new().causal(true))?;
//! let grads = out.sqr()?.sum_all()?.backward()?;
//! let dq = grads.get(&q).expect("dq");
//! assert_eq!(dq.dims(), &[2, 100, 4, 32]);
//! # Ok(())
//! # }
//! ```
//!
//! Layouts: dense inputs are `(batch, seq, heads, head_dim)` (any strides with a unit stride on
//! `head_dim`); the varlen entry points take `(total_tokens, heads, head_dim)` with cumulative
//! sequence lengths. Options are in [`AttnOptions`]. [`compat`] mirrors `candle-flash-attn`'s
//! functions; [`reference`] is the plain matmul–softmax–matmul attention used as the baseline
//! and test oracle. How forward's statistics reach backward is explained in the `op` module.

pub mod block_mask;
pub mod compat;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
pub mod dropout;
pub mod mask;
mod merge;
#[cfg(all(feature = "metal", target_os = "macos"))]
mod metal;
mod op;
mod options;
mod params;
#[doc(hidden)]
pub mod plan;
mod prefix;
pub mod reference;
mod stats;

pub use block_mask::BlockMask;
pub use merge::merge_attention_states;
pub use options::{Algorithm, AttnOptions, Dropout, Varlen};
pub use prefix::{shared_prefix_attention, shared_prefix_attention_with_lse, PrefixLevel};

/// The CPU kernels' ISA choice (`FLASH_OPS_CPU_ISA`), tile GEMMs and `exp`, shared with the
/// CPU code of `flash-ops-models` and the benchmarks; not a stable API.
#[doc(hidden)]
pub use cpu::simd;

use candle_core::{bail, DType, Result, Tensor};

use op::FlashAttnFwd;
use params::AttnParams;

/// Candle's kernels want a unit stride on the last dimension; anything else is copied once.
fn unit_last_stride(t: &Tensor) -> Result<Tensor> {
    match t.stride().last() {
        Some(1) => Ok(t.clone()),
        _ => t.contiguous(),
    }
}

/// Runs the op; with `lse_grad` the log-sum-exp gets a gradient (the packed output of `op`).
fn run(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mut params: AttnParams,
    lse_grad: bool,
) -> Result<(Tensor, Tensor)> {
    if !matches!(q.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        bail!(
            "flash_attn: `q` dtype must be f32, f16 or bf16, got {:?} (the f64 oracle is reference::naive_attention)",
            q.dtype()
        )
    }
    params.lse_grad = lse_grad;
    let op = FlashAttnFwd::new(params);
    let (params, stats) = (op.params.clone(), op.stats.clone());
    let out = unit_last_stride(q)?.apply_op3(&unit_last_stride(k)?, &unit_last_stride(v)?, op)?;
    let Some(stats) = stats.get() else {
        bail!("flash_attn: the backend did not save its statistics")
    };
    let lse = stats::lse_tensor(&params, stats)?;
    if !lse_grad {
        return Ok((out, lse));
    }
    // `out ‖ slot`: the slot is zeros whose gradient is dlse (see `op`).
    let (nq, n) = (params.q_elems(), params.lse_len());
    let slot = out.narrow(0, nq, n)?.to_dtype(DType::F32)?;
    let lse = (lse + slot.reshape(params.lse_dims())?)?;
    Ok((out.narrow(0, 0, nq)?.reshape(params.out_dims())?, lse))
}

/// FlashAttention over dense inputs: q `(b, sq, hq, d)`, k and v `(b, sk, hk, d)` with
/// `hq % hk == 0`. Returns `(b, sq, hq, d)` in the inputs' dtype; differentiable.
pub fn flash_attn(q: &Tensor, k: &Tensor, v: &Tensor, opts: &AttnOptions) -> Result<Tensor> {
    Ok(run(q, k, v, AttnParams::dense(q, k, v, opts)?, false)?.0)
}

/// As [`flash_attn`], also returning the log-sum-exp `(b, hq, sq)` (f32, natural log, of the
/// scaled and modified scores; `-inf` for rows that see no key), for ring/blockwise attention.
/// Both are differentiable: a loss of the output and the log-sum-exp gets dq, dk, dv from one
/// backward pass (the lse's gradient enters as `D − dlse`, see the `op` module), so attention
/// merged by [`merge_attention_states`] trains.
pub fn flash_attn_with_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &AttnOptions,
) -> Result<(Tensor, Tensor)> {
    run(q, k, v, AttnParams::dense(q, k, v, opts)?, true)
}

/// FlashAttention over a variable-length batch packed into one token axis: q `(total_q, hq, d)`,
/// k and v `(total_k, hk, d)`; sequence `i` spans `cu_seqlens_q[i]..cu_seqlens_q[i+1]` (see
/// [`Varlen`]). `opts.key_lengths` is ignored (the offsets already say it).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use flash_ops::{flash_attn_varlen, AttnOptions, Varlen};
///
/// # fn main() -> candle_core::Result<()> {
/// // Two sequences of 3 and 5 tokens packed into one axis, 2 heads of dimension 16.
/// let q = Tensor::randn(0f32, 1.0, (8, 2, 16), &Device::Cpu)?;
/// let k = Tensor::randn(0f32, 1.0, (8, 2, 16), &Device::Cpu)?;
/// let v = Tensor::randn(0f32, 1.0, (8, 2, 16), &Device::Cpu)?;
/// let cu = Tensor::new(&[0u32, 3, 8], &Device::Cpu)?;
/// let batch = Varlen::new(&cu, &cu, 5, 5);
/// let out = flash_attn_varlen(&q, &k, &v, &batch, &AttnOptions::new().causal(true))?;
/// assert_eq!(out.dims(), &[8, 2, 16]);
/// # Ok(())
/// # }
/// ```
pub fn flash_attn_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    varlen: &Varlen,
    opts: &AttnOptions,
) -> Result<Tensor> {
    Ok(run(q, k, v, AttnParams::varlen(q, k, v, varlen, opts)?, false)?.0)
}

/// As [`flash_attn_varlen`], also returning the log-sum-exp `(hq, total_q)`; both are
/// differentiable, as in [`flash_attn_with_lse`].
pub fn flash_attn_varlen_with_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    varlen: &Varlen,
    opts: &AttnOptions,
) -> Result<(Tensor, Tensor)> {
    run(q, k, v, AttnParams::varlen(q, k, v, varlen, opts)?, true)
}
