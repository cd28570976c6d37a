// CUDA dialect shim for the SIMT emulator: lets kernels/cuda/*.cu compile as ordinary C++
// (g++ -x c++ -DFLASH_EMU -include cuda_shim.h) and run on simt.h's fibers.
//
// Maps: threadIdx/blockIdx/blockDim/gridDim, __syncthreads/__syncwarp, warp shuffles, atomics,
// half/bfloat16 storage types with round-to-nearest-even conversions, and the tensor-core
// operations the kernels route through flash_mma.cuh (ldmatrix, mma.sync m16n8k16), emulated
// from the PTX ISA's documented fragment layouts. Kernels register themselves by name
// (FLASH_EMU_REGISTER) and are started with emu_cuda_launch().
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <algorithm>

#include "fp16.h"
#include "simt.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

// ---- coordinates ------------------------------------------------------------------------------
struct dim3 {
    unsigned x, y, z;
};
namespace emu_cuda {
inline dim3 conv(simt::Dim3 d) { return {d.x, d.y, d.z}; }
}  // namespace emu_cuda
#define threadIdx (emu_cuda::conv(simt::thread_idx()))
#define blockIdx (emu_cuda::conv(simt::block_idx()))
#define blockDim (emu_cuda::conv(simt::block_dim()))
#define gridDim (emu_cuda::conv(simt::grid_dim()))
#define FLASH_DYNAMIC_SMEM(name) unsigned char* name = simt::shared_mem()

inline void __syncthreads() { simt::block_barrier(); }
inline void __syncwarp(unsigned = 0xffffffffu) { simt::warp_barrier(); }

// ---- small CUDA builtins ----------------------------------------------------------------------
using std::max;
using std::min;
struct uint2 { unsigned x, y; };
struct uint4 { unsigned x, y, z, w; };
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }
inline float __int_as_float(int i) { return emu_fp::bits_to_f32((uint32_t)i); }
// Fibers of a launch share one OS thread and switch only at barriers: a plain add is atomic.
inline float atomicAdd(float* p, float v) { float old = *p; *p = old + v; return old; }

template <typename T> inline T __shfl_sync(unsigned, T v, int src) {
    static_assert(sizeof(T) <= simt::kSlotBytes, "shuffle payload");
    const unsigned char* all = simt::warp_exchange(&v, sizeof(T));
    T out;
    std::memcpy(&out, all + (src & 31) * simt::kSlotBytes, sizeof(T));
    return out;
}
template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
    return __shfl_sync(mask, v, (int)simt::lane() ^ lane_mask);
}

// ---- 16-bit floating-point storage types --------------------------------------------------------
struct __half { uint16_t x; };
struct __nv_bfloat16 { uint16_t x; };

