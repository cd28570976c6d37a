//! Block-sparse attention masks (FlashAttention §3.3): which (query block × key block) tiles
//! attention visits at all.
//!
//! FlashAttention (Dao et al. 2022, §3.3) extends the tiled algorithm to a block mask: a tile
//! whose block is zero is skipped outright, so IO and time scale with the fraction of non-zero
//! blocks (the paper trains at 16K and 64K on Path-X / Path-256 with the butterfly pattern).
//! PyTorch's FlexAttention made the layout practical: per query block the list of key blocks to
//! visit (`kv_num_blocks` / `kv_indices`), each either *full* (every element visible: no
//! per-element masking) or *partial* (an element mask applies), and the transposed lists (per
//! key block, the query blocks that visit it) for the dK/dV sweep of backward. A [`BlockMask`]
//! is that layout, built once and shared (an `Arc`) by every call that uses it.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use flash_ops::{flash_attn, AttnOptions, BlockMask};
//!
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 256, 4, 32), &dev)?)?;
//! let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 256, 2, 32), &dev)?)?;
//! let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 256, 2, 32), &dev)?)?;
//! // 4 × 4 blocks of 64: butterfly lists 12 of them, all full.
//! let mask = BlockMask::butterfly(256, 256, (64, 64))?;
//! assert_eq!((mask.counts(), mask.density()), ((12, 0), 0.75));
//! // Combined with causal: the options' rule still applies inside the listed blocks.
//! let out = flash_attn(&q, &k, &v, &AttnOptions::new().causal(true).block_mask(mask))?;
//! let grads = out.sqr()?.sum_all()?.backward()?;
//! assert_eq!(grads.get(&k).expect("dk").dims(), &[1, 256, 2, 32]);
//! # Ok(())
//! # }
//! ```
//!
//! # Semantics
//! Element (b, h, i, j) — sequence b, *query* head h (GQA: mask heads are query heads), query
//! row i, key j, both counted from the start of the sequence — is visible iff the options' rule
//! (causal, window, key lengths) allows it AND block `(i / bq, j / bk)` is listed for
//! `(b, h, i / bq)` AND (the block is full OR bit `(i % bq, j % bk)` of its bitmask is set). A
//! mask with batch or heads 1 is broadcast. Everything else is unchanged: softcap, ALiBi,
//! dropout (the Philox counter stays on absolute `(seq, head, i, j)`, so a sparse run drops the
//! same weights as the dense one), the log-sum-exp and its gradient, varlen (the mask is sized
//! `max_seqlen_q × max_seqlen_k` and each sequence uses its top-left part). Rows that see no
//! key give output 0, `lse = -inf` and zero gradients, as without a mask.
//!
//! # Constructors
//! [`BlockMask::from_predicate`] evaluates an element predicate and finds empty / partial /
//! full blocks itself; [`BlockMask::from_block_layout`] takes a dense u8
//! `(heads or 1, q_blocks, k_blocks)` tensor (nonzero = full block); the named patterns —
//! [`causal`](BlockMask::causal), [`sliding_window`](BlockMask::sliding_window),
//! [`local_global`](BlockMask::local_global) (Longformer / BigBird),
//! [`strided`](BlockMask::strided) (Sparse Transformer) — are element predicates, so their edge
//! blocks are partial and interior ones full; [`butterfly`](BlockMask::butterfly) (the pattern
//! of FlashAttention §3.3) and [`random`](BlockMask::random) are block-level (all full).
//!
//! # Layout
//! [`BlockLists`] holds flat `u32` arrays the GPU backends upload as they are. Row
//! `r = (b'·H + h')·qb + q_block` (`b' = b` if the mask has a batch, else 0; likewise `h'`;
//! `qb = ceil(q_len / bq)`) owns `kv_start[r]..kv_start[r+1]` of `kv_block` (ascending key
//! blocks) and `kv_bits` (a partial block's id, or [`FULL`]); columns
//! `c = (b'·H + h')·kb + k_block` own the transposed `q_start` / `q_block` / `q_bits`. Partial
//! block `p` owns words `[p·bq·wpr, (p+1)·bq·wpr)` of `bits` (`wpr = ceil(bk / 32)` words per
//! block row; bit `c % 32` of word `c / 32`); bits past the lengths are 0. The CPU backend cuts
//! mask blocks into its tiles (no tile straddles two blocks), visits only listed blocks (row
//! lists in the V2 forward, transposed lists in the V1 forward and both backwards, so dQ stays
//! reduced in a fixed order), runs full blocks on its unmasked path, and runs a partial block
//! in 32-row strips narrowed to the columns its bits hold, its bits applied as one more vector
//! select in the fused softmax pass.
//!
//! # Checks and refusals
//! Block sizes must be positive multiples of 16 up to 1024 (checked by every constructor). The
//! CUDA and Metal backends refuse a mask for now (their list-walking kernels exist on a branch,
//! emulated, but the backward's register budget does not yet pass the nvcc spill gate). A call checks
//! the mask against its lengths (`sq` / `sk`, varlen `max_seqlen_q` / `max_seqlen_k`), batch
//! and query heads, with an error naming `block_mask`. Only [`crate::shared_prefix_attention`]
//! refuses a mask: it splits the keys into levels, and a mask's key blocks are positions in the
//! one key sequence the split breaks up.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use candle_core::{bail, DType, Device, Result, Tensor};

