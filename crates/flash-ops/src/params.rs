//! Argument checking and the resolved problem description shared by every backend.
//!
//! Every public entry point goes through [`AttnParams::dense`] or [`AttnParams::varlen`], so each
//! backend receives a problem that is already known to be well formed: the kernels never re-check
//! shapes.

use candle_core::{bail, DType, Device, DeviceLocation, Result, Tensor, D};

use crate::dropout::DropoutMask;
use crate::options::{AttnOptions, Dropout, Varlen};
use crate::{Algorithm, BlockMask};

/// Largest head dimension any backend supports (FlashAttention-2's limit).
pub const MAX_HEAD_DIM: usize = 256;

/// One sequence of the batch: where its rows start and how many there are, for queries and keys.
///
/// Dense inputs `(batch, seq, heads, d)` have `q_start = k_start = 0` and a per-batch stride;
/// varlen inputs `(total, heads, d)` put every sequence in one token axis with starts taken from
/// `cu_seqlens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqSpan {
    pub q_start: usize,
    pub q_len: usize,
    pub k_start: usize,
    pub k_len: usize,
}

impl SeqSpan {
    /// Offset that aligns the causal/window diagonal to the bottom right: `sk - sq`.
    pub fn diag_offset(&self) -> i64 {
        self.k_len as i64 - self.q_len as i64
    }
}

/// How the sequences lie in the tensors. Everything that differs between dense and varlen
/// inputs is answered here, so no backend matches on the layout itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqLayout {
    /// `(batch, seq, heads, d)`, every sequence padded to `sq` queries and `sk` keys.
    Dense { sq: usize, sk: usize },
    /// `(total_tokens, heads, d)`: every sequence at its `cu_seqlens` start in one token axis.
    Varlen,
}

impl SeqLayout {
    /// Index along an input's first axis where sequence `seq` begins: its batch entry (dense)
    /// or its first token `token_start` (varlen).
    pub fn first_row(self, seq: usize, token_start: usize) -> usize {
        match self {
            SeqLayout::Dense { .. } => seq,
            SeqLayout::Varlen => token_start,
        }
    }

    /// Shape of the output: `(b, sq, hq, d)` dense, `(total_q, hq, d)` varlen.
    pub fn out_dims(self, batch: usize, total_q: usize, heads_q: usize, d: usize) -> Vec<usize> {
        match self {
            SeqLayout::Dense { sq, .. } => vec![batch, sq, heads_q, d],
            SeqLayout::Varlen => vec![total_q, heads_q, d],
        }
    }

    /// Shape of the log-sum-exp: `(b, hq, sq)` dense, `(hq, total_q)` varlen.
    pub fn lse_dims(self, batch: usize, total_q: usize, heads_q: usize) -> Vec<usize> {
        match self {
            SeqLayout::Dense { sq, .. } => vec![batch, heads_q, sq],
            SeqLayout::Varlen => vec![heads_q, total_q],
        }
    }

    /// Distance between two query heads' rows in the log-sum-exp layout.
    pub fn lse_head_stride(self, total_q: usize) -> usize {
        match self {
            SeqLayout::Dense { sq, .. } => sq,
            SeqLayout::Varlen => total_q,
        }
    }

    /// Where row 0 of head 0 of sequence `seq` (first token `q_start`) is in the log-sum-exp.
    pub fn lse_seq_offset(self, seq: usize, heads_q: usize, q_start: usize) -> usize {
        match self {
            SeqLayout::Dense { sq, .. } => seq * heads_q * sq,
            SeqLayout::Varlen => q_start,
        }
    }
}

/// The fully resolved problem: what every backend kernel needs, nothing it has to re-derive.
#[derive(Debug, Clone)]
pub struct AttnParams {
    pub heads_q: usize,
    pub heads_k: usize,
    pub head_dim: usize,
    pub seqs: Vec<SeqSpan>,
    pub layout: SeqLayout,
    /// Rows of the q (and output) token axis and of the k/v token axis, over the whole batch.
    pub total_q: usize,
    pub total_k: usize,
    pub scale: f32,
    pub softcap: Option<f32>,
    pub window_left: Option<usize>,
    /// Causal is folded in here as `Some(0)` (or the smaller of it and the user's bound).
    pub window_right: Option<usize>,
    /// One slope per (sequence, query head), already broadcast.
    pub alibi: Option<Vec<f32>>,
    pub dropout: Option<Dropout>,
    pub algorithm: Algorithm,
    pub deterministic: bool,
    /// The log-sum-exp is returned with a gradient: the op's output carries `lse_len` more
    /// elements after the attention output, through which backward receives `dlse` (see `op`).
    pub lse_grad: bool,
    /// Block-sparse attention: the blocks to visit, already checked against the call.
    pub block_mask: Option<BlockMask>,
}

