//! Shared-prefix attention (Hydragen, Juravsky et al. 2024): sequences that share a prefix attend
//! to its K/V once, together.
//!
//! Each [`PrefixLevel`] is K/V shared by groups of sequences (level 0 typically by all, deeper
//! levels by sub-groups: a tree). For a level, the queries of every sequence in a group are
//! stacked into one query block against that group's K/V (`b·sq` rows instead of `b` separate
//! blocks of `sq`: a matrix-matrix product, Hydragen §3.2), which is one varlen call whose key
//! side is the level's K/V reshaped, not copied. The per-sequence suffix is attended as usual.
//! The partial results are merged exactly by their log-sum-exp ([`merge_attention_states`]),
//! which is differentiable, so all of it trains.

use candle_core::{bail, Result, Tensor};

use crate::merge::merge_attention_states;
use crate::{flash_attn_varlen_with_lse, flash_attn_with_lse, AttnOptions, Varlen};

/// One level of the prefix tree: K/V `(n_groups, len, hk, d)` and the group of each sequence.
#[derive(Debug, Clone)]
pub struct PrefixLevel {
    pub k: Tensor,
    pub v: Tensor,
    /// `groups[s]` is the group (index into the first axis of `k`, `v`) of sequence `s`.
    pub groups: Vec<usize>,
}

impl PrefixLevel {
    /// A level whose group `groups[s]` is attended by sequence `s`.
    pub fn new(k: &Tensor, v: &Tensor, groups: Vec<usize>) -> Self {
        Self {
            k: k.clone(),
            v: v.clone(),
            groups,
        }
    }

    /// One K/V block `(1, len, hk, d)` shared by all `batch` sequences.
    pub fn shared(k: &Tensor, v: &Tensor, batch: usize) -> Self {
        Self::new(k, v, vec![0; batch])
    }
}

/// Attention of q `(b, sq, hq, d)` over, per sequence `s`, the keys
/// `[levels[0] group of s; levels[1] group of s; …; suffix of s]`, computed level by level.
///
/// `suffix_k`, `suffix_v` are `(b, ss, hk, d)` (`ss` may be 0); `opts.key_lengths`, when set,
/// gives the valid suffix keys of each sequence (right padding). Causal is bottom-right over the
/// whole concatenation, which leaves the prefix fully visible exactly when every suffix has at
/// least `sq - 1` keys (decoding, `sq = 1`, always): that is required, and then causal applies to
/// the suffix alone. Softmax scale, softcap, GQA, the algorithm and `deterministic` act as in
/// [`crate::flash_attn`]. Refused: sliding windows and ALiBi (both depend on a key's position,
/// which the split would change), dropout (its mask is drawn per part, so it would not be the
/// dense attention's) and a block mask (its key blocks are positions in the one key sequence the
/// levels split). Differentiable in q, every level's K/V and the suffix.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use flash_ops::{shared_prefix_attention, AttnOptions, PrefixLevel};
///
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// // 4 samples of one prompt (64 keys, read once), each with its own 5 generated keys.
/// let q = Tensor::randn(0f32, 1.0, (4, 1, 8, 32), &dev)?;
/// let prompt_k = Tensor::randn(0f32, 1.0, (1, 64, 2, 32), &dev)?;
/// let prompt_v = Tensor::randn(0f32, 1.0, (1, 64, 2, 32), &dev)?;
/// let suffix_k = Tensor::randn(0f32, 1.0, (4, 5, 2, 32), &dev)?;
/// let suffix_v = Tensor::randn(0f32, 1.0, (4, 5, 2, 32), &dev)?;
/// let levels = [PrefixLevel::shared(&prompt_k, &prompt_v, 4)];
/// let opts = AttnOptions::new().causal(true);
/// let out = shared_prefix_attention(&q, &levels, &suffix_k, &suffix_v, &opts)?;
/// assert_eq!(out.dims(), &[4, 1, 8, 32]);
/// # Ok(())
/// # }
/// ```
pub fn shared_prefix_attention(
    q: &Tensor,
    levels: &[PrefixLevel],
    suffix_k: &Tensor,
    suffix_v: &Tensor,
    opts: &AttnOptions,
) -> Result<Tensor> {
    Ok(shared_prefix_attention_with_lse(q, levels, suffix_k, suffix_v, opts)?.0)
}

/// As [`shared_prefix_attention`], also returning the log-sum-exp `(b, hq, sq)` over the whole
/// concatenation (f32, differentiable, `-inf` for a row that sees no key).
pub fn shared_prefix_attention_with_lse(
    q: &Tensor,
    levels: &[PrefixLevel],
    suffix_k: &Tensor,
    suffix_v: &Tensor,
    opts: &AttnOptions,
) -> Result<(Tensor, Tensor)> {
    check(q, levels, suffix_k, opts)?;
    let mut outs = Vec::with_capacity(levels.len() + 1);
    let mut lses = Vec::with_capacity(levels.len() + 1);
    let prefix_opts = AttnOptions {
        causal: false,
        key_lengths: None,
        ..opts.clone()
    };
    for level in levels.iter().filter(|l| l.k.dim(1).is_ok_and(|n| n > 0)) {
        let (o, l) = attend_level(q, level, &prefix_opts)?;
        outs.push(o);
        lses.push(l);
    }
    if suffix_k.dim(1)? > 0 || outs.is_empty() {
        let (o, l) = flash_attn_with_lse(q, suffix_k, suffix_v, opts)?;
        outs.push(o);
        lses.push(l);
    }
    if outs.len() == 1 {
        return Ok((outs.remove(0), lses.remove(0)));
    }
    merge_attention_states(&outs, &lses)
}