use crate::dropout::philox4x32_10;

/// The `kv_bits` / `q_bits` entry of a full block (no bitmask).
pub const FULL: u32 = u32::MAX;

/// Largest block side (a partial block's bits then fill 32 KiB words per block: 1024·32·4 B).
const MAX_BLOCK: usize = 1024;

/// A block-sparse attention mask; cheap to clone. See the [module docs](self) for the rule,
/// the layout and the refusals.
#[derive(Clone, Debug)]
pub struct BlockMask(Arc<Lists>);

/// The lists behind a [`BlockMask`] (owned).
struct Lists {
    q_len: usize,
    k_len: usize,
    block: (usize, usize),
    batch: usize,
    heads: usize,
    kv_start: Vec<u32>,
    kv_block: Vec<u32>,
    kv_bits: Vec<u32>,
    q_start: Vec<u32>,
    q_block: Vec<u32>,
    q_bits: Vec<u32>,
    bits: Vec<u32>,
}

impl fmt::Debug for Lists {
    // A summary: the lists of a long-context mask have millions of entries.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let partial = self.bits.len() / (self.block.0 * words_per_row(self.block.1)).max(1);
        f.debug_struct("BlockMask")
            .field("q_len", &self.q_len)
            .field("k_len", &self.k_len)
            .field("block", &self.block)
            .field("batch", &self.batch)
            .field("heads", &self.heads)
            .field("listed", &self.kv_block.len())
            .field("partial", &partial)
            .finish()
    }
}

/// The flat lists of a mask as the backends read them (see the [module docs](self) for the
/// layout). Not a stable API.
#[doc(hidden)]
#[derive(Clone, Copy, Debug)]
pub struct BlockLists<'a> {
    /// `(bq, bk)`.
    pub block: (usize, usize),
    /// `ceil(q_len / bq)`, `ceil(k_len / bk)`.
    pub q_blocks: usize,
    pub k_blocks: usize,
    /// 1 = broadcast over sequences / query heads.
    pub batch: usize,
    pub heads: usize,
    /// `ceil(bk / 32)`: words per row of a partial block's bitmask.
    pub words_per_row: usize,
    pub kv_start: &'a [u32],
    pub kv_block: &'a [u32],
    pub kv_bits: &'a [u32],
    pub q_start: &'a [u32],
    pub q_block: &'a [u32],
    pub q_bits: &'a [u32],
    pub bits: &'a [u32],
}

impl BlockLists<'_> {
    /// Which (batch, head) slot of the mask sequence `b`, query head `h` reads.
    fn slot(&self, b: usize, h: usize) -> usize {
        let b = if self.batch > 1 { b } else { 0 };
        let h = if self.heads > 1 { h } else { 0 };
        b * self.heads + h
    }

    /// Row index `r` of (sequence, query head, query block) into `kv_start`.
    pub fn row(&self, b: usize, h: usize, q_block: usize) -> usize {
        self.slot(b, h) * self.q_blocks + q_block
    }

    /// Column index `c` of (sequence, query head, key block) into `q_start`.
    pub fn col(&self, b: usize, h: usize, k_block: usize) -> usize {
        self.slot(b, h) * self.k_blocks + k_block
    }

    /// The listed key blocks of row `r`: `(key block, bits id or FULL)`, ascending.
    pub fn row_blocks(&self, r: usize) -> impl Iterator<Item = (usize, u32)> + '_ {
        self.listed(false, r)
    }

    /// The query blocks visiting column `c`: `(query block, bits id or FULL)`, ascending.
    pub fn col_blocks(&self, c: usize) -> impl Iterator<Item = (usize, u32)> + '_ {
        self.listed(true, c)
    }

    /// [`Self::row_blocks`] of row `i`, or with `transposed` [`Self::col_blocks`] of column `i`.
    pub fn listed(&self, transposed: bool, i: usize) -> impl Iterator<Item = (usize, u32)> + '_ {
        let (start, block, bits) = if transposed {
            (self.q_start, self.q_block, self.q_bits)
        } else {
            (self.kv_start, self.kv_block, self.kv_bits)
        };
        (start[i] as usize..start[i + 1] as usize).map(move |e| (block[e] as usize, bits[e]))
    }

    /// The `words_per_row` words of row `r` (in the block) of partial block `id`.
    pub fn bit_row(&self, id: u32, r: usize) -> &[u32] {
        let wpr = self.words_per_row;
        let o = (id as usize * self.block.0 + r) * wpr;
        &self.bits[o..o + wpr]
    }
}

