//! What the two launch plans share: the element type, where each input's rows are, and the
//! per-sequence records the kernels index by sequence.

use candle_core::{bail, DType, Layout, Result};

use crate::params::AttnParams;

/// Element type of q, k, v and the outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dt {
    F32,
    F16,
    Bf16,
}

impl Dt {
    pub fn name(self) -> &'static str {
        match self {
            Dt::F32 => "f32",
            Dt::F16 => "f16",
            Dt::Bf16 => "bf16",
        }
    }
    /// The kernels' element type for a tensor dtype; `who` names the backend in the error.
    pub fn of(d: DType, who: &str) -> Result<Self> {
        Ok(match d {
            DType::F32 => Dt::F32,
            DType::F16 => Dt::F16,
            DType::BF16 => Dt::Bf16,
            d => bail!("flash_attn: {who} takes f32, f16 or bf16, got {d:?}"),
        })
    }
    pub fn size(self) -> usize {
        match self {
            Dt::F32 => 4,
            _ => 2,
        }
    }
}

/// Where an input's rows are: start offset and strides in elements, as Candle's layout gives
/// them. Rank 4 `(b, s, h, d)` or rank 3 `(t, h, d)`.
#[derive(Debug, Clone)]
pub struct InputLayout {
    pub start: usize,
    pub stride: Vec<usize>,
}

impl From<&Layout> for InputLayout {
    fn from(l: &Layout) -> Self {
        Self {
            start: l.start_offset(),
            stride: l.stride().to_vec(),
        }
    }
}

impl InputLayout {
    pub fn tok_stride(&self) -> usize {
        self.stride[self.stride.len() - 3]
    }
    pub fn head_stride(&self) -> usize {
        self.stride[self.stride.len() - 2]
    }
    /// Element offset of row 0, head 0 of sequence `s` (dense: batch-strided; varlen: the
    /// sequence's first token).
    pub fn seq_base(&self, p: &AttnParams, s: usize, token_start: usize) -> usize {
        match p.dense {
            Some(_) => self.start + s * self.stride[0],
            None => self.start + token_start * self.stride[0],
        }
    }
}

/// The longest query and key sequence of the batch (the grids' extents).
pub fn max_lens(p: &AttnParams) -> (usize, usize) {
    p.seqs
        .iter()
        .fold((0, 0), |(a, b), s| (a.max(s.q_len), b.max(s.k_len)))
}

/// `i64`s per sequence in [`seq_info`] (`SEQ_INFO_STRIDE` of the kernels' headers).
pub const SEQ_INFO_STRIDE: usize = 8;

/// The per-sequence records: q_len, k_len, q/k/v input offsets, o/dq offset, statistics offset,
/// dk/dv offset.
pub fn seq_info(p: &AttnParams, q: &InputLayout, k: &InputLayout, v: &InputLayout) -> Vec<i64> {
    let (hq, hk, d) = (p.heads_q, p.heads_k, p.head_dim);
    let mut out = Vec::with_capacity(p.batch() * SEQ_INFO_STRIDE);
    for (s, span) in p.seqs.iter().enumerate() {
        let lse_off = match p.dense {
            Some((sq, _)) => s * hq * sq,
            None => span.q_start,
        };
        out.extend_from_slice(&[
            span.q_len as i64,
            span.k_len as i64,
            q.seq_base(p, s, span.q_start) as i64,
            k.seq_base(p, s, span.k_start) as i64,
            v.seq_base(p, s, span.k_start) as i64,
            (span.q_start * hq * d) as i64,
            lse_off as i64,
            (span.k_start * hk * d) as i64,
        ]);
    }
    out
}

/// A window bound as the kernels take it: -1 unbounded, otherwise clamped to 2^30 so that
/// `i + diag + w + 1` cannot overflow an `int` (no sequence is that long).
pub fn window_bound(w: Option<usize>) -> i32 {
    w.map_or(-1, |w| w.min(1 << 30) as i32)
}