/// The error for an input on another device than `q` (a function so it can be tested on a
/// machine with one device).
pub fn device_mismatch(name: &str, got: DeviceLocation, q: DeviceLocation) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "flash_attn: `{name}` is on {got:?} but `q` is on {q:?}; all inputs must share one device"
    ))
}

fn check_qkv(q: &Tensor, k: &Tensor, v: &Tensor, rank: usize) -> Result<()> {
    let layout = if rank == 4 {
        "(batch, seq, heads, head_dim)"
    } else {
        "(total_tokens, heads, head_dim)"
    };
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        if t.rank() != rank {
            bail!(
                "flash_attn: `{name}` must have rank {rank} {layout}, got shape {:?}",
                t.dims()
            )
        }
    }
    // Which dtypes a backend runs is checked by the caller: the reference also takes f64.
    let dtype = q.dtype();
    for (name, t) in [("k", k), ("v", v)] {
        if t.dtype() != dtype {
            bail!(
                "flash_attn: `{name}` dtype {:?} must match `q` dtype {dtype:?}",
                t.dtype()
            )
        }
        if !t.device().same_device(q.device()) {
            return Err(device_mismatch(
                name,
                t.device().location(),
                q.device().location(),
            ));
        }
    }
    if k.dims() != v.dims() {
        bail!(
            "flash_attn: `k` and `v` must have the same shape, got {:?} and {:?}",
            k.dims(),
            v.dims()
        )
    }
    let d = q.dim(rank - 1)?;
    if d == 0 || d > MAX_HEAD_DIM {
        bail!("flash_attn: head_dim must be in 1..={MAX_HEAD_DIM}, got {d}")
    }
    if k.dim(rank - 1)? != d {
        bail!(
            "flash_attn: `k` head_dim {} must equal `q` head_dim {d}",
            k.dim(rank - 1)?
        )
    }
    let (hq, hk) = (q.dim(rank - 2)?, k.dim(rank - 2)?);
    if hq == 0 || hk == 0 || hq % hk != 0 {
        bail!(
            "flash_attn: `q` heads ({hq}) must be a non-zero multiple of `k`/`v` heads ({hk}) for GQA/MQA"
        )
    }
    Ok(())
}

fn read_cu_seqlens(name: &str, t: &Tensor, total: usize, max_len: usize) -> Result<Vec<usize>> {
    if t.rank() != 1 || t.dim(0)? < 2 {
        bail!(
            "flash_attn_varlen: `{name}` must be a 1-D tensor of batch+1 offsets, got shape {:?}",
            t.dims()
        )
    }
    if !matches!(t.dtype(), DType::U32 | DType::I64) {
        bail!(
            "flash_attn_varlen: `{name}` must be u32 (or i64), got {:?}",
            t.dtype()
        )
    }
    let cu: Vec<i64> = t.to_dtype(DType::I64)?.to_vec1()?;
    if cu[0] != 0 {
        bail!("flash_attn_varlen: `{name}` must start at 0, got {}", cu[0])
    }
    for w in cu.windows(2) {
        if w[1] < w[0] {
            bail!("flash_attn_varlen: `{name}` must be non-decreasing, got {cu:?}")
        }
        if (w[1] - w[0]) as usize > max_len {
            bail!(
                "flash_attn_varlen: `{name}` has a sequence of length {} above its max_seqlen {max_len}",
                w[1] - w[0]
            )
        }
    }
    let last = *cu.last().unwrap_or(&0) as usize;
    if last != total {
        bail!("flash_attn_varlen: `{name}` must end at the token count {total}, got {last}")
    }
    Ok(cu.into_iter().map(|c| c as usize).collect())
}

impl AttnParams {
    /// Dense inputs: q `(b, sq, hq, d)`, k and v `(b, sk, hk, d)`.
    pub fn dense(q: &Tensor, k: &Tensor, v: &Tensor, opts: &AttnOptions) -> Result<Self> {
        check_qkv(q, k, v, 4)?;
        let (b, sq, _, _) = q.dims4()?;
        let (bk, sk, _, _) = k.dims4()?;
        if bk != b {
            bail!("flash_attn: `k` batch {bk} must equal `q` batch {b}")
        }
        let key_lengths = match &opts.key_lengths {
            None => vec![sk; b],
            Some(l) => {
                if l.len() != b {
                    bail!(
                        "flash_attn: `key_lengths` must have one entry per batch element ({b}), got {}",
                        l.len()
                    )
                }
                if let Some(bad) = l.iter().find(|&&n| n > sk) {
                    bail!("flash_attn: `key_lengths` entries must be <= seqlen_k {sk}, got {bad}")
                }
                l.clone()
            }
        };
        let seqs = key_lengths
            .iter()
            .enumerate()
            .map(|(i, &k_len)| SeqSpan {
                q_start: i * sq,
                q_len: sq,
                k_start: i * sk,
                k_len,
            })
            .collect();
        Self::finish(q, k, seqs, SeqLayout::Dense { sq, sk }, (sq, sk), opts)
    }