fn words_per_row(bk: usize) -> usize {
    bk.div_ceil(32)
}

fn check_block((bq, bk): (usize, usize)) -> Result<()> {
    for (name, b) in [("bq", bq), ("bk", bk)] {
        if b == 0 || b % 16 != 0 || b > MAX_BLOCK {
            bail!(
                "BlockMask: block size `{name}` must be a positive multiple of 16 up to {MAX_BLOCK}, got {b} (block ({bq}, {bk}))"
            )
        }
    }
    Ok(())
}

/// `(ceil(q_len / bq), ceil(k_len / bk))`: the block rows and columns.
fn block_counts((q_len, k_len): (usize, usize), (bq, bk): (usize, usize)) -> (usize, usize) {
    (q_len.div_ceil(bq), k_len.div_ceil(bk))
}

/// A constructor's lengths and block size, checked; returns their [`block_counts`].
fn check_grid(q_len: usize, k_len: usize, block: (usize, usize)) -> Result<(usize, usize)> {
    check_block(block)?;
    if q_len == 0 || k_len == 0 {
        bail!("BlockMask: `q_len` and `k_len` must be positive, got ({q_len}, {k_len})")
    }
    Ok(block_counts((q_len, k_len), block))
}

/// What one listed block is while the lists are built: full, or partial with its bits.
enum Listed {
    Full,
    Partial(Vec<u32>),
}

impl Lists {
    /// The lists from each row's listed blocks, rows in `r` order (`rows.len() = B·H·qb`).
    fn build(
        (q_len, k_len): (usize, usize),
        block: (usize, usize),
        (batch, heads): (usize, usize),
        rows: Vec<Vec<(usize, Listed)>>,
    ) -> Self {
        let (qb, kb) = block_counts((q_len, k_len), block);
        let n: usize = rows.iter().map(Vec::len).sum();
        let (mut kv_start, mut kv_block, mut kv_bits) = (vec![0u32], vec![], vec![]);
        kv_block.reserve(n);
        kv_bits.reserve(n);
        let mut bits = Vec::new();
        let mut next_id = 0u32;
        for row in rows {
            for (c, listed) in row {
                kv_block.push(c as u32);
                kv_bits.push(match listed {
                    Listed::Full => FULL,
                    Listed::Partial(b) => {
                        bits.extend(b);
                        next_id += 1;
                        next_id - 1
                    }
                });
            }
            kv_start.push(kv_block.len() as u32);
        }
        // The transpose by counting sort: rows visited in ascending order, so each column's
        // query blocks come out ascending.
        let cols = batch * heads * kb;
        let mut counts = vec![0u32; cols + 1];
        for r in 0..batch * heads * qb {
            let slot = r / qb;
            for e in kv_start[r]..kv_start[r + 1] {
                counts[slot * kb + kv_block[e as usize] as usize + 1] += 1;
            }
        }
        for c in 0..cols {
            counts[c + 1] += counts[c];
        }
        let q_start = counts.clone();
        let (mut q_block, mut q_bits) = (vec![0u32; n], vec![0u32; n]);
        for r in 0..batch * heads * qb {
            let (slot, q) = (r / qb, r % qb);
            for e in kv_start[r] as usize..kv_start[r + 1] as usize {
                let c = slot * kb + kv_block[e] as usize;
                let at = counts[c] as usize;
                q_block[at] = q as u32;
                q_bits[at] = kv_bits[e];
                counts[c] += 1;
            }
        }
        Self {
            q_len,
            k_len,
            block,
            batch,
            heads,
            kv_start,
            kv_block,
            kv_bits,
            q_start,
            q_block,
            q_bits,
            bits,
        }
    }
}

/// A panic's message, for the error of a panicking predicate.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-string panic payload".to_string()
    }
}

