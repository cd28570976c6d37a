// FlashAttention-2 forward (Dao 2023, Algorithm 1). One block per (query tile of 64 rows,
// query head, sequence); each of the 4 warps owns 16 query rows for the whole pass, so the
// online-softmax statistics and the output accumulator stay in registers, P goes from the S
// accumulator straight into the P V product, and only the log-sum-exp is written.
// K/V tiles stream through shared memory with cp.async double buffering (the next tile loads
// while this one is multiplied). Tiles that no row of the block can see (causal, window) are
// never visited: the k loop runs over the visible key range of the block only.
#include "flash_config.cuh"
#include "flash_mma.cuh"

namespace flash {

template <typename T, int D> __device__ void fwd_v2(const FlashParams& p) {
    using C = FwdCfg<T, D>;
    using M = Mma<T>;
    constexpr int kBr = C::kBr, kBc = C::kBc, kLd = C::kLd, kNT = kBc / 8, kDT = D / 8;
    check_launch(C::kSmem, C::kThreads);

    const int s = blockIdx.z, h = blockIdx.y, i0 = blockIdx.x * kBr;
    const Seq sq(p, s);
    if (i0 >= sq.q_len) return;  // padding block of a shorter sequence (whole block leaves)
    const int rows = min(kBr, sq.q_len - i0);
    const int hk = h / (p.heads_q / p.heads_k);
    const Mods md(p, sq, s, h);
    const Dropout dr(p, s, h);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
    FLASH_DYNAMIC_SMEM(smem_raw);
    T* sQ = reinterpret_cast<T*>(smem_raw);
    T* sK = sQ + kBr * kLd;                   // [stage][kBc][kLd]
    T* sV = sK + C::kStages * kBc * kLd;      // [stage][kBc][kLd]

    const T* gq = static_cast<const T*>(p.q) + sq.q_off + h * p.q_head_stride +
                  (long long)i0 * p.q_tok_stride;
    const T* gk = static_cast<const T*>(p.k) + sq.k_off + hk * p.k_head_stride;
    const T* gv = static_cast<const T*>(p.v) + sq.v_off + hk * p.v_head_stride;
    const bool vec = p.vec_loads != 0;

    load_tile<T, D>(sQ, kLd, gq, p.q_tok_stride, rows, kBr, p.head_dim, vec, tid, C::kThreads);
    cp_async_commit();

    int k_lo, k_hi;
    md.key_range_rows(i0, i0 + rows, k_lo, k_hi);
    const int n_tiles = k_hi > k_lo ? (k_hi - k_lo + kBc - 1) / kBc : 0;

    float acc[kDT][4];
#pragma unroll
    for (int t = 0; t < kDT; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
    float m[2] = {-FLASH_INF, -FLASH_INF}, l[2] = {0.f, 0.f};  // rows g and g + 8 of the warp
    const int row[2] = {i0 + warp * 16 + g, i0 + warp * 16 + g + 8};

    auto load_kv = [&](int t, int stage) {
        int j0 = k_lo + t * kBc, cols = min(kBc, k_hi - j0);
        load_tile<T, D>(sK + stage * kBc * kLd, kLd, gk + (long long)j0 * p.k_tok_stride,
                        p.k_tok_stride, cols, kBc, p.head_dim, vec, tid, C::kThreads);
        load_tile<T, D>(sV + stage * kBc * kLd, kLd, gv + (long long)j0 * p.v_tok_stride,
                        p.v_tok_stride, cols, kBc, p.head_dim, vec, tid, C::kThreads);
        cp_async_commit();
    };
    if (n_tiles > 0) load_kv(0, 0);

    for (int t = 0; t < n_tiles; ++t) {
        const int stage = C::kStages == 2 ? (t & 1) : 0;
        if (C::kStages == 2 && t + 1 < n_tiles) {
            load_kv(t + 1, (t + 1) & 1);  // prefetch while this tile is multiplied
            cp_async_wait<1>();
        } else {
            if (C::kStages == 1 && t > 0) load_kv(t, 0);  // single stage: load, then wait
            cp_async_wait<0>();
        }
        __syncthreads();
        const T* cK = sK + stage * kBc * kLd;
        const T* cV = sV + stage * kBc * kLd;
        const int j0 = k_lo + t * kBc, cols = min(kBc, k_hi - j0);

        // S = Q K^T for this warp's 16 rows.
        float sc[kNT][4];
#pragma unroll
        for (int n = 0; n < kNT; ++n) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            typename M::FragA a;
            M::load_a(a, sQ + warp * 16 * kLd + kk * 16, kLd, lane);
#pragma unroll
            for (int n2 = 0; n2 < kNT / 2; ++n2) {
                typename M::FragB b0, b1;
                M::load_b_nk2(b0, b1, cK + n2 * 16 * kLd + kk * 16, kLd, lane);
                M::mma(sc[2 * n2], a, b0);
                M::mma(sc[2 * n2 + 1], a, b1);
            }
        }

        // Scale, modifiers, mask. The per-element path is skipped for interior tiles.
        const bool plain = !md.has_mods() && cols == kBc &&
                           md.tile_fully_visible(i0, i0 + rows, j0, j0 + cols);
#pragma unroll
        for (int n = 0; n < kNT; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float x = sc[n][e] * p.scale;
                if (!plain) {
                    int i = row[e >> 1], j = j0 + n * 8 + 2 * c + (e & 1);
                    x = (j < j0 + cols && md.visible(i, j)) ? md.modify(x, i, j) : -FLASH_INF;
                }
                sc[n][e] = x;
            }

        // Online softmax: new row max, rescale the accumulator, exponentiate. l stays a
        // per-lane partial sum (reduced over the quad once, at the end).
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = m[r];
#pragma unroll
            for (int n = 0; n < kNT; ++n) mx = fmaxf(mx, fmaxf(sc[n][2 * r], sc[n][2 * r + 1]));
            mx = quad_max(mx);
            const float base = mx == -FLASH_INF ? 0.f : mx;  // fully masked so far: exp(-inf) = 0
            const float corr = fexp(m[r] - base);
            m[r] = mx;
            float sum = 0.f;
#pragma unroll
            for (int n = 0; n < kNT; ++n) {
                sc[n][2 * r] = fexp(sc[n][2 * r] - base);
                sc[n][2 * r + 1] = fexp(sc[n][2 * r + 1] - base);
                sum += sc[n][2 * r] + sc[n][2 * r + 1];
            }
            l[r] = l[r] * corr + sum;
#pragma unroll
            for (int d = 0; d < kDT; ++d) {
                acc[d][2 * r] *= corr;
                acc[d][2 * r + 1] *= corr;
            }
        }
        // Dropout acts on the normalised probabilities: l above uses the undropped weights.
        if (p.has_dropout) {
#pragma unroll
            for (int n = 0; n < kNT; ++n)
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    float f0, f1;
                    dr.pair(row[r], j0 + n * 8 + 2 * c, f0, f1);
                    sc[n][2 * r] *= f0;
                    sc[n][2 * r + 1] *= f1;
                }
        }

