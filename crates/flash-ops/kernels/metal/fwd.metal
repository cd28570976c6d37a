// FlashAttention-2 forward (Dao 2023, Algorithm 1) for Apple GPUs.
//
// One threadgroup per (32-row q tile, query head, sequence); 4 simdgroups own 8 rows each.
// The scaled q rows and the output accumulator stay in simdgroup matrices for the whole key
// loop; k and v tiles (BC x D, f32) stream through one threadgroup buffer. Per key tile:
//   S = Q Kᵀ            simdgroup_matrix products, stored to threadgroup memory
//   online softmax      4 lanes per row (simd_shuffle_xor reductions), mask + softcap + ALiBi
//   O = diag(α) O       the rescale as an 8x8 diagonal product (lane layout is opaque)
//   O += P V            simdgroup_matrix products
// Writes O / l and the log-sum-exp (or m ‖ l for Algorithm::V1, whose statistics layout the
// op saves; the Metal backend runs this one schedule for both algorithms).
#include "flash_metal.h"

template <typename T, int D>
[[kernel]] void flash_fwd(FLASH_THREAD_ARGS, constant MetalFlashParams &p [[buffer(0)]],
                          device const long *seq_info [[buffer(1)]],
                          device const float *alibi [[buffer(2)]], device const T *q [[buffer(3)]],
                          device const T *k [[buffer(4)]], device const T *v [[buffer(5)]],
                          device T *o [[buffer(6)]], device float *stats [[buffer(7)]],
                          device const uint *mask [[buffer(8)]]) {
    constexpr int BR = FLASH_BR, BC = FLASH_BC(D), NT = FLASH_THREADS;
    FLASH_CHECK_SMEM((BC * D + BR * BC + 4 * 64) * 4);
    const int b = (int)tgid.z, h = (int)tgid.y, i0 = (int)tgid.x * BR;
    const SeqInfo si = load_seq(seq_info, b);
    if (i0 >= si.q_len) return;  // uniform over the threadgroup
    const int hk = h / (p.heads_q / p.heads_k), hd = p.head_dim;
    const Mods mods = make_mods(p, si, alibi, b, h);

    threadgroup float *kv = smem;               // BC x D: k tile, then v tile
    threadgroup float *sbuf = kv + BC * D;      // BR x BC: scores, then probabilities
    threadgroup float *diag = sbuf + BR * BC + 64 * sg;  // this simdgroup's 8x8 diagonal
    for (int e = (int)lane; e < 64; e += 32) diag[e] = 0.0f;

    simdgroup_float8x8 qm[D / 8], om[D / 8];
    rows_to_matrices<T, D>(qm, kv, BC, BR, q + si.q_off + (long)h * p.q_head_stride, p.q_tok_stride,
                           i0, (int)si.q_len, hd, tid, NT, sg, p.scale);
    for (int n = 0; n < D / 8; ++n) om[n] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);

    // Lane -> (row, quarter): four lanes share a row and take every fourth column.
    const int r = (int)lane / 4, qd = (int)lane % 4, i = i0 + 8 * (int)sg + r;
    threadgroup float *srow = sbuf + (8 * (int)sg + r) * BC;
    float m_run = -INFINITY, l_run = 0.0f;

    // Block skipping: only key tiles visible to some row of this q tile (and, with a block
    // mask, inside the key blocks its query block lists).
    const int i_last = min(i0 + BR, (int)si.q_len) - 1;
    const int k_lo = min(key_lo(mods, i0), mods.k_len), k_hi = key_hi(mods, i_last);
    device const T *kp = k + si.k_off + (long)hk * p.k_head_stride;
    device const T *vp = v + si.v_off + (long)hk * p.v_head_stride;
    const int qb = mask_q_block(p, i0);
    TileWalk walk = make_walk(p, mask, true, b, h, qb, k_lo, k_hi, BC);
    for (Tile t; walk_next(walk, t);) {
        const int j0 = t.x0, j_end = t.x0 + t.n;
        const BlockBits bb = block_bits(p, mask, t.id, qb, t.blk);
        load_rows<T, D>(kv, kp, p.k_tok_stride, j0, j_end, BC, hd, tid, NT, 1.0f);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        a_bt<D, BC / 8>(qm, kv, sbuf + 8 * sg * BC, BC);
        simdgroup_barrier(mem_flags::mem_threadgroup);

        float mx = -INFINITY;
        for (int c = qd; c < BC; c += 4) {
            const int j = j0 + c;
            float dcap;
            const bool vis = j < j_end && visible(mods, i, j) && bits_test(bb, i, j);
            const float s = vis ? modify(mods, srow[c], i, j, dcap) : -INFINITY;
            srow[c] = s;
            mx = max(mx, s);
        }
        mx = max(mx, simd_shuffle_xor(mx, 1));
        mx = max(mx, simd_shuffle_xor(mx, 2));
        const float m_new = max(m_run, mx);
        // A row that has seen no key yet keeps m = -inf: its weights are 0, not exp(nan).
        const float alpha = m_new == -INFINITY ? 1.0f : exp(m_run - m_new);
        float sum = 0.0f;
        for (int c = qd; c < BC; c += 4) {
            const float pr = m_new == -INFINITY ? 0.0f : exp(srow[c] - m_new);
            sum += pr;
            // Dropout acts on the normalised probabilities: the row sum is of the kept and
            // dropped weights alike.
            srow[c] = pr * dropout_factor(p, b, h, i, j0 + c);
        }
        sum += simd_shuffle_xor(sum, 1);
        sum += simd_shuffle_xor(sum, 2);
        l_run = l_run * alpha + sum;
        m_run = m_new;
        if (qd == 0) diag[9 * r] = alpha;
        simdgroup_barrier(mem_flags::mem_threadgroup);
        scale_rows<D>(om, diag);
        threadgroup_barrier(mem_flags::mem_threadgroup);  // every simdgroup is done with k

        load_rows<T, D>(kv, vp, p.v_tok_stride, j0, j_end, BC, hd, tid, NT, 1.0f);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        acc_ab<D, BC / 8>(om, sbuf + 8 * sg * BC, BC, kv);
        threadgroup_barrier(mem_flags::mem_threadgroup);  // ... and with v and P
    }

    // Fully masked rows (l = 0): output 0, log-sum-exp -inf.
    if (qd == 0) diag[9 * r] = l_run > 0.0f ? 1.0f / l_run : 0.0f;
    simdgroup_barrier(mem_flags::mem_threadgroup);
    scale_rows<D>(om, diag);
    if (qd == 0 && i < si.q_len) {
        const long idx = si.lse_off + (long)h * p.lse_head_stride + i;
        if (p.stats_v1) {
            stats[idx] = m_run;
            stats[p.lse_len + idx] = l_run;
        } else {
            stats[idx] = l_run > 0.0f ? m_run + log(l_run) : -INFINITY;
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    matrices_to_rows<T, D>(om, kv, BC, BR, o + si.o_off + (long)h * hd, p.o_tok_stride, i0,
                           (int)si.q_len, hd, tid, NT, sg, 1.0f);
}

FLASH_INSTANCES_TD(flash_fwd)