impl BlockMask {
    fn from_rows(
        lens: (usize, usize),
        block: (usize, usize),
        slots: (usize, usize),
        rows: Vec<Vec<(usize, Listed)>>,
    ) -> Self {
        Self(Arc::new(Lists::build(lens, block, slots, rows)))
    }

    /// The block size the models and benchmarks use unless told otherwise.
    pub const DEFAULT_BLOCK: (usize, usize) = (128, 128);

    /// Evaluates `pred(b, h, i, j)` for every element of `batch × heads × q_len × k_len`
    /// (`batch`, `heads` 1 = broadcast): a block with no visible element is not listed, one
    /// with every element visible is full, any other partial with its bits. A panicking
    /// predicate is caught and returned as an error.
    pub fn from_predicate(
        q_len: usize,
        k_len: usize,
        block: (usize, usize),
        batch: usize,
        heads: usize,
        pred: impl Fn(usize, usize, usize, usize) -> bool,
    ) -> Result<Self> {
        check_grid(q_len, k_len, block)?;
        if batch == 0 || heads == 0 {
            bail!("BlockMask: `batch` and `heads` must be positive (1 = broadcast), got ({batch}, {heads})")
        }
        let built = catch_unwind(AssertUnwindSafe(|| {
            classify((q_len, k_len), block, (batch, heads), &pred)
        }));
        match built {
            Ok(rows) => Ok(Self::from_rows((q_len, k_len), block, (batch, heads), rows)),
            Err(payload) => bail!(
                "BlockMask::from_predicate: the predicate `pred` panicked: {}",
                panic_message(payload.as_ref())
            ),
        }
    }

    /// A dense block layout: u8 (candle's bool) of shape `(heads or 1, ceil(q_len / bq),
    /// ceil(k_len / bk))`; a nonzero entry lists its block as full.
    pub fn from_block_layout(
        layout: &Tensor,
        q_len: usize,
        k_len: usize,
        block: (usize, usize),
    ) -> Result<Self> {
        let (qb, kb) = check_grid(q_len, k_len, block)?;
        if layout.dtype() != DType::U8 {
            bail!(
                "BlockMask::from_block_layout: `layout` must be u8 (nonzero = listed), got {:?}",
                layout.dtype()
            )
        }
        let heads = match layout.dims() {
            &[h, a, b] if h > 0 && a == qb && b == kb => h,
            dims => bail!(
                "BlockMask::from_block_layout: `layout` must have shape (heads or 1, {qb}, {kb}) for q_len {q_len}, k_len {k_len}, block {block:?}, got {dims:?}"
            ),
        };
        let cells: Vec<u8> = layout.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        let rows = cells
            .chunks(kb)
            .map(|row| {
                let listed = row.iter().enumerate().filter(|(_, &x)| x != 0);
                listed.map(|(c, _)| (c, Listed::Full)).collect()
            })
            .collect();
        Ok(Self::from_rows((q_len, k_len), block, (1, heads), rows))
    }

    /// A broadcast pattern of `f(i' - j, i, j)`, `i' = i + k_len - q_len` (how far key `j` is
    /// behind the bottom-right aligned diagonal of row `i`).
    fn behind_diagonal(
        q_len: usize,
        k_len: usize,
        block: (usize, usize),
        f: impl Fn(i64, usize, usize) -> bool,
    ) -> Result<Self> {
        let diag = k_len as i64 - q_len as i64;
        Self::from_predicate(q_len, k_len, block, 1, 1, |_, _, i, j| {
            f(i as i64 + diag - j as i64, i, j)
        })
    }

    /// Causal, bottom-right aligned like [`crate::AttnOptions::causal`]: `j <= i + k_len - q_len`.
    pub fn causal(q_len: usize, k_len: usize, block: (usize, usize)) -> Result<Self> {
        Self::behind_diagonal(q_len, k_len, block, |d, _, _| d >= 0)
    }

    /// A sliding window on the same diagonal: `i' - left <= j <= i' + right`, `i' = i + k_len -
    /// q_len`.
    pub fn sliding_window(
        q_len: usize,
        k_len: usize,
        block: (usize, usize),
        left: usize,
        right: usize,
    ) -> Result<Self> {
        Self::behind_diagonal(q_len, k_len, block, |d, _, _| {
            -(right as i64) <= d && d <= left as i64
        })
    }

