// FlashAttention-2 forward (Dao 2023, Algorithm 1). One block per (query tile of 64 rows,
// query head, sequence); each of the 4 warps owns 16 query rows for the whole pass, so the
// online-softmax statistics and the output accumulator stay in registers, P goes from the S
// accumulator straight into the P V product, and only the log-sum-exp is written.
// K/V tiles stream through shared memory with cp.async double buffering (the next tile loads
// while this one is multiplied). Tiles that no row of the block can see (causal, window) are
// never visited: the k loop runs over the visible key range of the block only (and, with a
// block mask, over the key blocks its query block lists).
#include "flash_acc.cuh"
#include "flash_config.cuh"
#include "flash_mma.cuh"

namespace flash {

template <typename T, int D> __device__ void fwd_v2(const FlashParams& p) {
    using C = FwdCfg<T, D>;
    constexpr int kBr = C::kBr, kBc = C::kBc, kLd = C::kLd, kNT = kBc / 8, kDT = D / 8;
    check_launch(C::kSmem, C::kThreads);

    const auto [s, h, hk, sq, md, dr] = QueryHead(p);
    const int i0 = blockIdx.x * kBr;
    if (i0 >= sq.q_len) return;  // padding block of a shorter sequence (whole block leaves)
    const int rows = min(kBr, sq.q_len - i0);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
    FLASH_DYNAMIC_SMEM(smem_raw);
    T* sQ = reinterpret_cast<T*>(smem_raw);
    T* sK = sQ + kBr * kLd;                   // [stage][kBc][kLd]
    T* sV = sK + C::kStages * kBc * kLd;      // [stage][kBc][kLd]

    load_tile<T, D>(sQ, kLd, sq.q<T>(p, h), i0, rows, kBr, p, tid, C::kThreads);
    cp_async_commit();

    int k_lo, k_hi;
    md.key_range_rows(i0, i0 + rows, k_lo, k_hi);
    // The key tiles of the visible range (block mask: of the listed blocks only).
    const BlockMask bm(p);
    const int qb = bm.q_block(i0);
    TileWalk walk = bm.keys(s, h, qb, k_lo, k_hi, kBc);

    float acc[kDT][4];
    zero_acc(acc);
    float m[2] = {-FLASH_INF, -FLASH_INF}, l[2] = {0.f, 0.f};  // rows g and g + 8 of the warp
    const int row[2] = {i0 + warp * 16 + g, i0 + warp * 16 + g + 8};

    const Rows<T> gk = sq.k<T>(p, hk), gv = sq.v<T>(p, hk);
    auto load_kv = [&](const Tile& t, int stage) {
        load_tile<T, D>(sK + stage * kBc * kLd, kLd, gk, t.x0, t.n, kBc, p, tid, C::kThreads);
        load_tile<T, D>(sV + stage * kBc * kLd, kLd, gv, t.x0, t.n, kBc, p, tid, C::kThreads);
        cp_async_commit();
    };
    Tile cur;
    bool have = walk.next(cur);
    if (have) load_kv(cur, 0);

    for (int t = 0; have; ++t) {
        const int stage = C::kStages == 2 ? (t & 1) : 0;
        Tile nxt;
        const bool more = walk.next(nxt);
        if (C::kStages == 2 && more) {
            load_kv(nxt, (t + 1) & 1);  // prefetch while this tile is multiplied
            cp_async_wait<1>();
        } else {
            if (C::kStages == 1 && t > 0) load_kv(cur, 0);  // single stage: load, then wait
            cp_async_wait<0>();
        }
        __syncthreads();
        const T* cK = sK + stage * kBc * kLd;
        const T* cV = sV + stage * kBc * kLd;
        const int j0 = cur.x0, cols = cur.n;

        // S = Q K^T for this warp's 16 rows; scale, modifiers, mask (skipped for interior tiles
        // of full blocks).
        float sc[kNT][4];
        zero_acc(sc);
        mma_abt<D>(sc, sQ + warp * 16 * kLd, cK, kLd, lane);
        const BlockBits bb = bm.bits(cur.id, qb, cur.blk);
        const bool plain = !md.has_mods() && cols == kBc && bb.full() &&
                           md.tile_fully_visible(i0, i0 + rows, j0, j0 + cols);
        mask_scores(sc, md, bb, p.scale, row, j0, cols, c, plain);

        // Online softmax: new row max, rescale the accumulator, exponentiate. l stays a
        // per-lane partial sum (reduced over the quad once, at the end).
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float mx = row_max(sc, r, m[r]);
            const float base = exp_base(mx);
            const float corr = fexp(m[r] - base);
            m[r] = mx;
            l[r] = l[r] * corr + exp_row(sc, r, base);
#pragma unroll
            for (int d = 0; d < kDT; ++d) {
                acc[d][2 * r] *= corr;
                acc[d][2 * r + 1] *= corr;
            }
        }
        // Dropout acts on the normalised probabilities: l above uses the undropped weights.
        if (p.has_dropout) apply_dropout(sc, dr, row, j0, c);

        // O += P V, P taken from the S registers.
        mma_pb(acc, sc, cV, kLd, lane);
        __syncthreads();  // the next prefetch overwrites this stage
        cur = nxt;
        have = more;
    }
    cp_async_wait<0>();

    // Normalise, store O and the log-sum-exp (rows that saw no key: O = 0, lse = -inf).
    T* go = static_cast<T*>(p.o) + sq.o_off + (long long)h * p.head_dim;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float lt = quad_sum(l[r]);
        const int i = row[r];
        if (i < sq.q_len) {
            store_row(go + (long long)i * p.o_tok_stride, acc, r, c, lt > 0.f ? 1.f / lt : 0.f,
                      p.head_dim);
            if (c == 0)
                p.lse[sq.lse_off + (long long)h * p.lse_head_stride + i] =
                    lt > 0.f ? m[r] + logf(lt) : -FLASH_INF;
        }
    }
}

}  // namespace flash

FLASH_KERNELS_TD(fwd_v2, FwdCfg)
