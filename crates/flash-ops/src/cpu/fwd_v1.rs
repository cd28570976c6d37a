//! FlashAttention forward (Dao et al., 2022, Algorithm 1, with Algorithm 2's dropout): one task
//! per (sequence, head); the outer loop runs over k/v tiles and the inner loop over q tiles, so
//! the output, `m` and `l` of every row are read, rescaled and written back once per k/v tile.
//! That extra traffic and the coarser parallelism are what FlashAttention-2 removed.

use rayon::prelude::*;

use super::fused::{self, SoftmaxTile, TileAt};
use super::simd::exp;
use super::simd::gemm::{gemm, Op, Threads};
use super::sparse::{Sparsity, Visit};
use super::{
    drop_tile, qk_scores, seq_heads, visible_parts, Elem, Operands, Part, RowView, SharedOut, TILE,
};
use crate::mask::ScoreMods;
use crate::params::AttnParams;

/// Returns the statistics `m ‖ l` (each `lse_len` long).
pub fn forward<T: Elem>(p: &AttnParams, ops: &Operands<T>, out: &mut [T]) -> Vec<f32> {
    let d = p.head_dim;
    let n = p.lse_len();
    let mut stats = vec![0f32; p.stats_len()];
    stats[..n].fill(f32::NEG_INFINITY);
    let out_view = RowView::contiguous(p, p.heads_q, true);
    let out_ptr = SharedOut::new(out);
    let stats_ptr = SharedOut::new(&mut stats);
    let sparsity = Sparsity::of(p);
    seq_heads(p, p.heads_q).par_iter().for_each(|&(s, h)| {
        let span = p.seqs[s];
        let mods = ScoreMods::new(p, s, h);
        let hk = h / p.group();
        // The per-(sequence, head) output, m and l: FlashAttention's "HBM" copies.
        let mut o = vec![0f32; span.q_len * d];
        let mut m = vec![f32::NEG_INFINITY; span.q_len];
        let mut l = vec![0f32; span.q_len];
        let (mut qt, mut kt, mut vt) = (
            vec![0f32; TILE * d],
            vec![0f32; TILE * d],
            vec![0f32; TILE * d],
        );
        let mut st = vec![0f32; TILE * TILE];
        let mut pv = vec![0f32; TILE * d];
        let mut drop_factors = vec![0f32; TILE];
        let drop_mask = p.dropout_mask(s, h);
        for (j0, cols) in sparsity.tiles(span.k_len, false) {
            ops.load_kv((s, hk, j0), cols, d, (&mut kt, &mut vt));
            for Visit {
                start: i0,
                len: rows,
                bits,
            } in sparsity.visits(&mods, (s, h), (j0, cols), true)
            {
                ops.q.load((s, h, i0), rows, d, &mut qt);
                // Tile statistics m~, l~ and P~ = exp(S − m~) (Algorithm 1 line 10), one
                // visible part at a time; rows in no part keep m~ = -inf and are skipped below.
                let (mut mt, mut lt) = ([f32::NEG_INFINITY; TILE], [0f32; TILE]);
                for Part { at, r0, c0 } in visible_parts(&mods, TileAt { i0, j0, rows, cols }, bits)
                {
                    let (q, k, v) = (&qt[r0 * d..], &kt[c0 * d..], &vt[c0 * d..]);
                    qk_scores(q, k, at, d, mods.scale, &mut st);
                    fused::run(SoftmaxTile {
                        s: &mut st,
                        at,
                        mods: &mods,
                        m: &mut mt[r0..r0 + at.rows],
                        l: &mut lt[r0..r0 + at.rows],
                        acc: None,
                        bits: bits.map(|b| b.from(r0, c0)),
                    });
                    if let Some(dm) = &drop_mask {
                        drop_tile(dm, at, &mut st, &mut drop_factors);
                    }
                    let (s_at, pv) = (&st[..at.rows * at.cols], &mut pv[r0 * d..]);
                    let mnk = (at.rows, d, at.cols);
                    gemm(mnk, Op::N(s_at), Op::N(v), pv, (false, 1.0), Threads::One);
                }
                // O_i ← diag(l_new)⁻¹ (diag(l_i) e^{m_i − m_new} O_i + e^{m~ − m_new} P~ V_j)
                // (Algorithm 1 lines 11–12).
                for (r, (&mt, &lt)) in mt.iter().zip(&lt).enumerate().take(rows) {
                    if mt == f32::NEG_INFINITY {
                        continue;
                    }
                    let i = i0 + r;
                    let m_new = m[i].max(mt);
                    let a = exp(m[i] - m_new);
                    let b = exp(mt - m_new);
                    let l_new = a * l[i] + b * lt;
                    let (c_old, c_new) = (a * l[i] / l_new, b / l_new);
                    for (x, y) in o[i * d..(i + 1) * d]
                        .iter_mut()
                        .zip(&pv[r * d..(r + 1) * d])
                    {
                        *x = c_old * *x + c_new * y;
                    }
                    (m[i], l[i]) = (m_new, l_new);
                }
            }
        }
        // SAFETY: this task alone owns head h of sequence s.
        unsafe {
            out_ptr.store_rows(&out_view, (s, h, 0), span.q_len, d, &o);
            for i in 0..span.q_len {
                let idx = p.lse_index(s, h, i);
                stats_ptr.write(idx, m[i]);
                stats_ptr.write(n + idx, l[i]);
            }
        }
    });
    stats
}