    /// Local + global attention (Longformer, Beltagy et al. 2020; BigBird, Zaheer et al. 2020):
    /// `|i' - j| <= window`, or `j < global` (global keys), or `i < global` (global queries).
    pub fn local_global(
        q_len: usize,
        k_len: usize,
        block: (usize, usize),
        window: usize,
        global: usize,
    ) -> Result<Self> {
        Self::behind_diagonal(q_len, k_len, block, |d, i, j| {
            d.unsigned_abs() <= window as u64 || j < global || i < global
        })
    }

    /// The Sparse Transformer's strided pattern (Child et al. 2019): `0 <= i' - j < local`, or
    /// `(i' - j) % stride == 0` with `j <= i'`. `stride` must be positive.
    pub fn strided(
        q_len: usize,
        k_len: usize,
        block: (usize, usize),
        local: usize,
        stride: usize,
    ) -> Result<Self> {
        if stride == 0 {
            bail!("BlockMask::strided: `stride` must be positive, got 0")
        }
        Self::behind_diagonal(q_len, k_len, block, |d, _, _| {
            d >= 0 && (d < local as i64 || d % stride as i64 == 0)
        })
    }

    /// Butterfly, at block level (FlashAttention §3.3, after Pixelated Butterfly, Dao et al.
    /// 2021): block `(r, c)` is listed, full, iff `r == c` or `r ^ c` is a power of two.
    pub fn butterfly(q_len: usize, k_len: usize, block: (usize, usize)) -> Result<Self> {
        let (qb, kb) = check_grid(q_len, k_len, block)?;
        let rows = (0..qb)
            .map(|r| {
                let listed = (0..kb).filter(|&c| r == c || (r ^ c).is_power_of_two());
                listed.map(|c| (c, Listed::Full)).collect()
            })
            .collect();
        Ok(Self::from_rows((q_len, k_len), block, (1, 1), rows))
    }

    /// Random whole blocks (full), per head: each query block keeps `round(density · k_blocks)`
    /// (at least 1) distinct key blocks, drawn from `seed` by Philox4x32-10 (the dropout
    /// generator) — the same mask on every machine. `density` must be in (0, 1].
    pub fn random(
        q_len: usize,
        k_len: usize,
        block: (usize, usize),
        heads: usize,
        density: f64,
        seed: u64,
    ) -> Result<Self> {
        let (qb, kb) = check_grid(q_len, k_len, block)?;
        if !(density > 0.0 && density <= 1.0) {
            bail!("BlockMask::random: `density` must be in (0, 1], got {density}")
        }
        if heads == 0 {
            bail!("BlockMask::random: `heads` must be positive (1 = broadcast), got 0")
        }
        let keep = ((density * kb as f64).round() as usize).clamp(1, kb);
        let key = [seed as u32, (seed >> 32) as u32];
        let rows = (0..heads * qb)
            .map(|r| {
                // A partial Fisher–Yates shuffle: draw t picks among the kb - t not yet taken.
                let mut order: Vec<usize> = (0..kb).collect();
                for t in 0..keep {
                    let draw = philox4x32_10([t as u32, r as u32, 0x0b10_c4ed, 0], key)[0];
                    let pick = t + ((draw as u64 * (kb - t) as u64) >> 32) as usize;
                    order.swap(t, pick);
                }
                let mut chosen = order[..keep].to_vec();
                chosen.sort_unstable();
                chosen.into_iter().map(|c| (c, Listed::Full)).collect()
            })
            .collect();
        Ok(Self::from_rows((q_len, k_len), block, (1, heads), rows))
    }

    /// `(bq, bk)`.
    pub fn block_size(&self) -> (usize, usize) {
        self.0.block
    }

    pub fn q_len(&self) -> usize {
        self.0.q_len
    }

    pub fn k_len(&self) -> usize {
        self.0.k_len
    }

    /// Sequences the mask distinguishes; 1 = broadcast.
    pub fn batch(&self) -> usize {
        self.0.batch
    }

    /// Query heads the mask distinguishes; 1 = broadcast.
    pub fn heads(&self) -> usize {
        self.0.heads
    }

    /// Listed blocks / all blocks, over every (batch, head) slot of the mask.
    pub fn density(&self) -> f64 {
        let l = self.lists();
        let all = l.batch * l.heads * l.q_blocks * l.k_blocks;
        l.kv_block.len() as f64 / all as f64
    }

    /// `(full, partial)` listed blocks.
    pub fn counts(&self) -> (usize, usize) {
        let full = self.0.kv_bits.iter().filter(|&&b| b == FULL).count();
        (full, self.0.kv_bits.len() - full)
    }

