// Deterministic dQ for the FlashAttention-2 backward: one block per (query tile, query head,
// sequence), the forward kernel's shape, walking the visible k/v tiles in order and keeping dQ
// in registers, so every element is summed in one fixed order and written once (no atomics).
// In deterministic mode bwd_v2.cu then skips its dQ step (dq_accum = null) and only produces
// dK and dV. The price is recomputing S and dP once more (about 1.4x the backward FLOPs).
//   S = Q K^T, P = exp(mod(scale S) - lse), dP = dO V^T, dS = P (dP Z - delta) softcap',
//   dQ += scale dS K.
#include "flash_config.cuh"
#include "flash_mma.cuh"

namespace flash {

// The forward pass's tiles, with Q, dO and one K/V stage in shared memory (f32 at D = 256 uses
// 2 warps, 32 rows, to stay within an A100's 164 KiB).
template <typename T, int D> struct DqCfg {
    static constexpr int kWarps = (sizeof(T) == 4 && D == 256) ? 2 : 4;
    static constexpr int kThreads = 32 * kWarps, kBr = 16 * kWarps, kBc = FwdCfg<T, D>::kBc;
    static constexpr int kLd = Pitch<T, D>::kLd;
    static constexpr unsigned kSmem = (unsigned)((2 * kBr + 2 * kBc) * kLd * sizeof(T));
};

template <typename T, int D> __device__ void bwd_dq(const FlashParams& p) {
    using C = DqCfg<T, D>;
    using M = Mma<T>;
    constexpr int kBr = C::kBr, kBc = C::kBc, kLd = C::kLd, kNT = kBc / 8, kDT = D / 8;
    check_launch(C::kSmem, C::kThreads);

    const int s = blockIdx.z, h = blockIdx.y, i0 = blockIdx.x * kBr;
    const Seq sq(p, s);
    if (i0 >= sq.q_len) return;
    const int rows = min(kBr, sq.q_len - i0);
    const int hk = h / (p.heads_q / p.heads_k);
    const Mods md(p, sq, s, h);
    const Dropout dr(p, s, h);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
    FLASH_DYNAMIC_SMEM(smem_raw);
    T* sQ = reinterpret_cast<T*>(smem_raw);
    T* sdO = sQ + kBr * kLd;
    T* sK = sdO + kBr * kLd;
    T* sV = sK + kBc * kLd;
    const bool vec = p.vec_loads != 0;
    const long long o_base = sq.o_off + (long long)h * p.head_dim;
    const long long lse_base = sq.lse_off + (long long)h * p.lse_head_stride;

    load_tile<T, D>(sQ, kLd,
                    static_cast<const T*>(p.q) + sq.q_off + h * p.q_head_stride +
                        (long long)i0 * p.q_tok_stride,
                    p.q_tok_stride, rows, kBr, p.head_dim, vec, tid, C::kThreads);
    load_tile<T, D>(sdO, kLd, static_cast<const T*>(p.d_o) + o_base + (long long)i0 * p.o_tok_stride,
                    p.o_tok_stride, rows, kBr, p.head_dim, vec, tid, C::kThreads);
    cp_async_commit();

    const int row[2] = {i0 + warp * 16 + g, i0 + warp * 16 + g + 8};
    float lse[2], delta[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const bool ok = row[r] < sq.q_len;  // rows past the sequence: P = exp(-inf) = 0
        lse[r] = ok ? p.lse[lse_base + row[r]] : FLASH_INF;
        delta[r] = ok ? p.delta[lse_base + row[r]] : 0.f;
    }
    float acc[kDT][4];
#pragma unroll
    for (int t = 0; t < kDT; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;

    int k_lo, k_hi;
    md.key_range_rows(i0, i0 + rows, k_lo, k_hi);
    for (int j0 = k_lo; j0 < k_hi; j0 += kBc) {
        const int cols = min(kBc, k_hi - j0);
        __syncthreads();  // previous tile's readers of sK / sV are done
        load_tile<T, D>(sK, kLd,
                        static_cast<const T*>(p.k) + sq.k_off + hk * p.k_head_stride +
                            (long long)j0 * p.k_tok_stride,
                        p.k_tok_stride, cols, kBc, p.head_dim, vec, tid, C::kThreads);
        load_tile<T, D>(sV, kLd,
                        static_cast<const T*>(p.v) + sq.v_off + hk * p.v_head_stride +
                            (long long)j0 * p.v_tok_stride,
                        p.v_tok_stride, cols, kBc, p.head_dim, vec, tid, C::kThreads);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();

        float sc[kNT][4], dp[kNT][4];
#pragma unroll
        for (int n = 0; n < kNT; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) sc[n][e] = dp[n][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            typename M::FragA a, ad;
            M::load_a(a, sQ + warp * 16 * kLd + kk * 16, kLd, lane);
            M::load_a(ad, sdO + warp * 16 * kLd + kk * 16, kLd, lane);
#pragma unroll
            for (int n2 = 0; n2 < kNT / 2; ++n2) {
                typename M::FragB b0, b1;
                M::load_b_nk2(b0, b1, sK + n2 * 16 * kLd + kk * 16, kLd, lane);
                M::mma(sc[2 * n2], a, b0);
                M::mma(sc[2 * n2 + 1], a, b1);
                M::load_b_nk2(b0, b1, sV + n2 * 16 * kLd + kk * 16, kLd, lane);
                M::mma(dp[2 * n2], ad, b0);
                M::mma(dp[2 * n2 + 1], ad, b1);
            }
        }
#pragma unroll
        for (int n = 0; n < kNT; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = row[e >> 1], j = j0 + n * 8 + 2 * c + (e & 1);
                const float raw = sc[n][e] * p.scale;
                const bool vis = i < sq.q_len && j < j0 + cols && md.visible(i, j);
                const float pr = vis ? fexp(md.modify(raw, i, j) - lse[e >> 1]) : 0.f;
                const float z = (p.has_dropout && vis) ? dr.one(i, j) : 1.f;
                dp[n][e] = pr * (dp[n][e] * z - delta[e >> 1]) * md.softcap_grad(raw);
            }
        // dQ += dS K, dS straight from registers as the A operand.
#pragma unroll
        for (int kk = 0; kk < kBc / 16; ++kk) {
            typename M::FragA a;
            M::acc_to_a(a, dp[2 * kk], dp[2 * kk + 1]);
#pragma unroll
            for (int d2 = 0; d2 < D / 16; ++d2) {
                typename M::FragB b0, b1;
                M::load_b_kn2(b0, b1, sK + kk * 16 * kLd + d2 * 16, kLd, lane);
                M::mma(acc[2 * d2], a, b0);
                M::mma(acc[2 * d2 + 1], a, b1);
            }
        }
    }
    cp_async_wait<0>();
    T* gdq = static_cast<T*>(p.dq) + o_base;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (row[r] >= sq.q_len) continue;
        T* dst = gdq + (long long)row[r] * p.o_tok_stride;
#pragma unroll
        for (int d = 0; d < kDT; ++d) {
            const int col = d * 8 + 2 * c;
            if (col < p.head_dim) dst[col] = from_f32<T>(acc[d][2 * r] * p.scale);
            if (col + 1 < p.head_dim) dst[col + 1] = from_f32<T>(acc[d][2 * r + 1] * p.scale);
        }
    }
}

}  // namespace flash

FLASH_KERNELS_TD(bwd_dq, DqCfg)
