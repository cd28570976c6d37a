// The backward step of one key/value tile, shared by the FlashAttention-2 kernel (bwd_v2.cu,
// one block per k/v tile, dQ by f32 atomics) and the FlashAttention schedule (bwd_v1.cu, one
// block per (sequence, k/v head) walking its tiles in order, dQ by plain read-add-write).
//
// For each query head of the GQA group and each query tile that sees the keys (block skipping;
// with a block mask, only the query blocks the key block's column lists),
// with lse and delta = rowsum(dO * O) precomputed (bwd_pre.cu):
//   S^T = K Q^T,  P^T = exp(mod(scale S^T) - lse)       (transposed: warps own keys)
//   dV += (P Z)^T dO                                    Z: dropout factors, regenerated
//   dP^T = V dO^T,  dS^T = P^T * (dP^T Z - delta) * softcap'
//   dK += dS^T Q                                        (scaled once at the end)
//   dQ += scale dS K                                    via dS^T in shared memory
// dK and dV stay in registers for the whole block and are written once.
#pragma once
#include "flash_acc.cuh"
#include "flash_config.cuh"
#include "flash_mma.cuh"

namespace flash {

// One element (i, j) of the backward, from its raw score s = q.k and dp = dO.v (in_tile: the
// element lies inside the sequence's rows and keys, and its block mask bit is set):
// P = exp(mod(scale s) - lse) where visible, 0 elsewhere, the dropout factor Z, and dS = P (dP Z - delta) softcap'(scale s). Returns dS;
// `pz` receives P Z (dV's operand). Shared by the dK/dV tile step and bwd_dq.cu.
FLASH_DEV float score_grad(const FlashParams& p, const Mods& md, const Dropout& dr, bool in_tile,
                           int i, int j, float s, float dp, float lse, float delta, float& pz) {
    const float raw = s * p.scale;
    const bool vis = in_tile && md.visible(i, j);
    const float pr = vis ? fexp(md.modify(raw, i, j) - lse) : 0.f;
    const float z = (p.has_dropout && vis) ? dr.one(i, j) : 1.f;
    pz = pr * z;
    return pr * (dp * z - delta) * md.softcap_grad(raw);
}

// kMasked: walk the key block's column lists and test the partial blocks' bits (BwdCfgMasked
// tiles); the dense instance (no mask: the plan picks it) has neither.
template <typename T, int D, bool kAtomicDq, bool kMasked>
__device__ void bwd_kv_tile(const FlashParams& p, const Seq& sq, int s, int hk, int j0) {
    using C = BwdCfg<T, D, kMasked>;
    using M = Mma<T>;
    constexpr int kBc = C::kBc, kBr = C::kBr, kLd = C::kLd, kLdS = C::kLdS;
    constexpr int kSliceD = C::kSliceD, kQT = kBr / 8, kSliceT = kSliceD / 8;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
    const int wk = warp / C::kWarpsD, wd = warp % C::kWarpsD;  // key group, slice
    FLASH_DYNAMIC_SMEM(smem_raw);
    T* sK = reinterpret_cast<T*>(smem_raw);
    T* sV = sK + kBc * kLd;
    T* sQ = sV + kBc * kLd;
    T* sdO = sQ + kBr * kLd;
    T* sdS = sdO + kBr * kLd;  // [key][query]
    float* sLse = reinterpret_cast<float*>(sdS + kBc * kLdS);
    float* sDelta = sLse + kBr;

    const int cols = min(kBc, sq.k_len - j0);
    const int group = p.heads_q / p.heads_k;

    __syncthreads();  // a previous tile of this block may still read sK (dQ step)
    load_tile<T, D>(sK, kLd, sq.k<T>(p, hk), j0, cols, kBc, p, tid, C::kThreads);
    load_tile<T, D>(sV, kLd, sq.v<T>(p, hk), j0, cols, kBc, p, tid, C::kThreads);
    cp_async_commit();

    float dk[kSliceT][4], dv[kSliceT][4];
    zero_acc(dk);
    zero_acc(dv);
    const int key[2] = {j0 + wk * 16 + g, j0 + wk * 16 + g + 8};

    for (int h = hk * group; h < (hk + 1) * group; ++h) {
        const Mods md(p, sq, s, h);
        const Dropout dr(p, s, h);
        int q_lo, q_hi;
        md.query_range_keys(j0, j0 + cols, q_lo, q_hi);
        const long long lse_base = sq.lse_off + (long long)h * p.lse_head_stride;
        const long long o_base = sq.o_off + (long long)h * p.head_dim;
        // One query tile [i0, i0 + rows); bb: its block's bits (kMasked only).
        auto step = [&](int i0, int rows, const BlockBits& bb) {
            __syncthreads();  // the previous step is done with sQ, sdO, sdS
            load_tile<T, D>(sQ, kLd, sq.q<T>(p, h), i0, rows, kBr, p, tid, C::kThreads);
            load_tile<T, D>(sdO, kLd, sq.d_o<T>(p, h), i0, rows, kBr, p, tid, C::kThreads);
            cp_async_commit();
            for (int r = tid; r < kBr; r += C::kThreads) {
                // Rows past the tile get lse = +inf: P = exp(-inf) = 0, they add nothing.
                sLse[r] = r < rows ? p.lse[lse_base + i0 + r] : FLASH_INF;
                sDelta[r] = r < rows ? p.delta[lse_base + i0 + r] : 0.f;
            }
            cp_async_wait<0>();
            __syncthreads();

            // Masked: which of the lane's elements (below) lie inside the tile with their block
            // mask bit set, one bit each, formed before the products while registers are free.
            static_assert(kQT * 4 <= 32, "one bit per element of the lane");
            unsigned in_bits = 0;
            if constexpr (kMasked) {
#pragma unroll
                for (int n = 0; n < kQT; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int qi = n * 8 + 2 * c + (e & 1), j = key[e >> 1];
                        if (qi < rows && j < j0 + cols && bb.test(i0 + qi, j))
                            in_bits |= 1u << (4 * n + e);
                    }
            }

            // S^T = K Q^T and dP^T = V dO^T: this warp's 16 keys x kBr queries.
            float pt[kQT][4], dpt[kQT][4];
            zero_acc(pt);
            zero_acc(dpt);
            mma_abt2<D>(pt, sK + wk * 16 * kLd, sQ, dpt, sV + wk * 16 * kLd, sdO, kLd, lane);
            // P^T, dropout, dS^T. Element e of n-tile n: key key[e >> 1], query n*8 + 2c + (e&1).
#pragma unroll
            for (int n = 0; n < kQT; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int qi = n * 8 + 2 * c + (e & 1), i = i0 + qi, j = key[e >> 1];
                    const bool in_tile =
                        kMasked ? ((in_bits >> (4 * n + e)) & 1u) != 0 : (qi < rows && j < j0 + cols);
                    // pt becomes the dropped probabilities, for dV.
                    dpt[n][e] = score_grad(p, md, dr, in_tile, i, j, pt[n][e], dpt[n][e], sLse[qi],
                                           sDelta[qi], pt[n][e]);
                }
            // dV += (P Z)^T dO and dK += dS^T Q for this warp's head-dim slice.
            mma_pb2(dv, pt, sdO + wd * kSliceD, dk, dpt, sQ + wd * kSliceD, kLd, lane);
            // dQ = scale dS K: dS^T goes through shared memory (warps own keys, dQ rows need
            // all of them); the slice-0 warp of each key group writes it.
            if (p.dq_accum == nullptr) return;  // deterministic mode: bwd_dq.cu makes dQ
            if (wd == 0) {
#pragma unroll
                for (int n = 0; n < kQT; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        sdS[(wk * 16 + g + 8 * (e >> 1)) * kLdS + n * 8 + 2 * c + (e & 1)] =
                            from_f32<T>(dpt[n][e]);
            }
            __syncthreads();
            constexpr int kRG = kBr / 16, kUnits = kRG * (D / 16);
            for (int u = warp; u < kUnits; u += C::kWarps) {
                const int rg = u % kRG, dc = u / kRG;
                float qa[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
                for (int ks = 0; ks < kBc / 16; ++ks) {
                    typename M::FragA a;
                    typename M::FragB b0, b1;
                    M::load_a_trans(a, sdS + ks * 16 * kLdS + rg * 16, kLdS, lane);
                    M::load_b_kn2(b0, b1, sK + ks * 16 * kLd + dc * 16, kLd, lane);
                    M::mma(qa[0], a, b0);
                    M::mma(qa[1], a, b1);
                }
#pragma unroll
                for (int t = 0; t < 2; ++t)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int qi = rg * 16 + g + 8 * (e >> 1), col = dc * 16 + t * 8 + 2 * c + (e & 1);
                        if (qi < rows && col < p.head_dim) {
                            float* dst = p.dq_accum + o_base + (long long)(i0 + qi) * p.o_tok_stride + col;
                            if (kAtomicDq) atomicAdd(dst, p.scale * qa[t][e]);
                            else *dst += p.scale * qa[t][e];
                        }
                    }
            }
        };
        if constexpr (kMasked) {
            // Of the query tiles that see these keys, those in the blocks its column lists.
            const BlockMask bm(p);
            const int kb = bm.k_block(j0);
            const unsigned* listed;
            const int n_listed = bm.column(s, h, kb, listed);
            for (int le = 0; le < n_listed; ++le) {
                int lo = q_lo, hi = q_hi, qb = 0;
                unsigned id = kFullBlock;
                bm.column_entry(listed, le, lo, hi, qb, id);
                for (int i0 = lo; i0 < hi; i0 += kBr) step(i0, min(kBr, hi - i0), bm.bits(id, qb, kb));
            }
        } else {
            for (int i0 = q_lo; i0 < q_hi; i0 += kBr) step(i0, min(kBr, q_hi - i0), BlockBits{});
        }
    }

    // A tile that no query sees never waited for its K/V copies; they must land before the
    // next tile (bwd_v1) reuses the buffers.
    cp_async_wait<0>();

    // dK (scaled) and dV of this warp's 16 keys and head-dim slice.
    T* gdk = static_cast<T*>(p.dk) + sq.dk_off + (long long)hk * p.head_dim;
    T* gdv = static_cast<T*>(p.dv) + sq.dk_off + (long long)hk * p.head_dim;
#pragma unroll
    for (int t = 0; t < kSliceT; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int j = key[e >> 1], col = wd * kSliceD + t * 8 + 2 * c + (e & 1);
            if (j < j0 + cols && col < p.head_dim) {
                const long long o = (long long)j * p.dk_tok_stride + col;
                gdk[o] = from_f32<T>(dk[t][e] * p.scale);
                gdv[o] = from_f32<T>(dv[t][e]);
            }
        }
}

}  // namespace flash

// A backward schedule's two instances, flash_<NAME>_<dt>_d<D> and flash_<NAME>_masked_<dt>_d<D>:
// flash::<NAME>_run<T, D, kMasked> without and with a block mask (the plan picks the masked one
// when a mask is given; its tiles are BwdCfgMasked's).
#define FLASH_BWD_KERNELS(NAME)                                                                 \
    namespace flash {                                                                           \
    template <typename T, int D> __device__ void NAME(const FlashParams& p) {                   \
        NAME##_run<T, D, false>(p);                                                             \
    }                                                                                           \
    template <typename T, int D> __device__ void NAME##_masked(const FlashParams& p) {          \
        NAME##_run<T, D, true>(p);                                                              \
    }                                                                                           \
    }                                                                                           \
    FLASH_KERNELS_TD(NAME, BwdCfg)                                                              \
    FLASH_KERNELS_TD(NAME##_masked, BwdCfgMasked)
