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

FLASH_KERNELS_T(bwd_post, 256)
