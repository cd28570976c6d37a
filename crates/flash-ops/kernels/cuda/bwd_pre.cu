// Backward preprocessing: delta = rowsum(dO * O) per (sequence, head, row) (FlashAttention-2
// Algorithm 2 line 4), minus the lse's gradient when it has one (d lse / d s = P folds into the
// softmax gradient's row term: dS = P * (dP - (delta - dlse))), and for the FlashAttention (V1) schedule, whose forward saved m and l,
// the log-sum-exp lse = m + ln l that the backward tile step reads. One warp per row.
#include "flash_common.cuh"

namespace flash {
constexpr int kPreWarps = 4;
template <typename T> __device__ void bwd_pre(const FlashParams& p) {
    const int s = blockIdx.z, h = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const Seq sq(p, s);
    const int i = blockIdx.x * kPreWarps + warp;
    if (i >= sq.q_len) return;  // whole warp leaves; no block barrier below
    const long long o = sq.o_off + (long long)h * p.head_dim + (long long)i * p.o_tok_stride;
    const T* go = static_cast<const T*>(p.o) + o;
    const T* gdo = static_cast<const T*>(p.d_o) + o;
    float acc = 0.f;
    for (int d = lane; d < p.head_dim; d += 32) acc += to_f32(go[d]) * to_f32(gdo[d]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) {
        const long long idx = sq.lse_off + (long long)h * p.lse_head_stride + i;
        p.delta[idx] = p.dlse ? acc - p.dlse[idx] : acc;
        if (p.m_l) {
            const float m = p.m_l[idx], l = p.m_l[p.lse_len + idx];
            p.lse[idx] = l > 0.f ? m + logf(l) : -FLASH_INF;
        }
    }
}
}  // namespace flash

FLASH_KERNELS_T(bwd_pre, flash::kPreWarps * 32)
