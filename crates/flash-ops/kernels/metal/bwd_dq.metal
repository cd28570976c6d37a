// Backward, dQ half (the metal-flash-attention split: no float atomics, which Apple GPUs only
// emulate). One threadgroup per (32-row q tile, query head, sequence), 8 rows per simdgroup;
// q (scaled), dO and the dQ accumulator stay in simdgroup matrices. Per key tile:
//   dP = dO Vᵀ                        (v tile in threadgroup memory)
//   S = Q Kᵀ, P = exp(S' − lse)       (k tile replaces v; S' = softcap/ALiBi-modified S)
//   dS = P ∘ (dP∘Z − delta) ∘ softcap'   (Z: the dropout factors)
//   dQ += dS K
// dQ is written once, times the softmax scale. The dK/dV kernel recomputes S and dP: 7 tile
// GEMMs per (q tile, k tile) instead of FlashAttention-2's 5, the price of no atomics.
#include "flash_metal.h"

template <typename T, int D>
[[kernel]] void flash_bwd_dq(FLASH_THREAD_ARGS, constant MetalFlashParams &p [[buffer(0)]],
                             device const long *seq_info [[buffer(1)]],
                             device const float *alibi [[buffer(2)]],
                             device const T *q [[buffer(3)]], device const T *k [[buffer(4)]],
                             device const T *v [[buffer(5)]], device const T *d_o [[buffer(6)]],
                             device const float *lse [[buffer(7)]],
                             device const float *delta [[buffer(8)]], device T *dq [[buffer(9)]],
                             device const uint *mask [[buffer(10)]]) {
    constexpr int BR = FLASH_BR, BC = FLASH_BC(D), NT = FLASH_THREADS;
    FLASH_CHECK_SMEM((BC * D + 2 * BR * BC + 2 * BR) * 4);
    const int b = (int)tgid.z, h = (int)tgid.y, i0 = (int)tgid.x * BR;
    const SeqInfo si = load_seq(seq_info, b);
    if (i0 >= si.q_len) return;
    const int hk = h / (p.heads_q / p.heads_k), hd = p.head_dim;
    const Mods mods = make_mods(p, si, alibi, b, h);

    threadgroup float *kv = smem;               // BC x D: v tile, then k tile
    threadgroup float *sbuf = kv + BC * D;      // BR x BC: S, then dS
    threadgroup float *dpbuf = sbuf + BR * BC;  // BR x BC: dP
    threadgroup float *lse_s = dpbuf + BR * BC; // BR
    threadgroup float *delta_s = lse_s + BR;    // BR

    simdgroup_float8x8 qm[D / 8], dom[D / 8], dqm[D / 8];
    rows_to_matrices<T, D>(qm, kv, BC, BR, q + si.q_off + (long)h * p.q_head_stride, p.q_tok_stride,
                           i0, (int)si.q_len, hd, tid, NT, sg, p.scale);
    rows_to_matrices<T, D>(dom, kv, BC, BR, d_o + si.o_off + (long)h * hd, p.o_tok_stride, i0,
                           (int)si.q_len, hd, tid, NT, sg, 1.0f);
    for (int n = 0; n < D / 8; ++n) dqm[n] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    if ((int)tid < BR) {
        const int i = i0 + (int)tid;
        const long idx = si.lse_off + (long)h * p.lse_head_stride + i;
        lse_s[tid] = i < si.q_len ? lse[idx] : -INFINITY;
        delta_s[tid] = i < si.q_len ? delta[idx] : 0.0f;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    const int i_last = min(i0 + BR, (int)si.q_len) - 1;
    const int k_lo = min(key_lo(mods, i0), mods.k_len), k_hi = key_hi(mods, i_last);
    device const T *kp = k + si.k_off + (long)hk * p.k_head_stride;
    device const T *vp = v + si.v_off + (long)hk * p.v_head_stride;
    threadgroup float *my_s = sbuf + 8 * sg * BC, *my_dp = dpbuf + 8 * sg * BC;
    // The forward's key tiles: the listed key blocks only, with a block mask.
    const int qb = mask_q_block(p, i0);
    TileWalk walk = make_walk(p, mask, true, b, h, qb, k_lo, k_hi, BC);
    for (Tile t; walk_next(walk, t);) {
        const int j0 = t.x0, j_end = t.x0 + t.n;
        const BlockBits bb = block_bits(p, mask, t.id, qb, t.blk);
        load_rows<T, D>(kv, vp, p.v_tok_stride, j0, j_end, BC, hd, tid, NT, 1.0f);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        a_bt<D, BC / 8>(dom, kv, my_dp, BC);
        threadgroup_barrier(mem_flags::mem_threadgroup);  // v no longer needed
        load_rows<T, D>(kv, kp, p.k_tok_stride, j0, j_end, BC, hd, tid, NT, 1.0f);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        a_bt<D, BC / 8>(qm, kv, my_s, BC);
        simdgroup_barrier(mem_flags::mem_threadgroup);
        for (int e = (int)lane; e < 8 * BC; e += 32) {
            const int rr = e / BC, c = e % BC, i = i0 + 8 * (int)sg + rr, j = j0 + c;
            float ds = 0.0f;
            if (j < j_end && visible(mods, i, j) && bits_test(bb, i, j)) {
                float dcap;
                const float s = modify(mods, my_s[e], i, j, dcap);
                const float pr = exp(s - lse_s[8 * sg + rr]);
                const float dp = my_dp[e] * dropout_factor(p, b, h, i, j);
                ds = pr * (dp - delta_s[8 * sg + rr]) * dcap;
            }
            my_s[e] = ds;
        }
        simdgroup_barrier(mem_flags::mem_threadgroup);
        acc_ab<D, BC / 8>(dqm, my_s, BC, kv);
        threadgroup_barrier(mem_flags::mem_threadgroup);  // k free for the next v tile
    }
    matrices_to_rows<T, D>(dqm, kv, BC, BR, dq + si.o_off + (long)h * hd, p.o_tok_stride, i0,
                           (int)si.q_len, hd, tid, NT, sg, p.scale);
}

FLASH_INSTANCES_TD(flash_bwd_dq)
