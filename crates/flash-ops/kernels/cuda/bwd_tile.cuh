// The backward step of one key/value tile, shared by the FlashAttention-2 kernel (bwd_v2.cu,
// one block per k/v tile, dQ by f32 atomics) and the FlashAttention schedule (bwd_v1.cu, one
// block per (sequence, k/v head) walking its tiles in order, dQ by plain read-add-write).
//
// For each query head of the GQA group and each query tile that sees the keys (block skipping),
// with lse and delta = rowsum(dO * O) precomputed (bwd_pre.cu):
//   S^T = K Q^T,  P^T = exp(mod(scale S^T) - lse)       (transposed: warps own keys)
//   dV += (P Z)^T dO                                    Z: dropout factors, regenerated
//   dP^T = V dO^T,  dS^T = P^T * (dP^T Z - delta) * softcap'
//   dK += dS^T Q                                        (scaled once at the end)
//   dQ += scale dS K                                    via dS^T in shared memory
// dK and dV stay in registers for the whole block and are written once.
#pragma once
#include "flash_config.cuh"
#include "flash_mma.cuh"

namespace flash {

template <typename T, int D, bool kAtomicDq>
__device__ void bwd_kv_tile(const FlashParams& p, const Seq& sq, int s, int hk, int j0) {
    using C = BwdCfg<T, D>;
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
    const bool vec = p.vec_loads != 0;
    const int group = p.heads_q / p.heads_k;

    __syncthreads();  // a previous tile of this block may still read sK (dQ step)
    load_tile<T, D>(sK, kLd,
                    static_cast<const T*>(p.k) + sq.k_off + hk * p.k_head_stride +
                        (long long)j0 * p.k_tok_stride,
                    p.k_tok_stride, cols, kBc, p.head_dim, vec, tid, C::kThreads);
    load_tile<T, D>(sV, kLd,
                    static_cast<const T*>(p.v) + sq.v_off + hk * p.v_head_stride +
                        (long long)j0 * p.v_tok_stride,
                    p.v_tok_stride, cols, kBc, p.head_dim, vec, tid, C::kThreads);
    cp_async_commit();

    float dk[kSliceT][4], dv[kSliceT][4];
#pragma unroll
    for (int t = 0; t < kSliceT; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[t][e] = dv[t][e] = 0.f;
    const int key[2] = {j0 + wk * 16 + g, j0 + wk * 16 + g + 8};

    for (int h = hk * group; h < (hk + 1) * group; ++h) {
        const Mods md(p, sq, s, h);
        const Dropout dr(p, s, h);
        int q_lo, q_hi;
        md.query_range_keys(j0, j0 + cols, q_lo, q_hi);
        const long long lse_base = sq.lse_off + (long long)h * p.lse_head_stride;
        const long long o_base = sq.o_off + (long long)h * p.head_dim;
        for (int i0 = q_lo; i0 < q_hi; i0 += kBr) {
            const int rows = min(kBr, q_hi - i0);
            __syncthreads();  // the previous step is done with sQ, sdO, sdS
            load_tile<T, D>(sQ, kLd,
                            static_cast<const T*>(p.q) + sq.q_off + h * p.q_head_stride +
                                (long long)i0 * p.q_tok_stride,
                            p.q_tok_stride, rows, kBr, p.head_dim, vec, tid, C::kThreads);
            load_tile<T, D>(sdO, kLd,
                            static_cast<const T*>(p.d_o) + o_base + (long long)i0 * p.o_tok_stride,
                            p.o_tok_stride, rows, kBr, p.head_dim, vec, tid, C::kThreads);
            cp_async_commit();
            for (int r = tid; r < kBr; r += C::kThreads) {
                // Rows past the tile get lse = +inf: P = exp(-inf) = 0, they add nothing.
                sLse[r] = r < rows ? p.lse[lse_base + i0 + r] : FLASH_INF;
                sDelta[r] = r < rows ? p.delta[lse_base + i0 + r] : 0.f;
            }
            cp_async_wait<0>();
            __syncthreads();

            // S^T = K Q^T: this warp's 16 keys x kBr queries.
            float pt[kQT][4], dpt[kQT][4], cg[kQT][4];
#pragma unroll
            for (int n = 0; n < kQT; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) pt[n][e] = dpt[n][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                typename M::FragA a, av;
                M::load_a(a, sK + wk * 16 * kLd + kk * 16, kLd, lane);
                M::load_a(av, sV + wk * 16 * kLd + kk * 16, kLd, lane);
#pragma unroll
                for (int n2 = 0; n2 < kQT / 2; ++n2) {
                    typename M::FragB b0, b1;
                    M::load_b_nk2(b0, b1, sQ + n2 * 16 * kLd + kk * 16, kLd, lane);
                    M::mma(pt[2 * n2], a, b0);
                    M::mma(pt[2 * n2 + 1], a, b1);
                    // dP^T = V dO^T shares the k loop.
                    M::load_b_nk2(b0, b1, sdO + n2 * 16 * kLd + kk * 16, kLd, lane);
                    M::mma(dpt[2 * n2], av, b0);
                    M::mma(dpt[2 * n2 + 1], av, b1);
                }
            }
            // P^T, dropout, dS^T. Element e of n-tile n: key key[e >> 1], query n*8 + 2c + (e&1).
#pragma unroll
            for (int n = 0; n < kQT; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int qi = n * 8 + 2 * c + (e & 1), i = i0 + qi, j = key[e >> 1];
                    const float raw = pt[n][e] * p.scale;
                    const bool vis = qi < rows && j < j0 + cols && md.visible(i, j);
                    const float pr = vis ? fexp(md.modify(raw, i, j) - sLse[qi]) : 0.f;
                    const float z = (p.has_dropout && vis) ? dr.one(i, j) : 1.f;
                    cg[n][e] = md.softcap_grad(raw);
                    pt[n][e] = pr;
                    dpt[n][e] = pr * (dpt[n][e] * z - sDelta[qi]) * cg[n][e];
                    cg[n][e] = pr * z;  // reuse: the dropped probabilities for dV
                }
            // dV += (P Z)^T dO and dK += dS^T Q for this warp's head-dim slice.
#pragma unroll
            for (int kq = 0; kq < kBr / 16; ++kq) {
                typename M::FragA apz, ads;
                M::acc_to_a(apz, cg[2 * kq], cg[2 * kq + 1]);
                M::acc_to_a(ads, dpt[2 * kq], dpt[2 * kq + 1]);
#pragma unroll
                for (int d2 = 0; d2 < kSliceD / 16; ++d2) {
                    typename M::FragB b0, b1;
                    M::load_b_kn2(b0, b1, sdO + kq * 16 * kLd + wd * kSliceD + d2 * 16, kLd, lane);
                    M::mma(dv[2 * d2], apz, b0);
                    M::mma(dv[2 * d2 + 1], apz, b1);
                    M::load_b_kn2(b0, b1, sQ + kq * 16 * kLd + wd * kSliceD + d2 * 16, kLd, lane);
                    M::mma(dk[2 * d2], ads, b0);
                    M::mma(dk[2 * d2 + 1], ads, b1);
                }
            }
            // dQ = scale dS K: dS^T goes through shared memory (warps own keys, dQ rows need
            // all of them); the slice-0 warp of each key group writes it.
            if (p.dq_accum == nullptr) continue;  // deterministic mode: bwd_dq.cu makes dQ
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
