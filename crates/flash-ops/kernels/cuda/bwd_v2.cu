// FlashAttention-2 backward (Dao 2023, Algorithm 2): one block per (k/v tile, k/v head,
// sequence), so dK and dV are private to the block and written once; dQ is accumulated in f32
// with atomics (bwd_post.cu converts it). Deterministic mode runs it with dq_accum = null (dK,
// dV only) and computes dQ in bwd_dq.cu. The tile step itself is in bwd_tile.cuh.
#include "bwd_tile.cuh"

namespace flash {
template <typename T, int D> __device__ void bwd_v2(const FlashParams& p) {
    check_launch(BwdCfg<T, D>::kSmem, BwdCfg<T, D>::kThreads);
    const Seq sq(p, blockIdx.z);
    const int j0 = blockIdx.x * BwdCfg<T, D>::kBc;
    if (j0 >= sq.k_len) return;  // padding block of a shorter sequence
    bwd_kv_tile<T, D, true>(p, sq, blockIdx.z, blockIdx.y, j0);
}
}  // namespace flash

#define FLASH_BWD_V2(NAME, T, D)                                                              \
    extern "C" __global__ void __launch_bounds__(flash::BwdCfg<T, D>::kThreads, 1)               \
        NAME(const FlashParams p) {                                                           \
        flash::bwd_v2<T, D>(p);                                                               \
    }                                                                                         \
    FLASH_EMU_REGISTER(NAME)

#define FLASH_BWD_V2_ALL_D(DT, T)                  \
    FLASH_BWD_V2(flash_bwd_v2_##DT##_d32, T, 32)   \
    FLASH_BWD_V2(flash_bwd_v2_##DT##_d64, T, 64)   \
    FLASH_BWD_V2(flash_bwd_v2_##DT##_d96, T, 96)   \
    FLASH_BWD_V2(flash_bwd_v2_##DT##_d128, T, 128) \
    FLASH_BWD_V2(flash_bwd_v2_##DT##_d256, T, 256)

FLASH_BWD_V2_ALL_D(f32, float)
FLASH_BWD_V2_ALL_D(f16, __half)
FLASH_BWD_V2_ALL_D(bf16, __nv_bfloat16)