inline float __half2float(__half h) { return emu_fp::half_to_f32(h.x); }
inline __half __float2half_rn(float f) { return {emu_fp::f32_to_half(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return emu_fp::bf16_to_f32(b.x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {emu_fp::f32_to_bf16(f)}; }

// ---- tensor-core operations, emulated from the PTX ISA fragment layouts -----------------------
// ldmatrix.m8n8.x4.b16: lanes 8i..8i+7 give the row addresses of matrix i. Without .trans lane t
// receives (row t/4, cols 2(t%4), 2(t%4)+1) of each matrix; with .trans (rows 2(t%4), 2(t%4)+1,
// col t/4). Register i holds matrix i, first element in the low half.
inline void emu_ldmatrix_x4(uint32_t (&r)[4], const void* row_ptr, bool trans) {
    const unsigned char* all = simt::warp_exchange(&row_ptr, sizeof(row_ptr));
    auto row = [&](int l) {
        const uint16_t* p;
        std::memcpy(&p, all + l * simt::kSlotBytes, sizeof(p));
        return p;
    };
    const int t = (int)simt::lane();
    for (int i = 0; i < 4; ++i) {
        uint16_t lo, hi;
        if (!trans) {
            lo = row(8 * i + t / 4)[2 * (t % 4)];
            hi = row(8 * i + t / 4)[2 * (t % 4) + 1];
        } else {
            lo = row(8 * i + 2 * (t % 4))[t / 4];
            hi = row(8 * i + 2 * (t % 4) + 1)[t / 4];
        }
        r[i] = (uint32_t)lo | ((uint32_t)hi << 16);
    }
}

namespace emu_cuda {
// Where element (row, k) of the 16x16 A operand and (k, n) of the 16x8 B operand live in
// mma.m16n8k16: the lane, the 32-bit register, and the half within it.
struct Loc { int lane, reg, half; };
inline Loc a_loc(int row, int k) { return {4 * (row % 8) + (k % 8) / 2, row / 8 + 2 * (k / 8), k % 2}; }
inline Loc b_loc(int k, int n) { return {4 * n + (k % 8) / 2, k / 8, k % 2}; }

// D = A B + C for the calling lane's four accumulators (rows g, g+8; cols 2c, 2c+1), given
// accessors for every lane's A and B elements. Sums in k order in f32.
template <typename FA, typename FB> inline void mma_lane(float (&c)[4], FA a, FB b) {
    const int t = (int)simt::lane(), g = t / 4, cc = t % 4;
    for (int e = 0; e < 4; ++e) {
        const int row = g + 8 * (e / 2), col = 2 * cc + (e % 2);
        float acc = c[e];
        for (int k = 0; k < 16; ++k) acc += a(row, k) * b(k, col);
        c[e] = acc;
    }
}
}  // namespace emu_cuda

inline void emu_mma_m16n8k16_16bit(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool bf16) {
    struct Payload { uint32_t a[4], b[2]; } mine;
    std::memcpy(mine.a, a, sizeof(mine.a));
    std::memcpy(mine.b, b, sizeof(mine.b));
    const unsigned char* all = simt::warp_exchange(&mine, sizeof(mine));
    auto lane_of = [&](int l) { Payload p; std::memcpy(&p, all + l * simt::kSlotBytes, sizeof(p)); return p; };
    auto to_f = [&](uint32_t reg, int half) {
        const uint16_t bits = (uint16_t)(half ? reg >> 16 : reg & 0xffff);
        return bf16 ? __bfloat162float(__nv_bfloat16{bits}) : __half2float(__half{bits});
    };
    Payload lanes[32];
    for (int l = 0; l < 32; ++l) lanes[l] = lane_of(l);
    emu_cuda::mma_lane(
        c,
        [&](int row, int k) { auto L = emu_cuda::a_loc(row, k); return to_f(lanes[L.lane].a[L.reg], L.half); },
        [&](int k, int n) { auto L = emu_cuda::b_loc(k, n); return to_f(lanes[L.lane].b[L.reg], L.half); });
}

// The f32 kernels' fragments: register r[2 * reg + half] holds the 16-bit layout's element.
inline void emu_mma_m16n8k16_f32(float (&c)[4], const float (&a)[8], const float (&b)[4]) {
    struct Payload { float a[8], b[4]; } mine;
    std::memcpy(mine.a, a, sizeof(mine.a));
    std::memcpy(mine.b, b, sizeof(mine.b));
    const unsigned char* all = simt::warp_exchange(&mine, sizeof(mine));
    Payload lanes[32];
    for (int l = 0; l < 32; ++l) std::memcpy(&lanes[l], all + l * simt::kSlotBytes, sizeof(Payload));
    emu_cuda::mma_lane(
        c,
        [&](int row, int k) { auto L = emu_cuda::a_loc(row, k); return lanes[L.lane].a[2 * L.reg + L.half]; },
        [&](int k, int n) { auto L = emu_cuda::b_loc(k, n); return lanes[L.lane].b[2 * L.reg + L.half]; });
}

namespace simt { inline void check_launch(unsigned smem_needed, unsigned threads) {
    const Dim3 b = block_dim();
    if (shared_bytes() < smem_needed) fail("launch gave less dynamic shared memory than the kernel needs");
    if (b.x * b.y * b.z != threads) fail("launch block size differs from the kernel's");
} }

// ---- kernel registry --------------------------------------------------------------------------
namespace emu_cuda {
using Launcher = void (*)(const void* params);
void register_kernel(const char* name, Launcher fn, size_t params_size);
template <typename P, void (*K)(P)> void call(const void* params) {
    P p;
    std::memcpy(&p, params, sizeof(P));
    K(p);
}
struct Registrar {
    Registrar(const char* name, Launcher fn, size_t size) { register_kernel(name, fn, size); }
};
}  // namespace emu_cuda
#define FLASH_EMU_REGISTER(name)                                                       \
    static emu_cuda::Registrar emu_reg_##name(#name, &emu_cuda::call<FlashParams, name>, \
                                              sizeof(FlashParams));

extern "C" {
// Runs kernel `name` on a grid; returns 0, or 1 for an unknown name, 2 for a parameter-size
// mismatch (the Rust mirror of the params struct disagrees with the C one).
int emu_cuda_launch(const char* name, const unsigned grid[3], const unsigned block[3], size_t smem,
                    const void* params, size_t params_size);
}
