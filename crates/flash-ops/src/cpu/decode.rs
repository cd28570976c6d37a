//! Flash-decoding forward (Dao et al., 2023, "Flash-Decoding for long-context inference"): when
//! the q side is too small to keep the cores busy — a decode step (`sq ≤` [`DECODE_ROWS`]) or
//! fewer than [`FEW_TASKS`] q tiles in all — the key range is split into [`CHUNK`]-key chunks,
//! one rayon task each, every task leaving the unnormalised `(m, l, acc)` of its chunk; the
//! chunks of a row are then merged by their log-sum-exp in chunk order. The chunking depends
//! only on the problem and the merge order is fixed, so the bits are the same for any thread
//! count.
//!
//! **GQA/MQA packing.** The query heads sharing a k/v head are stacked into one q tile (head-major,
//! `nh · qr ≤ TILE` rows), so each K/V tile is read from memory once per k/v head rather than
//! once per query head: a decode step of 32 query / 8 k/v heads reads K and V 8 times, not 32.
//! The score GEMM runs over the whole stack; the fused softmax pass runs per head (each head has
//! its own ALiBi slope), on that head's `qr` contiguous score rows.
//!
//! Backward keeps the V2 schedule: it only needs the log-sum-exp, which this writes the same way.

use rayon::prelude::*;

use super::fused::{self, SoftmaxTile, TileAt};
use super::simd::gemm::{gemm, Op, Threads};
use super::{qk_scores, Elem, Operands, RowView, SharedOut, TILE};
use crate::mask::ScoreMods;
use crate::params::AttnParams;
use crate::{stats, Algorithm};

/// Query rows per sequence up to which a call counts as decoding (speculative decoding's
/// draft lengths included).
pub const DECODE_ROWS: usize = 16;

/// Below this many V2 tasks (q tiles over every sequence and query head) the V2 schedule leaves
/// cores idle on any machine this runs on (2–16 cores), so the keys are split instead. A fixed
/// number, not the pool's size: the path, and so the bits, must not depend on the thread count.
pub const FEW_TASKS: usize = 8;

/// Keys per chunk: two k/v tiles. One decode chunk at d = 128 reads 256·128·4·2 = 256 KiB of
/// K and V (≈ 25 µs at 10 GB/s), large against a task's start-up and its merge (`rows·d` per
/// chunk), and small enough that 1K keys give 4 chunks per k/v head to share out.
pub const CHUNK: usize = 2 * TILE;

/// Whether [`forward`] runs this call: V2 without dropout (the dropout mask is indexed per
/// query head and tile, which the packing does not keep), and few query rows.
pub fn applies(p: &AttnParams) -> bool {
    let max_q = p.seqs.iter().map(|s| s.q_len).max().unwrap_or(0);
    let v2_tasks: usize = p.seqs.iter().map(|s| s.q_len.div_ceil(TILE)).sum::<usize>() * p.heads_q;
    // A block mask walks its lists in the tile loops instead (fwd_v2).
    p.algorithm == Algorithm::V2
        && p.dropout.is_none()
        && p.block_mask.is_none()
        && (max_q <= DECODE_ROWS || v2_tasks < FEW_TASKS)
}

/// A stack of query heads `h0..h0 + nh` (one k/v head's) × rows `i0..i0 + qr` of sequence `s`,
/// with the keys `[k_lo, k_hi)` some row of it sees, cut into `chunks` chunks.
struct Stack {
    s: usize,
    h0: usize,
    nh: usize,
    i0: usize,
    qr: usize,
    k_lo: usize,
    k_hi: usize,
    /// Index of its first chunk in the task list; its chunks follow in key order.
    first: usize,
    chunks: usize,
}

impl Stack {
    fn rows(&self) -> usize {
        self.nh * self.qr
    }

    fn chunk(&self, c: usize) -> (usize, usize) {
        let lo = self.k_lo + c * CHUNK;
        (lo, (lo + CHUNK).min(self.k_hi))
    }
}

/// The stacks of a problem: per sequence, q blocks of `qr = min(q_len, TILE)` rows, and per k/v
/// head, its query heads in stacks of `TILE / qr` (at least 1).
fn stacks(p: &AttnParams) -> Vec<Stack> {
    let g = p.group();
    let mut out = Vec::new();
    let mut first = 0;
    for (s, span) in p.seqs.iter().enumerate() {
        if span.q_len == 0 {
            continue;
        }
        let qr = span.q_len.min(TILE);
        let nh_max = (TILE / qr).clamp(1, g);
        for i0 in (0..span.q_len).step_by(qr) {
            let qr = qr.min(span.q_len - i0);
            for hk in 0..p.heads_k {
                for h0 in (hk * g..(hk + 1) * g).step_by(nh_max) {
                    let nh = nh_max.min((hk + 1) * g - h0);
                    // The key range does not depend on the head (only ALiBi's slope does).
                    let (k_lo, k_hi) = ScoreMods::new(p, s, h0).key_range_rows(i0, i0 + qr);
                    let chunks = k_hi.saturating_sub(k_lo).div_ceil(CHUNK);
                    out.push(Stack {
                        s,
                        h0,
                        nh,
                        i0,
                        qr,
                        k_lo,
                        k_hi,
                        first,
                        chunks,
                    });
                    first += chunks;
                }
            }
        }
    }
    out
}

