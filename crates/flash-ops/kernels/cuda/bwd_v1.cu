// FlashAttention backward schedule (Dao et al. 2022, Algorithm 4): one block per (sequence,
// k/v head), the outer loop over k/v tiles, the inner loop over query tiles, dQ read, updated
// and written back in HBM for every k/v tile. The block owns every query head of its GQA group,
// so nothing else writes those dQ rows and no atomics are needed. Less parallelism (batch x
// heads blocks) is exactly what FlashAttention-2 fixed; this kernel exists for that comparison.
#include "bwd_tile.cuh"

namespace flash {
template <typename T, int D, bool kMasked> __device__ void bwd_v1_run(const FlashParams& p) {
    using C = BwdCfg<T, D, kMasked>;
    check_launch(C::kSmem, C::kThreads);
    const Seq sq(p, blockIdx.z);
    for (int j0 = 0; j0 < sq.k_len; j0 += C::kBc)
        bwd_kv_tile<T, D, false, kMasked>(p, sq, blockIdx.z, blockIdx.y, j0);
}
}  // namespace flash

FLASH_BWD_KERNELS(bwd_v1)
