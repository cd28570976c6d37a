//! What the two launch plans share: the element type, where each input's rows are, the
//! per-sequence records the kernels index by sequence, and the parameter fields both kernel
//! headers declare alike.

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
    /// The layout of input `name`, which must have a unit stride on head_dim (the kernels read
    /// rows as contiguous vectors).
    pub fn checked(name: &str, l: &Layout, head_dim: usize) -> Result<Self> {
        if l.stride().last() != Some(&1) && head_dim > 1 {
            bail!(
                "flash_attn: `{name}` must have unit stride on head_dim, got strides {:?}",
                l.stride()
            )
        }
        Ok(Self::from(l))
    }
    pub fn tok_stride(&self) -> usize {
        self.stride[self.stride.len() - 3]
    }
    pub fn head_stride(&self) -> usize {
        self.stride[self.stride.len() - 2]
    }
    /// Element offset of row 0, head 0 of sequence `s`, whose first token is `token_start`.
    pub fn seq_base(&self, p: &AttnParams, s: usize, token_start: usize) -> usize {
        self.start + p.layout.first_row(s, token_start) * self.stride[0]
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
        out.extend_from_slice(&[
            span.q_len as i64,
            span.k_len as i64,
            q.seq_base(p, s, span.q_start) as i64,
            k.seq_base(p, s, span.k_start) as i64,
            v.seq_base(p, s, span.k_start) as i64,
            (span.q_start * hq * d) as i64,
            p.lse_seq_offset(s) as i64,
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

/// The dropout fields of both parameter structs: `(has_dropout, threshold, keep scale, seed)`,
/// from the one [`crate::Dropout`] rule; off is `(0, 0, 1, 0)`.
pub fn dropout_fields(p: &AttnParams) -> (i32, u32, f32, u64) {
    match p.dropout {
        Some(dp) => (1, dp.threshold(), dp.keep_scale(), dp.seed),
        None => (0, 0, 1.0, 0),
    }
}

/// `FlashMaskDims` (kernels/cuda/flash_params.h) and the mask fields of `MetalFlashParams`:
/// where each list of a [`crate::BlockMask`] lies in the one `u32` buffer the kernels read
/// (word offsets), and the mask's extents. All zero without a mask.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct MaskDims {
    /// Word offsets of the lists `kv_start`, `kv_block`, `kv_bits`, `q_start`, `q_block`,
    /// `q_bits`, `bits`, in this order.
    pub lists: [u32; 7],
    /// Query / key blocks per sequence.
    pub qb: i32,
    pub kb: i32,
    /// The mask's batch and heads (1: broadcast).
    pub batch: i32,
    pub heads: i32,
    pub bq: i32,
    pub bk: i32,
    /// Words per bit row of a partial block, `ceil(bk / 32)`.
    pub wpr: i32,
    /// 1 with a mask (Metal, whose mask buffer is always bound; CUDA tests the pointer).
    pub on: i32,
    pub pad: i32,
}

/// The block mask of `p` as the kernels take it: its [`MaskDims`] and the buffer to upload
/// once per call (the lists of `BlockMask::lists`, as they are, one after another); `None`
/// without a mask. The kernels need the block size to be a multiple of every tile they cut it
/// into, `multiple` = (query, key); `who` names the kernels in the error.
pub fn block_mask(
    p: &AttnParams,
    multiple: (usize, usize),
    who: &str,
) -> Result<Option<(MaskDims, Vec<u32>)>> {
    let Some(m) = &p.block_mask else {
        return Ok(None);
    };
    let l = m.lists();
    let (bq, bk) = l.block;
    if !bq.is_multiple_of(multiple.0) || !bk.is_multiple_of(multiple.1) {
        bail!(
            "flash_attn: `block_mask` block size ({bq}, {bk}) must be multiples of ({}, {}) on {who}",
            multiple.0,
            multiple.1
        )
    }
    let parts = [
        l.kv_start, l.kv_block, l.kv_bits, l.q_start, l.q_block, l.q_bits, l.bits,
    ];
    let total: usize = parts.iter().map(|x| x.len()).sum();
    if total > u32::MAX as usize {
        bail!(
            "flash_attn: `block_mask` lists hold {total} words, more than the kernels index (2^32)"
        )
    }
    let mut buf = Vec::with_capacity(total);
    let mut offs = [0u32; 7];
    for (o, part) in offs.iter_mut().zip(parts) {
        *o = buf.len() as u32;
        buf.extend_from_slice(part);
    }
    let dims = MaskDims {
        lists: offs,
        qb: l.q_blocks as i32,
        kb: l.k_blocks as i32,
        batch: l.batch as i32,
        heads: l.heads as i32,
        bq: bq as i32,
        bk: bk as i32,
        wpr: l.words_per_row as i32,
        on: 1,
        pad: 0,
    };
    Ok(Some((dims, buf)))
}

/// The least common multiple of tile sizes (the block-size multiple a mask needs).
pub fn lcm(a: usize, b: usize) -> usize {
    let gcd = |mut x: usize, mut y: usize| {
        while y != 0 {
            (x, y) = (y, x % y);
        }
        x
    };
    a / gcd(a, b) * b
}

/// The block of 64-bit strides and lengths that `FlashParams` (CUDA) and `MetalFlashParams`
/// (Metal) both declare, in the same order: element strides of q, k, v (token, head), of the
/// contiguous outputs, and of the statistics. Eight-byte fields at an eight-byte offset in both,
/// so nesting it leaves the C layout unchanged.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Strides {
    pub q_tok_stride: i64,
    pub q_head_stride: i64,
    pub k_tok_stride: i64,
    pub k_head_stride: i64,
    pub v_tok_stride: i64,
    pub v_head_stride: i64,
    /// `heads_q * head_dim`: o, d_o and dq are contiguous `(total_q, hq, d)`.
    pub o_tok_stride: i64,
    /// `heads_k * head_dim`: dk and dv are contiguous `(total_k, hk, d)`.
    pub dk_tok_stride: i64,
    pub lse_head_stride: i64,
    pub lse_len: i64,
}

impl Strides {
    pub fn new(p: &AttnParams, [q, k, v]: [&InputLayout; 3]) -> Self {
        Self {
            q_tok_stride: q.tok_stride() as i64,
            q_head_stride: q.head_stride() as i64,
            k_tok_stride: k.tok_stride() as i64,
            k_head_stride: k.head_stride() as i64,
            v_tok_stride: v.tok_stride() as i64,
            v_head_stride: v.head_stride() as i64,
            o_tok_stride: (p.heads_q * p.head_dim) as i64,
            dk_tok_stride: (p.heads_k * p.head_dim) as i64,
            lse_head_stride: p.lse_head_stride() as i64,
            lse_len: p.lse_len() as i64,
        }
    }
}

/// Builds `$ty { .. }` with the fields `FlashParams` (CUDA) and `MetalFlashParams` (Metal)
/// declare alike — strides, sizes, window, scale, softcap, dropout — filled from
/// `$p: &AttnParams` and the `$q`, `$k`, `$v` [`InputLayout`]s, plus the `$extra` fields.
macro_rules! shared_params {
    ($ty:ident, $p:expr, [$q:expr, $k:expr, $v:expr], { $($extra:tt)* }) => {{
        let p: &$crate::plan::AttnParams = $p;
        let (has_dropout, dropout_threshold, dropout_scale, seed) = $crate::plan::layout::dropout_fields(p);
        $ty {
            strides: $crate::plan::Strides::new(p, [$q, $k, $v]),
            batch: p.batch() as i32,
            heads_q: p.heads_q as i32,
            heads_k: p.heads_k as i32,
            head_dim: p.head_dim as i32,
            window_left: $crate::plan::window_bound(p.window_left),
            window_right: $crate::plan::window_bound(p.window_right),
            scale: p.scale,
            softcap: p.softcap.unwrap_or(0.0),
            has_dropout,
            dropout_threshold,
            dropout_scale,
            seed_lo: seed as u32,
            seed_hi: (seed >> 32) as u32,
            $($extra)*
        }
    }};
}
pub(crate) use shared_params;