/// Per-task scratch: the query stack, one k/v tile, its scores.
struct Scratch {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    s: Vec<f32>,
}

/// One chunk of one stack into `slot = m (rows) ‖ l (rows) ‖ acc (rows × d)`: FlashAttention-2
/// Algorithm 1's inner loop over the chunk's k/v tiles, the accumulator left unnormalised.
fn run_chunk<T: Elem>(
    p: &AttnParams,
    ops: &Operands<T>,
    st: &Stack,
    (j_lo, j_hi): (usize, usize),
    sc: &mut Scratch,
    slot: &mut [f32],
) {
    let (d, rows, qr) = (p.head_dim, st.rows(), st.qr);
    let (m, rest) = slot.split_at_mut(rows);
    let (l, acc) = rest.split_at_mut(rows);
    m.fill(f32::NEG_INFINITY);
    l.fill(0.0);
    acc.fill(0.0);
    for hh in 0..st.nh {
        ops.q
            .load((st.s, st.h0 + hh, st.i0), qr, d, &mut sc.q[hh * qr * d..]);
    }
    let mods: Vec<ScoreMods> = (0..st.nh)
        .map(|hh| ScoreMods::new(p, st.s, st.h0 + hh))
        .collect();
    let hk = st.h0 / p.group();
    let mut j0 = j_lo;
    while j0 < j_hi {
        let cols = TILE.min(j_hi - j0);
        ops.load_kv((st.s, hk, j0), cols, d, (&mut sc.k, &mut sc.v));
        let stack = TileAt {
            i0: st.i0,
            j0,
            rows,
            cols,
        };
        qk_scores(&sc.q, &sc.k, stack, d, p.scale, &mut sc.s);
        for (hh, mods) in mods.iter().enumerate() {
            let r = hh * qr..(hh + 1) * qr;
            fused::run(SoftmaxTile {
                s: &mut sc.s[r.start * cols..r.end * cols],
                at: TileAt { rows: qr, ..stack },
                mods,
                m: &mut m[r.clone()],
                l: &mut l[r.clone()],
                acc: Some((&mut acc[r.start * d..r.end * d], d)),
                bits: None,
            });
        }
        gemm(
            (rows, d, cols),
            Op::N(&sc.s[..rows * cols]),
            Op::N(&sc.v[..cols * d]),
            acc,
            (true, 1.0),
            Threads::One,
        );
        j0 += cols;
    }
}

/// Merges a stack's chunk slots row by row in chunk order (the ⊕ of [`crate::merge`]):
/// `M = maxᶜ mᶜ`, `L = Σᶜ lᶜ·e^(mᶜ−M)`, `out = Σᶜ accᶜ·e^(mᶜ−M) / L`, `lse = M + ln L`.
/// Writes `out` (rows × d) and `lse` (rows); a row no chunk saw gets zeros and `-inf`.
fn merge(slots: &[&mut [f32]], rows: usize, d: usize, out: &mut [f32], lse: &mut [f32]) {
    out[..rows * d].fill(0.0);
    for r in 0..rows {
        let big_m = slots.iter().map(|s| s[r]).fold(f32::NEG_INFINITY, f32::max);
        if big_m == f32::NEG_INFINITY {
            lse[r] = f32::NEG_INFINITY;
            continue;
        }
        let o = &mut out[r * d..(r + 1) * d];
        let mut big_l = 0.0;
        for s in slots {
            let w = (s[r] - big_m).exp();
            big_l += s[rows + r] * w;
            let acc = &s[2 * rows + r * d..2 * rows + (r + 1) * d];
            for (x, a) in o.iter_mut().zip(acc) {
                *x += w * a;
            }
        }
        fused::run(fused::Mul::Scalar(o, 1.0 / big_l));
        lse[r] = stats::lse(big_m, big_l);
    }
}

