//! FlashAttention backward (Dao et al., 2022, Algorithm 4): one task per (sequence, k/v head);
//! the outer loop runs over k/v tiles, the inner loop over q tiles, and dQ lives in a per-task
//! buffer that is read and written back for every (q tile, k/v tile) pair. `delta` is
//! recomputed in the inner loop, as the paper does; the probabilities come from the
//! log-sum-exp of the saved `m` and `l`.

use rayon::prelude::*;

use super::sparse::{Sparsity, Visit};
use super::{
    backward_tile, row_deltas, BackwardOperands, BwdScratch, Elem, GradOutputs, Operands, RowView,
    SharedOut, TILE,
};
use crate::mask::ScoreMods;
use crate::params::AttnParams;

pub fn backward<T: Elem>(
    p: &AttnParams,
    ops: &Operands<T>,
    saved: &BackwardOperands<T>,
    g: GradOutputs<T>,
) {
    let d = p.head_dim;
    let q_view = RowView::contiguous(p, p.heads_q, true);
    let k_view = RowView::contiguous(p, p.heads_k, false);
    let dq_ptr = SharedOut::new(g.dq);
    let dk_ptr = SharedOut::new(g.dk);
    let dv_ptr = SharedOut::new(g.dv);
    let tasks: Vec<(usize, usize)> = (0..p.batch())
        .flat_map(|s| (0..p.heads_k).map(move |hk| (s, hk)))
        .collect();
    let sparsity = Sparsity::of(p);
    tasks.par_iter().for_each(|&(s, hk)| {
        let span = p.seqs[s];
        let group = p.group();
        let mut sc = BwdScratch::new(d);
        let mut o_tile = vec![0f32; TILE * d];
        // dQ of every q head of the group, the whole sequence: FlashAttention's "HBM" dQ.
        let mut dq = vec![0f32; group * span.q_len * d];
        for (j0, cols) in sparsity.tiles(span.k_len, false) {
            ops.load_kv((s, hk, j0), cols, d, (&mut sc.k, &mut sc.v));
            sc.dk[..cols * d].fill(0.0);
            sc.dv[..cols * d].fill(0.0);
            for gi in 0..group {
                let h = hk * group + gi;
                let mods = ScoreMods::new(p, s, h);
                for Visit {
                    start: i0,
                    len: rows,
                    bits,
                } in sparsity.visits(&mods, (s, h), (j0, cols), true)
                {
                    ops.q.load((s, h, i0), rows, d, &mut sc.q);
                    saved.d_o.load((s, h, i0), rows, d, &mut sc.d_o);
                    saved.o.load((s, h, i0), rows, d, &mut o_tile);
                    row_deltas(&sc.d_o, &o_tile, rows, d, &mut sc.delta);
                    for r in 0..rows {
                        let idx = p.lse_index(s, h, i0 + r);
                        sc.lse[r] = saved.lse[idx];
                        sc.delta[r] -= saved.dlse(idx);
                    }
                    let dq_rows = &mut dq[(gi * span.q_len + i0) * d..][..rows * d];
                    sc.dq[..rows * d].copy_from_slice(dq_rows);
                    backward_tile(p, &mods, (s, h), (i0, rows), (j0, cols), bits, &mut sc);
                    dq_rows.copy_from_slice(&sc.dq[..rows * d]);
                }
            }
            // SAFETY: head hk of sequence s belongs to this task alone.
            unsafe {
                dk_ptr.store_rows(&k_view, (s, hk, j0), cols, d, &sc.dk);
                dv_ptr.store_rows(&k_view, (s, hk, j0), cols, d, &sc.dv);
            }
        }
        for gi in 0..group {
            let rows = &dq[gi * span.q_len * d..(gi + 1) * span.q_len * d];
            // SAFETY: as above, for the q heads of group hk.
            unsafe { dq_ptr.store_rows(&q_view, (s, hk * group + gi, 0), span.q_len, d, rows) };
        }
    });
}
