//! FlashAttention-2 forward (Dao, 2023, Algorithm 1): one task per (sequence, head, q tile); the
//! q tile stays resident while k/v tiles stream past it; the accumulator is left unscaled and
//! divided by the row sum once at the end; only the log-sum-exp is saved.

use rayon::prelude::*;

use super::fused::{self, SoftmaxTile, TileAt};
use super::simd::gemm::{gemm, Op, Threads};
use super::sparse::{Sparsity, Visit};
use super::{drop_tile, qk_scores, visible_parts, Elem, Operands, Part, RowView, SharedOut, TILE};
use crate::mask::ScoreMods;
use crate::params::AttnParams;
use crate::stats;

struct Scratch {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    s: Vec<f32>,
    drop_factors: Vec<f32>,
    acc: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
}

pub fn forward<T: Elem>(p: &AttnParams, ops: &Operands<T>, out: &mut [T]) -> Vec<f32> {
    let d = p.head_dim;
    let mut lse = vec![f32::NEG_INFINITY; p.lse_len()];
    let out_view = RowView::contiguous(p, p.heads_q, true);
    let out_ptr = SharedOut::new(out);
    let lse_ptr = SharedOut::new(&mut lse);
    let sparsity = Sparsity::of(p);
    let tasks: Vec<(usize, usize, (usize, usize))> = p
        .seqs
        .iter()
        .enumerate()
        .flat_map(|(s, span)| {
            let q_tiles = sparsity.tiles(span.q_len, true);
            (0..p.heads_q).flat_map(move |h| q_tiles.clone().into_iter().map(move |t| (s, h, t)))
        })
        .collect();
    let new_scratch = || Scratch {
        q: vec![0.0; TILE * d],
        k: vec![0.0; TILE * d],
        v: vec![0.0; TILE * d],
        s: vec![0.0; TILE * TILE],
        drop_factors: vec![0.0; TILE],
        acc: vec![0.0; TILE * d],
        m: vec![0.0; TILE],
        l: vec![0.0; TILE],
    };
    tasks
        .par_iter()
        .for_each_init(new_scratch, |sc, &(s, h, (i0, rows))| {
            let mods = ScoreMods::new(p, s, h);
            let hk = h / p.group();
            ops.q.load((s, h, i0), rows, d, &mut sc.q);
            sc.m[..rows].fill(f32::NEG_INFINITY);
            sc.l[..rows].fill(0.0);
            sc.acc[..rows * d].fill(0.0);
            let drop_mask = p.dropout_mask(s, h);
            // Block skipping: only k tiles holding a key visible to some row of this q tile
            // (and, with a block mask, in a listed block).
            for Visit {
                start: j0,
                len: cols,
                bits,
            } in sparsity.visits(&mods, (s, h), (i0, rows), false)
            {
                ops.load_kv((s, hk, j0), cols, d, (&mut sc.k, &mut sc.v));
                let tile = TileAt { i0, j0, rows, cols };
                for Part { at, r0, c0 } in visible_parts(&mods, tile, bits) {
                    let (q, k, v) = (&sc.q[r0 * d..], &sc.k[c0 * d..], &sc.v[c0 * d..]);
                    qk_scores(q, k, at, d, mods.scale, &mut sc.s);
                    fused::run(SoftmaxTile {
                        s: &mut sc.s,
                        at,
                        mods: &mods,
                        m: &mut sc.m[r0..r0 + at.rows],
                        l: &mut sc.l[r0..r0 + at.rows],
                        acc: Some((&mut sc.acc[r0 * d..], d)),
                        bits: bits.map(|b| b.from(r0, c0)),
                    });
                    // The row sums above are of the undropped weights: dropout acts on the
                    // normalised probabilities.
                    if let Some(dm) = &drop_mask {
                        drop_tile(dm, at, &mut sc.s, &mut sc.drop_factors);
                    }
                    let (s_at, acc) = (&sc.s[..at.rows * at.cols], &mut sc.acc[r0 * d..]);
                    let mnk = (at.rows, d, at.cols);
                    gemm(mnk, Op::N(s_at), Op::N(v), acc, (true, 1.0), Threads::One);
                }
            }
            for r in 0..rows {
                let l = sc.l[r];
                let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
                fused::run(fused::Mul::Scalar(&mut sc.acc[r * d..(r + 1) * d], inv));
                let lse = stats::lse(sc.m[r], l);
                // SAFETY: this task alone owns rows i0..i0+rows of head h of sequence s.
                unsafe { lse_ptr.write(p.lse_index(s, h, i0 + r), lse) };
            }
            // SAFETY: as above.
            unsafe { out_ptr.store_rows(&out_view, (s, h, i0), rows, d, &sc.acc) };
        });
    lse
}
