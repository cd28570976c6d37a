// Backward, dK/dV half (see bwd_dq.metal for the split). One threadgroup per (32-key tile,
// k/v head, sequence), 8 keys per simdgroup; k (scaled), v and the dK, dV accumulators stay in
// simdgroup matrices. For every query head of the GQA group and every q tile that sees these
// keys (q and dO tiles, BQ x D f32, side by side in threadgroup memory):
//   Sᵀ = K Qᵀ, Pᵀ = exp(Sᵀ' − lse)   dPᵀ = V dOᵀ
//   dSᵀ = Pᵀ ∘ (dPᵀ∘Zᵀ − delta) ∘ softcap'
//   dV += (Pᵀ∘Zᵀ) dO                 dK += dSᵀ Q
// Each key block is owned by one threadgroup, so dK and dV are written once (times the scale
// for dK): deterministic, no atomics.
#include "flash_metal.h"

template <typename T, int D>
[[kernel]] void flash_bwd_dkdv(FLASH_THREAD_ARGS, constant MetalFlashParams &p [[buffer(0)]],
                               device const long *seq_info [[buffer(1)]],
                               device const float *alibi [[buffer(2)]],
                               device const T *q [[buffer(3)]], device const T *k [[buffer(4)]],
                               device const T *v [[buffer(5)]], device const T *d_o [[buffer(6)]],
                               device const float *lse [[buffer(7)]],
                               device const float *delta [[buffer(8)]], device T *dk [[buffer(9)]],
                               device T *dv [[buffer(10)]],
                               device const uint *mask [[buffer(11)]]) {
    constexpr int BK = FLASH_BK, BQ = FLASH_BQ(D), NT = FLASH_THREADS;
    FLASH_CHECK_SMEM((2 * BQ * D + 2 * BK * BQ + 2 * BQ) * 4);
    const int b = (int)tgid.z, hk = (int)tgid.y, j0 = (int)tgid.x * BK;
    const SeqInfo si = load_seq(seq_info, b);
    if (j0 >= si.k_len) return;
    const int group = p.heads_q / p.heads_k, hd = p.head_dim;
    const int j1 = min(j0 + BK, (int)si.k_len);

    threadgroup float *qbuf = smem;              // BQ x D: q tile
    threadgroup float *dobuf = qbuf + BQ * D;    // BQ x D: dO tile
    threadgroup float *sbuf = dobuf + BQ * D;    // BK x BQ: Sᵀ, then Pᵀ∘Zᵀ
    threadgroup float *dpbuf = sbuf + BK * BQ;   // BK x BQ: dPᵀ, then dSᵀ
    threadgroup float *lse_s = dpbuf + BK * BQ;  // BQ
    threadgroup float *delta_s = lse_s + BQ;     // BQ

    simdgroup_float8x8 km[D / 8], vm[D / 8], dkm[D / 8], dvm[D / 8];
    // q and dO tiles are adjacent: 2·BQ rows of staging.
    rows_to_matrices<T, D>(km, qbuf, 2 * BQ, BK, k + si.k_off + (long)hk * p.k_head_stride,
                           p.k_tok_stride, j0, j1, hd, tid, NT, sg, p.scale);
    rows_to_matrices<T, D>(vm, qbuf, 2 * BQ, BK, v + si.v_off + (long)hk * p.v_head_stride,
                           p.v_tok_stride, j0, j1, hd, tid, NT, sg, 1.0f);
    for (int n = 0; n < D / 8; ++n) {
        dkm[n] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
        dvm[n] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
    threadgroup float *my_s = sbuf + 8 * sg * BQ, *my_dp = dpbuf + 8 * sg * BQ;

    const int kb = mask_k_block(p, j0);
    for (int h = hk * group; h < (hk + 1) * group; ++h) {
        const Mods mods = make_mods(p, si, alibi, b, h);
        // Block skipping: only q tiles with a row that sees one of these keys (and, with a
        // block mask, inside the query blocks its key block's column lists).
        const int q_lo = query_lo(mods, j0), q_hi = query_hi(mods, j1);
        device const T *qp = q + si.q_off + (long)h * p.q_head_stride;
        device const T *dop = d_o + si.o_off + (long)h * hd;
        TileWalk walk = make_walk(p, mask, false, b, h, kb, q_lo, q_hi, BQ);
        for (Tile t; walk_next(walk, t);) {
            const int i0 = t.x0, i_end = t.x0 + t.n;
            const BlockBits bb = block_bits(p, mask, t.id, t.blk, kb);
            load_rows<T, D>(qbuf, qp, p.q_tok_stride, i0, i_end, BQ, hd, tid, NT, 1.0f);
            load_rows<T, D>(dobuf, dop, p.o_tok_stride, i0, i_end, BQ, hd, tid, NT, 1.0f);
            if ((int)tid < BQ) {
                const int i = i0 + (int)tid;
                const long idx = si.lse_off + (long)h * p.lse_head_stride + i;
                lse_s[tid] = i < i_end ? lse[idx] : -INFINITY;
                delta_s[tid] = i < i_end ? delta[idx] : 0.0f;
            }
            threadgroup_barrier(mem_flags::mem_threadgroup);
            a_bt<D, BQ / 8>(km, qbuf, my_s, BQ);
            a_bt<D, BQ / 8>(vm, dobuf, my_dp, BQ);
            simdgroup_barrier(mem_flags::mem_threadgroup);
            for (int e = (int)lane; e < 8 * BQ; e += 32) {
                const int rr = e / BQ, c = e % BQ, j = j0 + 8 * (int)sg + rr, i = i0 + c;
                float pz = 0.0f, ds = 0.0f;
                if (j < j1 && i < i_end && visible(mods, i, j) && bits_test(bb, i, j)) {
                    float dcap;
                    const float s = modify(mods, my_s[e], i, j, dcap);
                    const float pr = exp(s - lse_s[c]);
                    const float z = dropout_factor(p, b, h, i, j);
                    pz = pr * z;
                    ds = pr * (my_dp[e] * z - delta_s[c]) * dcap;
                }
                my_s[e] = pz;
                my_dp[e] = ds;
            }
            simdgroup_barrier(mem_flags::mem_threadgroup);
            acc_ab<D, BQ / 8>(dvm, my_s, BQ, dobuf);
            acc_ab<D, BQ / 8>(dkm, my_dp, BQ, qbuf);
            threadgroup_barrier(mem_flags::mem_threadgroup);  // tiles free for the next q tile
        }
    }
    matrices_to_rows<T, D>(dkm, qbuf, 2 * BQ, BK, dk + si.dk_off + (long)hk * hd, p.dk_tok_stride,
                           j0, j1, hd, tid, NT, sg, p.scale);
    matrices_to_rows<T, D>(dvm, qbuf, 2 * BQ, BK, dv + si.dk_off + (long)hk * hd, p.dk_tok_stride,
                           j0, j1, hd, tid, NT, sg, 1.0f);
}

FLASH_INSTANCES_TD(flash_bwd_dkdv)
