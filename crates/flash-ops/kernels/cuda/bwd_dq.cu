// Deterministic dQ for the FlashAttention-2 backward: one block per (query tile, query head,
// sequence), the forward kernel's shape, walking the visible k/v tiles in order and keeping dQ
// in registers, so every element is summed in one fixed order and written once (no atomics).
// In deterministic mode bwd_v2.cu then skips its dQ step (dq_accum = null) and only produces
// dK and dV. The price is recomputing S and dP once more (about 1.4x the backward FLOPs).
//   S = Q K^T, P = exp(mod(scale S) - lse), dP = dO V^T, dS = P (dP Z - delta) softcap',
//   dQ += scale dS K.
#include "bwd_tile.cuh"  // score_grad
#include "flash_acc.cuh"
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
    constexpr int kBr = C::kBr, kBc = C::kBc, kLd = C::kLd, kNT = kBc / 8, kDT = D / 8;
    check_launch(C::kSmem, C::kThreads);

    const auto [s, h, hk, sq, md, dr] = QueryHead(p);
    const int i0 = blockIdx.x * kBr;
    if (i0 >= sq.q_len) return;
    const int rows = min(kBr, sq.q_len - i0);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
    FLASH_DYNAMIC_SMEM(smem_raw);
    T* sQ = reinterpret_cast<T*>(smem_raw);
    T* sdO = sQ + kBr * kLd;
    T* sK = sdO + kBr * kLd;
    T* sV = sK + kBc * kLd;
    const long long lse_base = sq.lse_off + (long long)h * p.lse_head_stride;

    load_tile<T, D>(sQ, kLd, sq.q<T>(p, h), i0, rows, kBr, p, tid, C::kThreads);
    load_tile<T, D>(sdO, kLd, sq.d_o<T>(p, h), i0, rows, kBr, p, tid, C::kThreads);
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
    zero_acc(acc);

    int k_lo, k_hi;
    md.key_range_rows(i0, i0 + rows, k_lo, k_hi);
    const BlockMask bm(p);
    const int qb = bm.q_block(i0);
    TileWalk walk = bm.keys(s, h, qb, k_lo, k_hi, kBc);
    for (Tile kt; walk.next(kt);) {
        const int j0 = kt.x0, cols = kt.n;
        const BlockBits bb = bm.bits(kt.id, qb, kt.blk);
        __syncthreads();  // previous tile's readers of sK / sV are done
        load_tile<T, D>(sK, kLd, sq.k<T>(p, hk), j0, cols, kBc, p, tid, C::kThreads);
        load_tile<T, D>(sV, kLd, sq.v<T>(p, hk), j0, cols, kBc, p, tid, C::kThreads);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();

        float sc[kNT][4], dp[kNT][4];
        zero_acc(sc);
        zero_acc(dp);
        mma_abt2<D>(sc, sQ + warp * 16 * kLd, sK, dp, sdO + warp * 16 * kLd, sV, kLd, lane);
#pragma unroll
        for (int n = 0; n < kNT; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = row[e >> 1], j = j0 + n * 8 + 2 * c + (e & 1);
                float pz;  // P Z: dV's operand, not needed here
                const bool in_tile = i < sq.q_len && j < j0 + cols && bb.test(i, j);
                dp[n][e] = score_grad(p, md, dr, in_tile, i, j, sc[n][e], dp[n][e], lse[e >> 1],
                                      delta[e >> 1], pz);
            }
        // dQ += dS K, dS straight from registers as the A operand.
        mma_pb(acc, dp, sK, kLd, lane);
    }
    cp_async_wait<0>();
    T* gdq = static_cast<T*>(p.dq) + sq.o_off + (long long)h * p.head_dim;
#pragma unroll
    for (int r = 0; r < 2; ++r)
        if (row[r] < sq.q_len)
            store_row(gdq + (long long)row[r] * p.o_tok_stride, acc, r, c, p.scale, p.head_dim);
}

}  // namespace flash

FLASH_KERNELS_TD(bwd_dq, DqCfg)
