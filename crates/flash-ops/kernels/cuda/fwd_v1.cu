// FlashAttention (V1) forward schedule (Dao et al. 2022, Algorithm 1): one block per
// (sequence, query head). The outer loop runs over k/v tiles, the inner loop over the query
// tiles that see them; after each (q tile, k/v tile) product the output rows, m and l are read
// from global memory, rescaled and written back (an f32 accumulator, converted once at the
// end). That traffic and the batch x heads parallelism are what FlashAttention-2 removed; this
// kernel exists to reproduce the comparison. Saves m and l (m_l), like the CPU V1 path.
#include "flash_acc.cuh"
#include "flash_config.cuh"
#include "flash_mma.cuh"

namespace flash {

template <typename T, int D> __device__ void fwd_v1(const FlashParams& p) {
    using C = FwdCfg<T, D>;  // same tiles as V2; uses sQ + one K/V stage of its smem
    constexpr int kBr = C::kBr, kBc = C::kBc, kLd = C::kLd, kNT = kBc / 8, kDT = D / 8;
    check_launch(C::kSmem, C::kThreads);

    const auto [s, h, hk, sq, md, dr] = QueryHead(p);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
    FLASH_DYNAMIC_SMEM(smem_raw);
    T* sQ = reinterpret_cast<T*>(smem_raw);
    T* sK = sQ + kBr * kLd;
    T* sV = sK + kBc * kLd;

    const long long st = sq.lse_off + (long long)h * p.lse_head_stride;  // m at st + i
    float* gm = p.m_l + st;
    float* gl = p.m_l + p.lse_len + st;
    float* gacc = p.o_accum + sq.o_off + (long long)h * p.head_dim;
    for (int r = tid; r < sq.q_len; r += C::kThreads) {
        gm[r] = -FLASH_INF;
        gl[r] = 0.f;
    }
    for (long long e = tid; e < (long long)sq.q_len * p.head_dim; e += C::kThreads)
        gacc[(e / p.head_dim) * p.o_tok_stride + e % p.head_dim] = 0.f;

    const BlockMask bm(p);
    for (int j0 = 0; j0 < sq.k_len; j0 += kBc) {
        const int cols = min(kBc, sq.k_len - j0);
        int q_lo, q_hi;
        md.query_range_keys(j0, j0 + cols, q_lo, q_hi);
        // The query tiles that see these keys (block mask: of the query blocks its key block
        // lists, the transposed lists).
        const int kb = bm.k_block(j0);
        TileWalk qw = bm.queries(s, h, kb, q_lo, q_hi, kBr);
        Tile qt;
        if (!qw.next(qt)) continue;  // block skipping (uniform over the block)
        __syncthreads();  // previous tile: sK/sV readers and m/l writers done
        load_tile<T, D>(sK, kLd, sq.k<T>(p, hk), j0, cols, kBc, p, tid, C::kThreads);
        load_tile<T, D>(sV, kLd, sq.v<T>(p, hk), j0, cols, kBc, p, tid, C::kThreads);
        cp_async_commit();
        do {
            const int i0 = qt.x0, rows = qt.n;
            const BlockBits bb = bm.bits(qt.id, qt.blk, kb);
            __syncthreads();
            load_tile<T, D>(sQ, kLd, sq.q<T>(p, h), i0, rows, kBr, p, tid, C::kThreads);
            cp_async_commit();
            cp_async_wait<0>();
            __syncthreads();

            float sc[kNT][4];
            zero_acc(sc);
            mma_abt<D>(sc, sQ + warp * 16 * kLd, sK, kLd, lane);
            const int row[2] = {i0 + warp * 16 + g, i0 + warp * 16 + g + 8};
            mask_scores(sc, md, bb, p.scale, row, j0, cols, c, false);
            // Tile statistics m~, l~ and P~ = exp(S - m~) (Algorithm 1 line 10).
            float mt[2], lt[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                mt[r] = row_max(sc, r, -FLASH_INF);
                lt[r] = quad_sum(exp_row(sc, r, exp_base(mt[r])));
            }
            if (p.has_dropout) apply_dropout(sc, dr, row, j0, c);
            float pv[kDT][4];
            zero_acc(pv);
            mma_pb(pv, sc, sV, kLd, lane);
            // O_i <- diag(l_new)^-1 (diag(l_i) e^{m_i - m_new} O_i + e^{m~ - m_new} P~ V_j),
            // through global memory (Algorithm 1 lines 11-13).
            float m_new[2], l_new[2];
            bool upd[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int i = row[r];
                upd[r] = i < i0 + rows && mt[r] != -FLASH_INF;
                if (!upd[r]) continue;
                const float m_old = gm[i], l_old = gl[i];
                m_new[r] = fmaxf(m_old, mt[r]);
                const float a = fexp(m_old - m_new[r]), b = fexp(mt[r] - m_new[r]);
                l_new[r] = a * l_old + b * lt[r];
                const float c_old = a * l_old / l_new[r], c_new = b / l_new[r];
                float* orow = gacc + (long long)i * p.o_tok_stride;
#pragma unroll
                for (int d = 0; d < kDT; ++d) {
                    const int col = d * 8 + 2 * c;
                    if (col < p.head_dim) orow[col] = c_old * orow[col] + c_new * pv[d][2 * r];
                    if (col + 1 < p.head_dim)
                        orow[col + 1] = c_old * orow[col + 1] + c_new * pv[d][2 * r + 1];
                }
            }
            __syncwarp();  // the whole quad has read m, l before lane 0 overwrites them
            if (c == 0)
#pragma unroll
                for (int r = 0; r < 2; ++r)
                    if (upd[r]) {
                        gm[row[r]] = m_new[r];
                        gl[row[r]] = l_new[r];
                    }
        } while (qw.next(qt));
    }
    __syncthreads();
    T* go = static_cast<T*>(p.o) + sq.o_off + (long long)h * p.head_dim;
    for (long long e = tid; e < (long long)sq.q_len * p.head_dim; e += C::kThreads) {
        const long long o = (e / p.head_dim) * p.o_tok_stride + e % p.head_dim;
        go[o] = from_f32<T>(gacc[o]);
    }
}

}  // namespace flash

FLASH_KERNELS_TD(fwd_v1, FwdCfg)
