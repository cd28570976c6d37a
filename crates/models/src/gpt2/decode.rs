//! Attention for batched decoding, two ways.
//!
//! * [`shared_prefix_decode`] (Hydragen, Juravsky et al. 2024): the prompt's K/V are stored once;
//!   the queries of every sequence are folded into one query block against them (a matrix-matrix
//!   product that reads the prefix once per step, instead of one matrix-vector product per
//!   sequence), each sequence's own suffix is attended separately, and the two partial results are
//!   merged exactly through their log-sum-exp.
//! * [`flash_decoding`] (Dao et al. 2023), the baseline: every sequence holds its own copy of the
//!   prefix, and the key axis is split into chunks attended in parallel, merged the same way.
//!
//! Both use the V2 kernels (`flash_attn_with_lse`), so they run wherever flash-ops runs, in
//! f32/f16/bf16; they are inference paths (the log-sum-exp they merge carries no gradient).

use candle_core::{bail, DType, Result, Tensor};
use flash_ops::{flash_attn_with_lse, AttnOptions};
use rayon::prelude::*;

/// The ⊕ of partial attention results: `outs[i]` `(b, sq, h, d)` over disjoint key sets with
/// log-sum-exp `lses[i]` `(b, h, sq)` (f32, natural log). With m = max lseᵢ and wᵢ = exp(lseᵢ − m),
/// out = Σ wᵢ·oᵢ / Σ wᵢ and lse = m + ln Σ wᵢ; a part with lse −inf contributes nothing and a row
/// no part saw gives zeros and −inf. Accumulates in f32, returns `outs[0]`'s dtype.
pub fn merge_states(outs: &[Tensor], lses: &[Tensor]) -> Result<(Tensor, Tensor)> {
    if outs.is_empty() || outs.len() != lses.len() {
        bail!(
            "merge_states: need as many outs as lses (at least one), got {} and {}",
            outs.len(),
            lses.len()
        )
    }
    let stacked = Tensor::stack(lses, 0)?;
    let m = stacked.max_keepdim(0)?;
    // Rows no part saw have m = −inf: shift by 0 there so that every wᵢ is exp(−inf) = 0.
    let m = m.ge(f32::MIN)?.where_cond(&m, &m.zeros_like()?)?;
    let w = stacked.broadcast_sub(&m)?.exp()?;
    let total = w.sum(0)?;
    let lse = (m.squeeze(0)? + total.log()?)?;
    let denom = total.gt(0f32)?.where_cond(&total, &total.ones_like()?)?;
    let w = w.broadcast_div(&denom)?;
    let mut acc: Option<Tensor> = None;
    for (i, o) in outs.iter().enumerate() {
        // (b, h, sq) → (b, sq, h, 1): one weight per row and head, broadcast over d.
        let wi = w.get(i)?.transpose(1, 2)?.unsqueeze(3)?;
        let term = o.to_dtype(DType::F32)?.broadcast_mul(&wi)?;
        acc = Some(match acc {
            None => term,
            Some(a) => (a + term)?,
        });
    }
    let out = acc.expect("at least one part").to_dtype(outs[0].dtype())?;
    Ok((out, lse))
}

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
    let (n, t, hq, d) = q.dims4()?;
    if prefix_k.dim(0)? != 1 {
        bail!(
            "shared_prefix_decode: prefix_k must hold one sequence (1, sp, hk, d), got {:?}",
            prefix_k.dims()
        )
    }
    // Every query sees all of the prefix: the n·t queries form one block (Hydragen §3).
    let folded = q.reshape((1, n * t, hq, d))?;
    let (o, lse) = flash_attn_with_lse(&folded, prefix_k, prefix_v, &AttnOptions::new())?;
    let o = o.reshape((n, t, hq, d))?;
    let Some((sk, sv)) = suffix else {
        return Ok(o);
    };
    // lse (1, hq, n·t) → (n, hq, t), the layout of the suffix's lse.
    let lse = lse.reshape((hq, n, t))?.transpose(0, 1)?;
    let (os, lses) = flash_attn_with_lse(q, sk, sv, &AttnOptions::new().causal(true))?;
    Ok(merge_states(&[o, os], &[lse, lses])?.0)
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
    Ok(merge_states(&outs, &lses)?.0)
}