    /// Varlen inputs: q `(total_q, hq, d)`, k and v `(total_k, hk, d)`, sequences delimited by
    /// `varlen`'s offsets.
    pub fn varlen(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        varlen: &Varlen,
        opts: &AttnOptions,
    ) -> Result<Self> {
        check_qkv(q, k, v, 3)?;
        let (tq, tk) = (q.dim(0)?, k.dim(0)?);
        let cu_q = read_cu_seqlens(
            "cu_seqlens_q",
            &varlen.cu_seqlens_q,
            tq,
            varlen.max_seqlen_q,
        )?;
        let cu_k = read_cu_seqlens(
            "cu_seqlens_k",
            &varlen.cu_seqlens_k,
            tk,
            varlen.max_seqlen_k,
        )?;
        if cu_q.len() != cu_k.len() {
            bail!(
                "flash_attn_varlen: `cu_seqlens_q` ({}) and `cu_seqlens_k` ({}) must have the same length",
                cu_q.len(),
                cu_k.len()
            )
        }
        let seqs = (0..cu_q.len() - 1)
            .map(|i| SeqSpan {
                q_start: cu_q[i],
                q_len: cu_q[i + 1] - cu_q[i],
                k_start: cu_k[i],
                k_len: cu_k[i + 1] - cu_k[i],
            })
            .collect();
        let max_lens = (varlen.max_seqlen_q, varlen.max_seqlen_k);
        Self::finish(q, k, seqs, SeqLayout::Varlen, max_lens, opts)
    }

    /// The options resolved against already checked q and k (heads and head_dim are their last
    /// two axes, the token rows everything before); `lens` are the lengths a block mask must
    /// have (dense `(sq, sk)`, varlen the `max_seqlen`s).
    fn finish(
        q: &Tensor,
        k: &Tensor,
        seqs: Vec<SeqSpan>,
        layout: SeqLayout,
        lens: (usize, usize),
        opts: &AttnOptions,
    ) -> Result<Self> {
        let (heads_q, head_dim) = (q.dim(D::Minus2)?, q.dim(D::Minus1)?);
        let heads_k = k.dim(D::Minus2)?;
        let total_q = q.elem_count() / (heads_q * head_dim);
        let total_k = k.elem_count() / (heads_k * head_dim);
        let scale = opts.softmax_scale.unwrap_or(1.0 / (head_dim as f32).sqrt());
        if !scale.is_finite() {
            bail!("flash_attn: `softmax_scale` must be finite, got {scale}")
        }
        let softcap = match opts.softcap {
            Some(c) if !(c.is_finite() && c >= 0.0) => {
                bail!("flash_attn: `softcap` must be a finite value >= 0 (0 disables it), got {c}")
            }
            Some(c) if c > 0.0 => Some(c),
            _ => None,
        };
        let dropout = match opts.dropout {
            Some(dp) if !(0.0..1.0).contains(&dp.p) => {
                bail!("flash_attn: dropout `p` must be in [0, 1), got {}", dp.p)
            }
            Some(dp) if dp.p > 0.0 => Some(dp),
            _ => None,
        };
        // Causal is the window (unbounded, 0): one masking path serves both.
        let window_right = if opts.causal {
            Some(0)
        } else {
            opts.window_right
        };
        let batch = seqs.len();
        let alibi = match &opts.alibi_slopes {
            None => None,
            Some(s) => Some(read_alibi(s, batch, heads_q)?),
        };
        if let Some(m) = &opts.block_mask {
            check_block_mask(m, lens, batch, heads_q)?;
        }
        Ok(Self {
            heads_q,
            heads_k,
            head_dim,
            seqs,
            layout,
            total_q,
            total_k,
            scale,
            softcap,
            window_left: opts.window_left,
            window_right,
            alibi,
            dropout,
            algorithm: opts.algorithm,
            deterministic: opts.deterministic,
            lse_grad: false,
            block_mask: opts.block_mask.clone(),
        })
    }

    pub fn batch(&self) -> usize {
        self.seqs.len()
    }

    /// Query heads that share one k/v head (GQA group size).
    pub fn group(&self) -> usize {
        self.heads_q / self.heads_k
    }

    /// The dropout mask of (sequence, query head), when dropout is on.
    pub fn dropout_mask(&self, seq: usize, head_q: usize) -> Option<DropoutMask> {
        self.dropout
            .map(|dp| DropoutMask::new(dp.p, dp.seed, seq, self.heads_q, head_q))
    }

    pub fn alibi_slope(&self, seq: usize, head_q: usize) -> Option<f32> {
        self.alibi.as_ref().map(|a| a[seq * self.heads_q + head_q])
    }

