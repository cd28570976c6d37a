//! Attention for batched decoding, two ways.
//!
//! * [`shared_prefix_decode`] (Hydragen, Juravsky et al. 2024) through
//!   [`flash_ops::shared_prefix_attention`]: the prompt's K/V are stored once; the queries of every
//!   sequence are folded into one query block against them (a matrix-matrix product that reads the
//!   prefix once per step, instead of one matrix-vector product per sequence), each sequence's own
//!   suffix is attended separately, and the two partial results are merged exactly through their
//!   log-sum-exp.
//! * [`flash_decoding`] (Dao et al. 2023), the baseline: every sequence holds its own copy of the
//!   prefix, and the key axis is split into chunks attended in parallel, merged the same way
//!   ([`flash_ops::merge_attention_states`]).
//!
//! Both are flash-ops' V2 kernels with log-sum-exp plus the merge, so they run wherever flash-ops
//! runs, in f32/f16/bf16.

use candle_core::{bail, Result, Tensor};
use flash_ops::{
    flash_attn_with_lse, merge_attention_states, shared_prefix_attention, AttnOptions, PrefixLevel,
};
use rayon::prelude::*;

/// Attention of queries `q (n, t, hq, d)` over a prefix shared by all `n` sequences
/// (`prefix_k`, `prefix_v`: `(1, sp, hk, d)`) followed by each sequence's own suffix
/// (`(n, s, hk, d)`, `None` when empty), causal over the suffix (the diagonal bottom-right).
/// Equals causal attention over the concatenation `[prefix; suffix]` per sequence.
pub fn shared_prefix_decode(
    q: &Tensor,
    prefix_k: &Tensor,
    prefix_v: &Tensor,
    suffix: Option<(&Tensor, &Tensor)>,
) -> Result<Tensor> {
    if prefix_k.dim(0)? != 1 {
        bail!(
            "shared_prefix_decode: prefix_k must hold one sequence (1, sp, hk, d), got {:?}",
            prefix_k.dims()
        )
    }
    let level = PrefixLevel::shared(prefix_k, prefix_v, q.dim(0)?);
    let opts = AttnOptions::new().causal(true);
    match suffix {
        Some((sk, sv)) => shared_prefix_attention(q, &[level], sk, sv, &opts),
        None => {
            let (_, _, hk, d) = prefix_k.dims4()?;
            let empty = Tensor::zeros((q.dim(0)?, 0, hk, d), prefix_k.dtype(), prefix_k.device())?;
            shared_prefix_attention(q, &[level], &empty, &empty, &opts)
        }
    }
}

/// Fewest keys per chunk: below this the merge costs more than the parallelism gains.
const MIN_CHUNK: usize = 256;

/// FlashDecoding's split: enough chunks that `b·hq·chunks` rows fill the threads four times over
/// (more work items than threads keeps them busy to the end), never chunks under [`MIN_CHUNK`]
/// keys. With many sequences and heads the rows already fill the machine and this is 1.
pub fn kv_chunks(batch: usize, heads: usize, keys: usize) -> usize {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let want = (4 * threads).div_ceil((batch * heads).max(1));
    want.clamp(1, keys.div_ceil(MIN_CHUNK).max(1))
}

/// One decoding step over per-sequence caches: `q (b, 1, hq, d)` against `k`, `v` `(b, L, hk, d)`
/// (every key visible), the key axis split into `chunks` parts (read in place: a narrow keeps the
/// unit stride on head_dim) attended on parallel threads and merged by log-sum-exp.
pub fn flash_decoding(q: &Tensor, k: &Tensor, v: &Tensor, chunks: usize) -> Result<Tensor> {
    if q.dim(1)? != 1 {
        bail!(
            "flash_decoding: one query per sequence, got q {:?}",
            q.dims()
        )
    }
    let len = k.dim(1)?;
    let chunks = chunks.clamp(1, len.max(1));
    let step = len.div_ceil(chunks);
    let opts = AttnOptions::new();
    // Chunks on rayon's threads; each call spreads its (b, hq) rows over them too.
    let parts: Vec<(Tensor, Tensor)> = (0..len)
        .step_by(step.max(1))
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|start| {
            let l = step.min(len - start);
            flash_attn_with_lse(q, &k.narrow(1, start, l)?, &v.narrow(1, start, l)?, &opts)
        })
        .collect::<Result<_>>()?;
    if parts.is_empty() {
        bail!("flash_decoding: the cache holds no key")
    }
    if parts.len() == 1 {
        // One chunk: the kernel's output is already the answer.
        return Ok(parts.into_iter().next().expect("one part").0);
    }
    let (outs, lses): (Vec<_>, Vec<_>) = parts.into_iter().unzip();
    Ok(merge_attention_states(&outs, &lses)?.0)
}