/// One level: the sequences of each group stacked into one query block (ordered by group, a
/// gather of q only when they are not already) against the group's K/V, as one varlen call.
/// The K/V are reshaped to `(n_groups·len, hk, d)`: a view when they are contiguous (a KV cache
/// narrowed along `len` is copied once here).
fn attend_level(q: &Tensor, level: &PrefixLevel, opts: &AttnOptions) -> Result<(Tensor, Tensor)> {
    let (b, sq, hq, d) = q.dims4()?;
    let (n_groups, len, hk, _) = level.k.dims4()?;
    let mut order: Vec<usize> = (0..b).collect();
    order.sort_by_key(|&s| level.groups[s]);
    let sorted = order.iter().enumerate().all(|(i, &s)| i == s);
    let dev = q.device();
    let mut cu_q = vec![0u32; n_groups + 1];
    for &g in &level.groups {
        cu_q[g + 1] += sq as u32;
    }
    let mut max_q = 0;
    for g in 0..n_groups {
        max_q = max_q.max(cu_q[g + 1] as usize);
        cu_q[g + 1] += cu_q[g];
    }
    let cu_k: Vec<u32> = (0..=n_groups).map(|g| (g * len) as u32).collect();
    let varlen = Varlen::new(
        &Tensor::new(cu_q, dev)?,
        &Tensor::new(cu_k, dev)?,
        max_q,
        len,
    );
    let index = Tensor::new(order.iter().map(|&s| s as u32).collect::<Vec<_>>(), dev)?;
    let q_rows = if sorted {
        q.clone()
    } else {
        q.index_select(&index, 0)?
    };
    let (o, lse) = flash_attn_varlen_with_lse(
        &q_rows.reshape((b * sq, hq, d))?,
        &level.k.reshape((n_groups * len, hk, d))?,
        &level.v.reshape((n_groups * len, hk, d))?,
        &varlen,
        opts,
    )?;
    let (o, lse) = (o.reshape((b, sq, hq, d))?, lse.reshape((hq, b, sq))?);
    let (o, lse) = if sorted {
        (o, lse)
    } else {
        let mut inverse = vec![0u32; b];
        for (i, &s) in order.iter().enumerate() {
            inverse[s] = i as u32;
        }
        let inverse = Tensor::new(inverse, dev)?;
        (o.index_select(&inverse, 0)?, lse.index_select(&inverse, 1)?)
    };
    Ok((o, lse.transpose(0, 1)?.contiguous()?))
}

/// Shapes and options. The attention calls check everything else (dtypes,
/// devices, heads, head_dim) themselves.
fn check(q: &Tensor, levels: &[PrefixLevel], suffix_k: &Tensor, opts: &AttnOptions) -> Result<()> {
    let (b, sq) = match q.dims() {
        [b, sq, _, _] => (*b, *sq),
        s => bail!("shared_prefix_attention: `q` must be (b, sq, hq, d), got {s:?}"),
    };
    if opts.window_left.is_some() || opts.window_right.is_some() {
        bail!("shared_prefix_attention: sliding windows are not supported (a key's window position changes when the keys are split)")
    }
    if opts.block_mask.is_some() {
        bail!("shared_prefix_attention: `block_mask` is not supported (its key blocks are positions in one key sequence, which the levels split)")
    }
    if opts.alibi_slopes.is_some() {
        bail!("shared_prefix_attention: ALiBi is not supported (its bias depends on key positions across the split)")
    }
    if opts.dropout.is_some_and(|d| d.p > 0.0) {
        bail!("shared_prefix_attention: dropout is not supported (each part would draw its own mask, not the dense attention's)")
    }
    if suffix_k.rank() != 4 || suffix_k.dim(0)? != b {
        bail!(
            "shared_prefix_attention: `suffix_k` must be (b = {b}, ss, hk, d), got {:?}",
            suffix_k.dims()
        )
    }
    for (i, l) in levels.iter().enumerate() {
        if l.k.rank() != 4 || l.k.dims() != l.v.dims() {
            bail!(
                "shared_prefix_attention: level {i} `k` and `v` must be one shape (n_groups, len, hk, d), got {:?} and {:?}",
                l.k.dims(),
                l.v.dims()
            )
        }
        let n_groups = l.k.dim(0)?;
        if l.groups.len() != b {
            bail!(
                "shared_prefix_attention: level {i} `groups` must have one entry per sequence ({b}), got {}",
                l.groups.len()
            )
        }
        if let Some(g) = l.groups.iter().find(|&&g| g >= n_groups) {
            bail!("shared_prefix_attention: level {i} `groups` entries must be < n_groups {n_groups}, got {g}")
        }
        if l.k.dtype() != q.dtype() || l.v.dtype() != q.dtype() {
            bail!(
                "shared_prefix_attention: level {i} dtype {:?} must match `q` dtype {:?}",
                l.k.dtype(),
                q.dtype()
            )
        }
    }
    if opts.causal && sq > 1 {
        let ss = suffix_k.dim(1)?;
        let lengths = opts.key_lengths.clone().unwrap_or_else(|| vec![ss; b]);
        if let Some((s, &n)) = lengths.iter().enumerate().find(|(_, &n)| n + 1 < sq) {
            bail!(
                "shared_prefix_attention: causal needs every suffix to have at least sq - 1 = {} keys (else part of the prefix is masked), sequence {s} has {n}",
                sq - 1
            )
        }
    }
    Ok(())
}