    /// Whether the mask lets element (b, h, i, j) through (the block part of the rule in the
    /// [module docs](self); the options' rule is applied by the call). False past the lengths.
    pub fn visible(&self, b: usize, h: usize, i: usize, j: usize) -> bool {
        if i >= self.0.q_len || j >= self.0.k_len {
            return false;
        }
        let l = self.lists();
        let (bq, bk) = l.block;
        let r = l.row(b, h, i / bq);
        let listed = &l.kv_block[l.kv_start[r] as usize..l.kv_start[r + 1] as usize];
        match listed.binary_search(&((j / bk) as u32)) {
            Err(_) => false,
            Ok(e) => match l.kv_bits[l.kv_start[r] as usize + e] {
                FULL => true,
                id => {
                    let x = j % bk;
                    l.bit_row(id, i % bq)[x / 32] >> (x % 32) & 1 == 1
                }
            },
        }
    }

    /// The flat lists, for the backends.
    #[doc(hidden)]
    pub fn lists(&self) -> BlockLists<'_> {
        let l = &*self.0;
        let (q_blocks, k_blocks) = block_counts((l.q_len, l.k_len), l.block);
        BlockLists {
            block: l.block,
            q_blocks,
            k_blocks,
            batch: l.batch,
            heads: l.heads,
            words_per_row: words_per_row(l.block.1),
            kv_start: &l.kv_start,
            kv_block: &l.kv_block,
            kv_bits: &l.kv_bits,
            q_start: &l.q_start,
            q_block: &l.q_block,
            q_bits: &l.q_bits,
            bits: &l.bits,
        }
    }
}

