// FlashAttention backward schedule (Dao et al. 2022, Algorithm 4): one block per (sequence,
// k/v head), the outer loop over k/v tiles, the inner loop over query tiles, dQ read, updated
// and written back in HBM for every k/v tile. The block owns every query head of its GQA group,
// so nothing else writes those dQ rows and no atomics are needed. Less parallelism (batch x
// heads blocks) is exactly what FlashAttention-2 fixed; this kernel exists for that comparison.
// bwd_v1_masked: the block-sparse instance (the plan picks it when a block mask is given).
#include "bwd_tile.cuh"

namespace flash {
template <typename T, int D, bool kMasked> __device__ void bwd_v1_run(const FlashParams& p) {
    using C = BwdCfg<T, D, kMasked>;
    check_launch(C::kSmem, C::kThreads);
    const Seq sq(p, blockIdx.z);
    for (int j0 = 0; j0 < sq.k_len; j0 += C::kBc)
        bwd_kv_tile<T, D, false, kMasked>(p, sq, blockIdx.z, blockIdx.y, j0);
}
template <typename T, int D> __device__ void bwd_v1(const FlashParams& p) { bwd_v1_run<T, D, false>(p); }
template <typename T, int D> __device__ void bwd_v1_masked(const FlashParams& p) { bwd_v1_run<T, D, true>(p); }
}  // namespace flash

FLASH_KERNELS_TD(bwd_v1, BwdCfg)
FLASH_KERNELS_TD(bwd_v1_masked, BwdCfgMasked)
