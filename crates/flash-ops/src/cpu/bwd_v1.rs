//! FlashAttention backward (Dao et al., 2022, Algorithm 4): one task per (sequence, k/v head);
//! the outer loop runs over k/v tiles, the inner loop over q tiles, and dQ lives in a per-task
//! buffer that is read and written back for every (q tile, k/v tile) pair. `delta` is
//! recomputed in the inner loop, as the paper does; the probabilities come from the
//! log-sum-exp of the saved `m` and `l`.

use rayon::prelude::*;

use super::{row_deltas, seq_heads, BwdScratch, Elem, KvTileStep, RowView, SharedOut, TILE};

pub fn backward<T: Elem>(step: &KvTileStep<T>, dq_out: &mut [T]) {
    let (p, saved, sparsity) = (step.p, step.saved, step.sparsity);
    let d = p.head_dim;
    let q_view = RowView::contiguous(p, p.heads_q, true);
    let dq_ptr = SharedOut::new(dq_out);
    seq_heads(p, p.heads_k).par_iter().for_each(|&(s, hk)| {
        let span = p.seqs[s];
        let group = p.group();
        let mut sc = BwdScratch::new(d);
        let mut o_tile = vec![0f32; TILE * d];
        // dQ of every q head of the group, the whole sequence: FlashAttention's "HBM" dQ.
        let mut dq = vec![0f32; group * span.q_len * d];
        for kv_tile in sparsity.tiles(span.k_len, false) {
            let q_tile = |h: usize,
                          (i0, rows): (usize, usize),
                          sc: &mut BwdScratch,
                          tile: &dyn Fn(&mut BwdScratch)| {
                // `delta` recomputed per (q tile, k/v tile), as Algorithm 4 line 19 does.
                saved.o.load((s, h, i0), rows, d, &mut o_tile);
                row_deltas(&sc.d_o, &o_tile, rows, d, &mut sc.delta);
                for r in 0..rows {
                    sc.delta[r] -= saved.dlse(p.lse_index(s, h, i0 + r));
                }
                let gi = h - hk * group;
                let dq_rows = &mut dq[(gi * span.q_len + i0) * d..][..rows * d];
                sc.dq[..rows * d].copy_from_slice(dq_rows);
                tile(sc);
                dq_rows.copy_from_slice(&sc.dq[..rows * d]);
            };
            // SAFETY: head hk of sequence s belongs to this task alone.
            unsafe { step.run((s, hk), kv_tile, &mut sc, q_tile) };
        }
        for gi in 0..group {
            let rows = &dq[gi * span.q_len * d..(gi + 1) * span.q_len * d];
            // SAFETY: as above, for the q heads of group hk.
            unsafe { dq_ptr.store_rows(&q_view, (s, hk * group + gi, 0), span.q_len, d, rows) };
        }
    });
}
