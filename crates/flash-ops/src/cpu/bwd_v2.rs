//! FlashAttention-2 backward (Dao, 2023, Algorithm 2): tasks own k/v tiles, so dK and dV are
//! accumulated privately and written once; q tiles stream past them.
//!
//! dQ receives contributions from every k/v tile. The CUDA kernel uses atomics; here, for
//! bit-for-bit determinism without a second recompute pass, each (sequence, k/v head) splits its
//! k/v tiles into a fixed number of chunks chosen from the shape alone (never from the thread
//! count), each chunk accumulates its own dQ partial, and the partials are summed in chunk order.

use rayon::prelude::*;

use super::sparse::{Sparsity, Visit};
use super::{
    backward_tile, row_deltas, BackwardOperands, BwdScratch, Elem, GradOutputs, Operands, RowView,
    SharedOut, TILE,
};
use crate::mask::ScoreMods;
use crate::params::AttnParams;

/// Enough independent tasks to keep a many-core machine busy, few enough partials to keep the
/// extra memory a small multiple of dQ.
const TARGET_TASKS: usize = 32;
const MAX_CHUNKS: usize = 8;

pub fn backward<T: Elem>(
    p: &AttnParams,
    ops: &Operands<T>,
    saved: &BackwardOperands<T>,
    g: GradOutputs<T>,
) {
    let d = p.head_dim;
    let q_view = RowView::contiguous(p, p.heads_q, true);
    let k_view = RowView::contiguous(p, p.heads_k, false);
    let delta = deltas(p, saved);

    let units = p.batch() * p.heads_k;
    let chunks = TARGET_TASKS.div_ceil(units.max(1)).clamp(1, MAX_CHUNKS);
    let dq_len = p.q_elems();
    let mut dq_partials = vec![0f32; chunks * dq_len];
    let partial_ptr = SharedOut::new(&mut dq_partials);
    let dk_ptr = SharedOut::new(g.dk);
    let dv_ptr = SharedOut::new(g.dv);

    let sparsity = Sparsity::of(p);
    let k_tiles: Vec<Vec<(usize, usize)>> = p
        .seqs
        .iter()
        .map(|span| sparsity.tiles(span.k_len, false))
        .collect();
    let tasks: Vec<(usize, usize, usize)> = (0..p.batch())
        .flat_map(|s| (0..p.heads_k).flat_map(move |hk| (0..chunks).map(move |c| (s, hk, c))))
        .collect();
    tasks.par_iter().for_each_init(
        || BwdScratch::new(d),
        |sc, &(s, hk, c)| {
            let n_kv = k_tiles[s].len();
            let (kb_lo, kb_hi) = (c * n_kv / chunks, (c + 1) * n_kv / chunks);
            let dq_base = c * dq_len;
            for &(j0, cols) in &k_tiles[s][kb_lo..kb_hi] {
                ops.load_kv((s, hk, j0), cols, d, (&mut sc.k, &mut sc.v));
                sc.dk[..cols * d].fill(0.0);
                sc.dv[..cols * d].fill(0.0);
                // GQA: every q head of the group adds into this k/v head's gradients.
                for h in hk * p.group()..(hk + 1) * p.group() {
                    let mods = ScoreMods::new(p, s, h);
                    for Visit {
                        start: i0,
                        len: rows,
                        bits,
                    } in sparsity.visits(&mods, (s, h), (j0, cols), true)
                    {
                        ops.q.load((s, h, i0), rows, d, &mut sc.q);
                        saved.d_o.load((s, h, i0), rows, d, &mut sc.d_o);
                        for r in 0..rows {
                            let idx = p.lse_index(s, h, i0 + r);
                            sc.lse[r] = saved.lse[idx];
                            sc.delta[r] = delta[idx];
                        }
                        // This chunk's dQ partial rows: read, add, write back.
                        let part = partial_ptr.offset(dq_base);
                        // SAFETY: chunk c of (s, hk) is the only task touching these rows.
                        unsafe { part.load_rows(&q_view, (s, h, i0), rows, d, &mut sc.dq) };
                        backward_tile(p, &mods, (s, h), (i0, rows), (j0, cols), bits, sc);
                        // SAFETY: as above.
                        unsafe { part.store_rows(&q_view, (s, h, i0), rows, d, &sc.dq) };
                    }
                }
                // SAFETY: k/v tile kb of head hk of sequence s belongs to this task alone.
                unsafe {
                    dk_ptr.store_rows(&k_view, (s, hk, j0), cols, d, &sc.dk);
                    dv_ptr.store_rows(&k_view, (s, hk, j0), cols, d, &sc.dv);
                }
            }
        },
    );
    // Deterministic reduction of the dQ partials, in chunk order.
    g.dq.par_chunks_mut(4096)
        .enumerate()
        .for_each(|(blk, out)| {
            let base = blk * 4096;
            let mut acc = [0f32; 4096];
            let acc = &mut acc[..out.len()];
            for c in 0..chunks {
                let part = &dq_partials[c * dq_len + base..][..out.len()];
                acc.iter_mut().zip(part).for_each(|(a, x)| *a += x);
            }
            T::narrow(acc, out);
        });
}

/// Backward's row term `D − dlse`, `D = rowsum(dO ∘ O)` (Algorithm 2 line 4), for every
/// (sequence, head, row), once: not once per k/v tile that revisits the row.
fn deltas<T: Elem>(p: &AttnParams, saved: &BackwardOperands<T>) -> Vec<f32> {
    let (o, d_o) = (&saved.o, &saved.d_o);
    let d = p.head_dim;
    let mut delta = vec![0f32; p.lse_len()];
    let delta_ptr = SharedOut::new(&mut delta);
    let tasks: Vec<(usize, usize)> = (0..p.batch())
        .flat_map(|s| (0..p.heads_q).map(move |h| (s, h)))
        .collect();
    tasks.par_iter().for_each(|&(s, h)| {
        let (mut ot, mut dot, mut out) = (vec![0f32; TILE * d], vec![0f32; TILE * d], [0f32; TILE]);
        let q_len = p.seqs[s].q_len;
        let mut i0 = 0;
        while i0 < q_len {
            let rows = TILE.min(q_len - i0);
            o.load((s, h, i0), rows, d, &mut ot);
            d_o.load((s, h, i0), rows, d, &mut dot);
            row_deltas(&dot, &ot, rows, d, &mut out);
            for (r, &x) in out.iter().enumerate().take(rows) {
                // SAFETY: (s, h) rows belong to this task alone.
                let idx = p.lse_index(s, h, i0 + r);
                unsafe { delta_ptr.write(idx, x - saved.dlse(idx)) };
            }
            i0 += rows;
        }
    });
    delta
}
