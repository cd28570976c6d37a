//! FlashAttention-2 backward (Dao, 2023, Algorithm 2): tasks own k/v tiles, so dK and dV are
//! accumulated privately and written once; q tiles stream past them.
//!
//! dQ receives contributions from every k/v tile. The CUDA kernel uses atomics; here, for
//! bit-for-bit determinism without a second recompute pass, each (sequence, k/v head) splits its
//! k/v tiles into a fixed number of chunks chosen from the shape alone (never from the thread
//! count), each chunk accumulates its own dQ partial, and the partials are summed in chunk order.

use rayon::prelude::*;

use super::{
    row_deltas, seq_heads, BackwardOperands, BwdScratch, Elem, KvTileStep, RowView, SharedOut, TILE,
};
use crate::params::AttnParams;

/// Enough independent tasks to keep a many-core machine busy, few enough partials to keep the
/// extra memory a small multiple of dQ.
const TARGET_TASKS: usize = 32;
const MAX_CHUNKS: usize = 8;

pub fn backward<T: Elem>(step: &KvTileStep<T>, dq: &mut [T]) {
    let (p, sparsity) = (step.p, step.sparsity);
    let d = p.head_dim;
    let q_view = RowView::contiguous(p, p.heads_q, true);
    let delta = deltas(p, step.saved);

    let units = p.batch() * p.heads_k;
    let chunks = TARGET_TASKS.div_ceil(units.max(1)).clamp(1, MAX_CHUNKS);
    let dq_len = p.q_elems();
    let mut dq_partials = vec![0f32; chunks * dq_len];
    let partial_ptr = SharedOut::new(&mut dq_partials);

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
            // This chunk's dQ partial: its rows are read, added to and written back per q tile.
            let part = partial_ptr.offset(c * dq_len);
            for &kv_tile in &k_tiles[s][kb_lo..kb_hi] {
                let q_tile = |h: usize,
                              (i0, rows): (usize, usize),
                              sc: &mut BwdScratch,
                              tile: &dyn Fn(&mut BwdScratch)| {
                    for r in 0..rows {
                        sc.delta[r] = delta[p.lse_index(s, h, i0 + r)];
                    }
                    // SAFETY: chunk c of (s, hk) is the only task touching these rows.
                    unsafe { part.load_rows(&q_view, (s, h, i0), rows, d, &mut sc.dq) };
                    tile(sc);
                    // SAFETY: as above.
                    unsafe { part.store_rows(&q_view, (s, h, i0), rows, d, &sc.dq) };
                };
                // SAFETY: k/v tile kb of head hk of sequence s belongs to this task alone.
                unsafe { step.run((s, hk), kv_tile, sc, q_tile) };
            }
        },
    );
    // Deterministic reduction of the dQ partials, in chunk order.
    dq.par_chunks_mut(4096).enumerate().for_each(|(blk, out)| {
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
    seq_heads(p, p.heads_q).par_iter().for_each(|&(s, h)| {
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