    /// Shape of the output, the inputs' layout with q's heads and head_dim.
    pub fn out_dims(&self) -> Vec<usize> {
        let (b, tq, hq, d) = (self.batch(), self.total_q, self.heads_q, self.head_dim);
        self.layout.out_dims(b, tq, hq, d)
    }

    /// Shape of the log-sum-exp: `(b, hq, sq)` dense, `(hq, total_q)` varlen.
    pub fn lse_dims(&self) -> Vec<usize> {
        self.layout
            .lse_dims(self.batch(), self.total_q, self.heads_q)
    }

    /// Distance between two query heads' rows in the log-sum-exp layout.
    pub fn lse_head_stride(&self) -> usize {
        self.layout.lse_head_stride(self.total_q)
    }

    /// Where row 0 of head 0 of sequence `seq` is in the log-sum-exp layout.
    pub fn lse_seq_offset(&self, seq: usize) -> usize {
        self.layout
            .lse_seq_offset(seq, self.heads_q, self.seqs[seq].q_start)
    }

    /// Index of the statistic of (sequence, head, row) in the log-sum-exp layout.
    pub fn lse_index(&self, seq: usize, head_q: usize, row: usize) -> usize {
        self.lse_seq_offset(seq) + head_q * self.lse_head_stride() + row
    }

    /// Rows of the log-sum-exp (padding rows of a dense batch included).
    pub fn lse_len(&self) -> usize {
        self.heads_q * self.total_q
    }

    /// Length of what forward saves for backward: the log-sum-exp (V2) or `m ‖ l` (V1).
    pub fn stats_len(&self) -> usize {
        match self.algorithm {
            Algorithm::V2 => self.lse_len(),
            Algorithm::V1 => 2 * self.lse_len(),
        }
    }

    /// Elements of q, the output and dq (contiguous `(total_q, hq, d)`).
    pub fn q_elems(&self) -> usize {
        self.total_q * self.heads_q * self.head_dim
    }

    /// Elements of the op's output buffer: the attention output, then (with `lse_grad`) the
    /// zeroed slot whose gradient is `dlse`.
    pub fn out_len(&self) -> usize {
        self.q_elems() + if self.lse_grad { self.lse_len() } else { 0 }
    }

    /// Elements of k, v, dk and dv (contiguous `(total_k, hk, d)`).
    pub fn k_elems(&self) -> usize {
        self.total_k * self.heads_k * self.head_dim
    }
}

/// A block mask fits the call: its lengths are the call's (varlen: the `max_seqlen`s, each
/// sequence using the top-left part), its batch and heads are 1 (broadcast) or the call's.
fn check_block_mask(
    m: &BlockMask,
    (sq, sk): (usize, usize),
    batch: usize,
    heads_q: usize,
) -> Result<()> {
    if (m.q_len(), m.k_len()) != (sq, sk) {
        bail!(
            "flash_attn: `block_mask` was built for (q_len, k_len) = ({}, {}), the call has ({sq}, {sk}) (varlen: max_seqlen_q, max_seqlen_k)",
            m.q_len(),
            m.k_len()
        )
    }
    if m.batch() != 1 && m.batch() != batch {
        bail!(
            "flash_attn: `block_mask` batch must be 1 (broadcast) or the batch size {batch}, got {}",
            m.batch()
        )
    }
    if m.heads() != 1 && m.heads() != heads_q {
        bail!(
            "flash_attn: `block_mask` heads must be 1 (broadcast) or the query heads {heads_q}, got {}",
            m.heads()
        )
    }
    Ok(())
}

fn read_alibi(slopes: &Tensor, batch: usize, heads_q: usize) -> Result<Vec<f32>> {
    if slopes.dtype() != DType::F32 {
        bail!(
            "flash_attn: `alibi_slopes` must be f32, got {:?}",
            slopes.dtype()
        )
    }
    let host = slopes.to_device(&Device::Cpu)?;
    match slopes.dims() {
        [h] if *h == heads_q => {
            let s: Vec<f32> = host.to_vec1()?;
            Ok((0..batch).flat_map(|_| s.iter().copied()).collect())
        }
        [b, h] if *b == batch && *h == heads_q => Ok(host.flatten_all()?.to_vec1()?),
        dims => bail!(
            "flash_attn: `alibi_slopes` must have shape ({heads_q}) or ({batch}, {heads_q}), got {dims:?}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_mismatch_message_names_both_devices() {
        use candle_core::DeviceLocation;
        let e = device_mismatch("k", DeviceLocation::Cuda { gpu_id: 0 }, DeviceLocation::Cpu);
        let msg = e.to_string();
        for n in ["`k`", "Cuda", "Cpu", "share one device"] {
            assert!(msg.contains(n), "{msg}");
        }
    }
}