/// The forward output and log-sum-exp, as [`super::fwd_v2::forward`] returns them.
pub fn forward<T: Elem>(p: &AttnParams, ops: &Operands<T>, out: &mut [T]) -> Vec<f32> {
    let d = p.head_dim;
    let stacks = stacks(p);
    // (stack, chunk) tasks and their slots, in stack then key order.
    let tasks: Vec<(usize, usize)> = stacks
        .iter()
        .enumerate()
        .flat_map(|(i, st)| (0..st.chunks).map(move |c| (i, c)))
        .collect();
    let slot_len = |st: &Stack| st.rows() * (d + 2);
    let mut buf = vec![0f32; stacks.iter().map(|st| st.chunks * slot_len(st)).sum()];
    let mut slots: Vec<&mut [f32]> = Vec::with_capacity(tasks.len());
    let mut rest = buf.as_mut_slice();
    for &(i, _) in &tasks {
        let (slot, tail) = rest.split_at_mut(slot_len(&stacks[i]));
        slots.push(slot);
        rest = tail;
    }
    let new_scratch = || Scratch {
        q: vec![0.0; TILE * d],
        k: vec![0.0; TILE * d],
        v: vec![0.0; TILE * d],
        s: vec![0.0; TILE * TILE],
    };
    slots
        .par_iter_mut()
        .zip(&tasks)
        .for_each_init(new_scratch, |sc, (slot, &(i, c))| {
            let st = &stacks[i];
            run_chunk(p, ops, st, st.chunk(c), sc, slot);
        });

    let mut lse = vec![f32::NEG_INFINITY; p.lse_len()];
    let out_view = RowView::contiguous(p, p.heads_q, true);
    let out_ptr = SharedOut::new(out);
    let lse_ptr = SharedOut::new(&mut lse);
    let slots = &slots;
    stacks.par_iter().for_each_init(
        || (vec![0f32; TILE * d], vec![0f32; TILE]),
        |(o, l), st| {
            let rows = st.rows();
            merge(&slots[st.first..st.first + st.chunks], rows, d, o, l);
            for hh in 0..st.nh {
                let (h, r) = (st.h0 + hh, hh * st.qr);
                // SAFETY: this stack alone owns rows i0..i0+qr of heads h0..h0+nh of sequence s.
                unsafe {
                    out_ptr.store_rows(&out_view, (st.s, h, st.i0), st.qr, d, &o[r * d..]);
                    for t in 0..st.qr {
                        lse_ptr.write(p.lse_index(st.s, h, st.i0 + t), l[r + t]);
                    }
                }
            }
        },
    );
    lse
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AttnOptions;
    use candle_core::{Device, Tensor};

    fn params(
        b: usize,
        sq: usize,
        sk: usize,
        hq: usize,
        hk: usize,
        opts: &AttnOptions,
    ) -> AttnParams {
        let t = |s: usize, h: usize| {
            Tensor::zeros((b, s, h, 128), candle_core::DType::F32, &Device::Cpu).unwrap()
        };
        AttnParams::dense(&t(sq, hq), &t(sk, hk), &t(sk, hk), opts).unwrap()
    }

    #[test]
    fn gqa_heads_share_one_pass_over_each_kv_head() {
        // One decode step, 32 query / 8 k/v heads, 4K keys: 8 stacks of 4 heads, 16 chunks each,
        // so K and V are read once per k/v head.
        let p = params(1, 1, 4096, 32, 8, &AttnOptions::new());
        assert!(applies(&p));
        let st = stacks(&p);
        assert_eq!(st.len(), 8);
        for (i, s) in st.iter().enumerate() {
            assert_eq!(
                (s.h0, s.nh, s.qr, s.chunks, s.first),
                (4 * i, 4, 1, 16, 16 * i)
            );
            assert_eq!(s.chunk(15), (15 * CHUNK, 4096));
        }
    }

    #[test]
    fn only_few_rows_or_few_tasks_without_dropout_take_it() {
        let plain = AttnOptions::new();
        assert!(applies(&params(1, 16, 512, 4, 4, &plain)));
        assert!(!applies(&params(1, 17, 512, 8, 8, &plain)));
        // 2 heads × 2 q tiles = 4 V2 tasks: split; 8 tasks: the V2 schedule.
        assert!(applies(&params(1, 256, 512, 2, 2, &plain)));
        assert!(!applies(&params(1, 512, 512, 2, 2, &plain)));
        assert!(!applies(&params(
            1,
            1,
            512,
            4,
            4,
            &plain.clone().dropout(0.1, 1)
        )));
        let v1 = plain.algorithm(Algorithm::V1);
        assert!(!applies(&params(1, 1, 512, 4, 4, &v1)));
    }

    #[test]
    fn causal_stacks_stop_at_their_last_visible_key() {
        // 200 rows: q blocks of 128 and 72 rows, one head per stack (128 rows fill a tile).
        let p = params(1, 200, 640, 2, 1, &AttnOptions::new().causal(true));
        let st = stacks(&p);
        let ranges: Vec<_> = st
            .iter()
            .map(|s| (s.i0, s.qr, s.h0, s.k_hi, s.chunks))
            .collect();
        // Bottom-right causal: row i sees keys ..= i + 440.
        assert_eq!(
            ranges,
            [
                (0, 128, 0, 568, 3),
                (0, 128, 1, 568, 3),
                (128, 72, 0, 640, 3),
                (128, 72, 1, 640, 3)
            ]
        );
    }
}