/// Each row's listed blocks from an element predicate (rows in `r` order).
fn classify(
    (q_len, k_len): (usize, usize),
    (bq, bk): (usize, usize),
    (batch, heads): (usize, usize),
    pred: &impl Fn(usize, usize, usize, usize) -> bool,
) -> Vec<Vec<(usize, Listed)>> {
    let ((qb, kb), wpr) = (block_counts((q_len, k_len), (bq, bk)), words_per_row(bk));
    let mut rows = Vec::with_capacity(batch * heads * qb);
    let mut words = vec![0u32; bq * wpr];
    for b in 0..batch {
        for h in 0..heads {
            for r in 0..qb {
                let (i0, i1) = (r * bq, ((r + 1) * bq).min(q_len));
                let mut row = Vec::new();
                for c in 0..kb {
                    let (j0, j1) = (c * bk, ((c + 1) * bk).min(k_len));
                    words.fill(0);
                    let mut seen = 0;
                    for i in i0..i1 {
                        for j in j0..j1 {
                            if pred(b, h, i, j) {
                                let (y, x) = (i - i0, j - j0);
                                words[y * wpr + x / 32] |= 1 << (x % 32);
                                seen += 1;
                            }
                        }
                    }
                    if seen == (i1 - i0) * (j1 - j0) {
                        row.push((c, Listed::Full));
                    } else if seen > 0 {
                        row.push((c, Listed::Partial(words.clone())));
                    }
                }
                rows.push(row);
            }
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every element of `m` (over its batch and heads) equals `pred`, and the lists agree with
    /// the bits: listed full blocks see all, partial some, unlisted none.
    fn expands_to(m: &BlockMask, pred: impl Fn(usize, usize, usize, usize) -> bool) {
        let l = m.lists();
        let (bq, bk) = l.block;
        for b in 0..m.batch() {
            for h in 0..m.heads() {
                for qb in 0..l.q_blocks {
                    let r = l.row(b, h, qb);
                    let listed: Vec<(usize, u32)> = l.row_blocks(r).collect();
                    for kb in 0..l.k_blocks {
                        let (i0, i1) = (qb * bq, ((qb + 1) * bq).min(m.q_len()));
                        let (j0, j1) = (kb * bk, ((kb + 1) * bk).min(m.k_len()));
                        let mut seen = 0;
                        for i in i0..i1 {
                            for j in j0..j1 {
                                assert_eq!(
                                    m.visible(b, h, i, j),
                                    pred(b, h, i, j),
                                    "({b},{h},{i},{j})"
                                );
                                seen += pred(b, h, i, j) as usize;
                            }
                        }
                        let entry = listed.iter().find(|e| e.0 == kb);
                        match entry {
                            None => assert_eq!(seen, 0, "block ({qb}, {kb}) unlisted"),
                            Some((_, FULL)) => assert_eq!(seen, (i1 - i0) * (j1 - j0)),
                            Some(_) => assert!(seen > 0 && seen < (i1 - i0) * (j1 - j0)),
                        }
                    }
                }
            }
        }
        assert!(!m.visible(0, 0, m.q_len(), 0) && !m.visible(0, 0, 0, m.k_len()));
    }

    /// Bits past the lengths are 0, and ids cover the bits exactly.
    fn bits_clean(m: &BlockMask) {
        let l = m.lists();
        let (bq, bk) = l.block;
        let (_, partial) = m.counts();
        assert_eq!(l.bits.len(), partial * bq * l.words_per_row);
        for r in 0..l.kv_start.len() - 1 {
            let qb = r % l.q_blocks;
            for (kb, id) in l.row_blocks(r).filter(|e| e.1 != FULL) {
                for y in 0..bq {
                    for x in 0..l.words_per_row * 32 {
                        let set = l.bit_row(id, y)[x / 32] >> (x % 32) & 1 == 1;
                        let inside = qb * bq + y < m.q_len() && kb * bk + x < m.k_len() && x < bk;
                        assert!(inside || !set, "bit ({y}, {x}) of block ({qb}, {kb})");
                    }
                }
            }
        }
    }

    /// The transposed lists hold exactly the row lists' entries, ascending per column.
    fn transpose_ok(m: &BlockMask) {
        let l = m.lists();
        let mut from_rows = Vec::new();
        for r in 0..l.kv_start.len() - 1 {
            let (slot, qb) = (r / l.q_blocks, r % l.q_blocks);
            for (kb, id) in l.row_blocks(r) {
                from_rows.push((slot * l.k_blocks + kb, qb, id));
            }
        }
        let mut from_cols = Vec::new();
        for c in 0..l.q_start.len() - 1 {
            let qbs: Vec<usize> = l.col_blocks(c).map(|e| e.0).collect();
            assert!(qbs.windows(2).all(|w| w[0] < w[1]));
            from_cols.extend(l.col_blocks(c).map(|(qb, id)| (c, qb, id)));
        }
        from_rows.sort_unstable();
        assert_eq!(from_rows, from_cols);
        assert_eq!(l.q_start.len(), l.batch * l.heads * l.k_blocks + 1);
        assert_eq!(l.kv_start.len(), l.batch * l.heads * l.q_blocks + 1);
    }

    fn check(m: &BlockMask, pred: impl Fn(usize, usize, usize, usize) -> bool) {
        expands_to(m, pred);
        bits_clean(m);
        transpose_ok(m);
    }

    #[test]
    fn named_patterns_expand_to_their_predicates() -> Result<()> {
        for (q, k, blk) in [
            (100, 100, (32, 16)),
            (70, 150, (16, 48)),
            (130, 40, (32, 32)),
        ] {
            let d = k as i64 - q as i64;
            let ip = move |i: usize| i as i64 + d;
            check(&BlockMask::causal(q, k, blk)?, |_, _, i, j| {
                j as i64 <= ip(i)
            });
            check(
                &BlockMask::sliding_window(q, k, blk, 20, 5)?,
                |_, _, i, j| {
                    let x = ip(i) - j as i64;
                    (-5..=20).contains(&x)
                },
            );
            check(&BlockMask::local_global(q, k, blk, 9, 17)?, |_, _, i, j| {
                (ip(i) - j as i64).abs() <= 9 || j < 17 || i < 17
            });
            check(&BlockMask::strided(q, k, blk, 7, 13)?, |_, _, i, j| {
                let x = ip(i) - j as i64;
                (0..7).contains(&x) || (x >= 0 && x % 13 == 0)
            });
            check(&BlockMask::butterfly(q, k, blk)?, |_, _, i, j| {
                let (r, c) = (i / blk.0, j / blk.1);
                r == c || (r ^ c).is_power_of_two()
            });
        }
        Ok(())
    }

    #[test]
    fn per_head_and_batch_predicates_and_layouts() -> Result<()> {
        let pred =
            |b: usize, h: usize, i: usize, j: usize| (i * 7 + j * 3 + b * 5 + h) % 11 < 3 + h;
        let m = BlockMask::from_predicate(50, 70, (16, 32), 2, 3, pred)?;
        check(&m, pred);
        assert_eq!((m.batch(), m.heads()), (2, 3));
        // Broadcast: one slot answers every (b, h).
        let m = BlockMask::causal(40, 40, (16, 16))?;
        assert_eq!(m.visible(5, 7, 30, 2), m.visible(0, 0, 30, 2));
        // A layout: nonzero = full; heads kept.
        let cells = [1u8, 0, 0, 2, 0, 1, 0, 0, 0, 0, 0, 0];
        let t = Tensor::from_vec(cells.to_vec(), (2, 2, 3), &Device::Cpu)?;
        let m = BlockMask::from_block_layout(&t, 20, 40, (16, 16))?;
        check(&m, |_, h, i, j| cells[h * 6 + (i / 16) * 3 + j / 16] != 0);
        assert_eq!(m.counts(), (3, 0));
        assert_eq!(m.density(), 3.0 / 12.0);
        Ok(())
    }

    #[test]
    fn classification_full_partial_empty() -> Result<()> {
        // 64 × 64 in 32-blocks, causal: the two diagonal blocks partial, one full, one empty.
        let m = BlockMask::causal(64, 64, (32, 32))?;
        assert_eq!(m.counts(), (1, 2));
        assert_eq!(m.density(), 0.75);
        let l = m.lists();
        assert_eq!(l.kv_start, [0, 1, 3]);
        assert_eq!(l.kv_block, [0, 0, 1]);
        assert_eq!(l.kv_bits, [0, FULL, 1]);
        assert_eq!(l.q_start, [0, 2, 3]);
        assert_eq!(l.q_block, [0, 1, 1]);
        // All-full and an empty row.
        let all = BlockMask::from_predicate(40, 40, (16, 16), 1, 1, |_, _, _, _| true)?;
        assert_eq!(all.counts(), (9, 0));
        let gap = BlockMask::from_predicate(40, 40, (16, 16), 1, 1, |_, _, i, _| i >= 16)?;
        assert_eq!(gap.lists().kv_start[..2], [0, 0]);
        check(&gap, |_, _, i, _| i >= 16);
        Ok(())
    }

    #[test]
    fn random_blocks_are_seeded_and_sized() -> Result<()> {
        let m = BlockMask::random(256, 512, (32, 32), 3, 0.25, 7)?;
        let l = m.lists();
        for r in 0..l.kv_start.len() - 1 {
            assert_eq!(l.kv_start[r + 1] - l.kv_start[r], 4);
        }
        assert_eq!(m.counts(), (3 * 8 * 4, 0));
        transpose_ok(&m);
        let again = BlockMask::random(256, 512, (32, 32), 3, 0.25, 7)?;
        assert_eq!(again.lists().kv_block, l.kv_block);
        let other = BlockMask::random(256, 512, (32, 32), 3, 0.25, 8)?;
        assert_ne!(other.lists().kv_block, l.kv_block);
        // At least one block per row, whatever the density.
        let sparse = BlockMask::random(64, 64, (16, 16), 1, 1e-6, 1)?;
        assert_eq!(sparse.counts(), (4, 0));
        Ok(())
    }

    #[test]
    fn bad_input_names_the_argument() -> Result<()> {
        let err = |r: Result<BlockMask>| r.expect_err("must fail").to_string();
        for blk in [(0, 16), (16, 0), (24, 16), (16, 40), (2048, 16)] {
            let e = err(BlockMask::causal(64, 64, blk));
            assert!(
                e.contains("block size") && e.contains("multiple of 16"),
                "{e}"
            );
        }
        assert!(err(BlockMask::causal(0, 64, (16, 16))).contains("`q_len`"));
        for dens in [0.0, -0.5, 1.5, f64::NAN] {
            assert!(err(BlockMask::random(64, 64, (16, 16), 1, dens, 0)).contains("`density`"));
        }
        assert!(err(BlockMask::strided(64, 64, (16, 16), 4, 0)).contains("`stride`"));
        let e = err(BlockMask::from_predicate(
            64,
            64,
            (16, 16),
            1,
            1,
            |_, _, i, _| {
                assert!(i < 40, "row {i} out of bounds");
                true
            },
        ));
        assert!(
            e.contains("`pred` panicked") && e.contains("row 40 out of bounds"),
            "{e}"
        );
        let t = Tensor::zeros((1, 4, 3), DType::U8, &Device::Cpu)?;
        let e = err(BlockMask::from_block_layout(&t, 64, 64, (16, 16)));
        assert!(
            e.contains("`layout`") && e.contains("(heads or 1, 4, 4)"),
            "{e}"
        );
        let t = Tensor::zeros((1, 4, 4), DType::F32, &Device::Cpu)?;
        let e = err(BlockMask::from_block_layout(&t, 64, 64, (16, 16)));
        assert!(e.contains("`layout`") && e.contains("u8"), "{e}");
        let t = Tensor::zeros((4, 4), DType::U8, &Device::Cpu)?;
        assert!(err(BlockMask::from_block_layout(&t, 64, 64, (16, 16))).contains("`layout`"));
        Ok(())
    }
}
