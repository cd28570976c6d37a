// Backward postprocessing: the f32 dQ accumulator (already scaled) to the output dtype. Both
// are contiguous (total_q, hq, d), so this is a flat, grid-strided conversion.
#include "flash_common.cuh"

namespace flash {
template <typename T> __device__ void bwd_post(const FlashParams& p) {
    const long long n = p.total_q * p.o_tok_stride;
    T* dq = static_cast<T*>(p.dq);
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x)
        dq[e] = from_f32<T>(p.dq_accum[e]);
}
}  // namespace flash

#define FLASH_BWD_POST(NAME, T)                                                 \
    extern "C" __global__ void __launch_bounds__(256) NAME(const FlashParams p) { \
        flash::bwd_post<T>(p);                                                  \
    }                                                                           \
    FLASH_EMU_REGISTER(NAME)

FLASH_BWD_POST(flash_bwd_post_f32, float)
FLASH_BWD_POST(flash_bwd_post_f16, __half)
FLASH_BWD_POST(flash_bwd_post_bf16, __nv_bfloat16)
