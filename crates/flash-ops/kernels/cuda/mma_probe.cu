// Probe of the warp-level operand loads and products of flash_mma.cuh, for checking that the
// emulator's ldmatrix / mma (crates/flash-emu/csrc/cuda_shim.h) agree with the hardware: run on both, each
// result compared with a plain matrix product. One warp; A = q, B = k (16x16 each, row-major,
// in the kernel dtype); writes three 16x16 f32 products to dq_accum:
//   [0]  A B^T  (load_a + load_b_nk2: B stored [n][k], as K in Q K^T)
//   [1]  A B    (load_a + load_b_kn2: B stored [k][n], as V in P V, ldmatrix.trans)
//   [2]  A^T B  (load_a_trans + load_b_kn2: A stored [k][m], as dS^T in dQ = dS K)
// and [3] = (A B^T) rounded through acc_to_a then multiplied by B (the P -> A-operand path).
#include "flash_mma.cuh"

namespace flash {
template <typename T> __device__ void mma_probe(const FlashParams& p) {
    using M = Mma<T>;
    constexpr int kLd = 16 + 16 / (int)sizeof(T);
    FLASH_DYNAMIC_SMEM(smem_raw);
    T* sA = reinterpret_cast<T*>(smem_raw);
    T* sB = sA + 16 * kLd;
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    for (int e = lane; e < 256; e += 32) {
        sA[(e / 16) * kLd + e % 16] = static_cast<const T*>(p.q)[e];
        sB[(e / 16) * kLd + e % 16] = static_cast<const T*>(p.k)[e];
    }
    __syncthreads();
    float acc[4][2][4] = {};
    typename M::FragA a, at;
    typename M::FragB b0, b1;
    M::load_a(a, sA, kLd, lane);
    M::load_a_trans(at, sA, kLd, lane);
    M::load_b_nk2(b0, b1, sB, kLd, lane);
    M::mma(acc[0][0], a, b0);
    M::mma(acc[0][1], a, b1);
    M::load_b_kn2(b0, b1, sB, kLd, lane);
    M::mma(acc[1][0], a, b0);
    M::mma(acc[1][1], a, b1);
    M::mma(acc[2][0], at, b0);
    M::mma(acc[2][1], at, b1);
    typename M::FragA pa;
    M::acc_to_a(pa, acc[0][0], acc[0][1]);
    M::mma(acc[3][0], pa, b0);
    M::mma(acc[3][1], pa, b1);
    for (int r = 0; r < 4; ++r)
        for (int t = 0; t < 2; ++t)
            for (int e = 0; e < 4; ++e)
                p.dq_accum[r * 256 + (g + 8 * (e >> 1)) * 16 + t * 8 + 2 * c + (e & 1)] = acc[r][t][e];
}
}  // namespace flash

FLASH_KERNELS_T(mma_probe, 32)
