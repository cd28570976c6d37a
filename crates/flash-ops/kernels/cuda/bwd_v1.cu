// FlashAttention backward schedule (Dao et al. 2022, Algorithm 4): one block per (sequence,
// k/v head), the outer loop over k/v tiles, the inner loop over query tiles, dQ read, updated
// and written back in HBM for every k/v tile. The block owns every query head of its GQA group,
// so nothing else writes those dQ rows and no atomics are needed. Less parallelism (batch x
// heads blocks) is exactly what FlashAttention-2 fixed; this kernel exists for that comparison.
#include "bwd_tile.cuh"

namespace flash {
template <typename T, int D> __device__ void bwd_v1(const FlashParams& p) {
    check_launch(BwdCfg<T, D>::kSmem, BwdCfg<T, D>::kThreads);
    const Seq sq(p, blockIdx.z);
    for (int j0 = 0; j0 < sq.k_len; j0 += BwdCfg<T, D>::kBc)
        bwd_kv_tile<T, D, false>(p, sq, blockIdx.z, blockIdx.y, j0);
}
}  // namespace flash

#define FLASH_BWD_V1(NAME, T, D)                                                              \
    extern "C" __global__ void __launch_bounds__(flash::BwdCfg<T, D>::kThreads, 1)               \
        NAME(const FlashParams p) {                                                           \
        flash::bwd_v1<T, D>(p);                                                               \
    }                                                                                         \
    FLASH_EMU_REGISTER(NAME)

#define FLASH_BWD_V1_ALL_D(DT, T)                  \
    FLASH_BWD_V1(flash_bwd_v1_##DT##_d32, T, 32)   \
    FLASH_BWD_V1(flash_bwd_v1_##DT##_d64, T, 64)   \
    FLASH_BWD_V1(flash_bwd_v1_##DT##_d96, T, 96)   \
    FLASH_BWD_V1(flash_bwd_v1_##DT##_d128, T, 128) \
    FLASH_BWD_V1(flash_bwd_v1_##DT##_d256, T, 256)

FLASH_BWD_V1_ALL_D(f32, float)
FLASH_BWD_V1_ALL_D(f16, __half)
FLASH_BWD_V1_ALL_D(bf16, __nv_bfloat16)
