// FlashAttention-2 backward (Dao 2023, Algorithm 2): one block per (k/v tile, k/v head,
// sequence), so dK and dV are private to the block and written once; dQ is accumulated in f32
// with atomics (bwd_post.cu converts it). Deterministic mode runs it with dq_accum = null (dK,
// dV only) and computes dQ in bwd_dq.cu. The tile step itself is in bwd_tile.cuh.
#include "bwd_tile.cuh"

namespace flash {
template <typename T, int D, bool kMasked> __device__ void bwd_v2_run(const FlashParams& p) {
    using C = BwdCfg<T, D, kMasked>;
    check_launch(C::kSmem, C::kThreads);
    const Seq sq(p, blockIdx.z);
    const int j0 = blockIdx.x * C::kBc;
    if (j0 >= sq.k_len) return;  // padding block of a shorter sequence
    bwd_kv_tile<T, D, true, kMasked>(p, sq, blockIdx.z, blockIdx.y, j0);
}
}  // namespace flash

FLASH_BWD_KERNELS(bwd_v2)