        // O += P V, P taken from the S registers.
#pragma unroll
        for (int kk = 0; kk < kBc / 16; ++kk) {
            typename M::FragA a;
            M::acc_to_a(a, sc[2 * kk], sc[2 * kk + 1]);
#pragma unroll
            for (int d2 = 0; d2 < D / 16; ++d2) {
                typename M::FragB b0, b1;
                M::load_b_kn2(b0, b1, cV + kk * 16 * kLd + d2 * 16, kLd, lane);
                M::mma(acc[2 * d2], a, b0);
                M::mma(acc[2 * d2 + 1], a, b1);
            }
        }
        __syncthreads();  // the next prefetch overwrites this stage
    }
    cp_async_wait<0>();

    // Normalise, store O and the log-sum-exp (rows that saw no key: O = 0, lse = -inf).
    T* go = static_cast<T*>(p.o) + sq.o_off + (long long)h * p.head_dim;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float lt = quad_sum(l[r]);
        const float inv = lt > 0.f ? 1.f / lt : 0.f;
        const int i = row[r];
        if (i < sq.q_len) {
            T* orow = go + (long long)i * p.o_tok_stride;
#pragma unroll
            for (int d = 0; d < kDT; ++d) {
                int col = d * 8 + 2 * c;
                if (col < p.head_dim) orow[col] = from_f32<T>(acc[d][2 * r] * inv);
                if (col + 1 < p.head_dim) orow[col + 1] = from_f32<T>(acc[d][2 * r + 1] * inv);
            }
            if (c == 0)
                p.lse[sq.lse_off + (long long)h * p.lse_head_stride + i] =
                    lt > 0.f ? m[r] + logf(lt) : -FLASH_INF;
        }
    }
}

}  // namespace flash

FLASH_KERNELS_TD(fwd_v2, FwdCfg)
