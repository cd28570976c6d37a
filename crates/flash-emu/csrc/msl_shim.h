// Metal Shading Language shim for the SIMT emulator: lets kernels/metal/*.metal compile as
// ordinary C++ (g++ -x c++ -DFLASH_EMU, via kernels/metal/flash_metal.h) and run on simt.h's
// fibers, one fiber per Metal thread, a simdgroup being simt's 32-lane warp.
//
// Maps:
//  * address-space qualifiers (device, constant, threadgroup, thread) to nothing: one flat
//    host address space;
//  * the threadgroup buffer ([[threadgroup(0)]]) to the block's shared memory, and the
//    attribute-indexed positions (threadgroup_position_in_grid, thread_index_in_threadgroup,
//    simdgroup_index_in_threadgroup, thread_index_in_simdgroup) to simt's coordinates
//    (FLASH_THREAD_ARGS; 1-D threadgroups);
//  * threadgroup_barrier / simdgroup_barrier to the block / warp barriers;
//  * simd_shuffle, simd_shuffle_xor, simd_sum, simd_max to warp collectives;
//  * half and bfloat to 16-bit storage types with round-to-nearest-even conversions;
//  * simdgroup_matrix<T, 8, 8> with the semantics of the MSL specification (§6.7): load/store
//    of an 8x8 matrix from memory with a row pitch (optionally transposed),
//    make_filled_simdgroup_matrix, the diagonal constructor, simdgroup_multiply and
//    simdgroup_multiply_accumulate (D = A·B + C). The matrix is spread over the simdgroup two
//    elements per lane, in the layout Apple GPUs use (as reverse-engineered by MLX), and the
//    products are warp collectives: a kernel that reads elements through another path, or that
//    multiplies in divergent control flow, fails here (wrong values or a deadlock abort).
// Kernels register under their [[host_name]] via FLASH_INSTANCE and start with
// emu_metal_launch() (csrc/metal_launch.cpp).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <type_traits>
#include <utility>

#include "fp16.h"
#include "simt.h"

// ---- scalar types and math ----------------------------------------------------------------------
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;
struct uint3 {
    uint x, y, z;
};
struct ulong2 {
    ulong x, y;
    ulong2(ulong a = 0) : x(a), y(a) {}
    ulong2(ulong a, ulong b) : x(a), y(b) {}
};

using std::abs;
using std::exp;
using std::log;
using std::max;
using std::min;
using std::tanh;
inline uint mulhi(uint a, uint b) { return (uint)(((uint64_t)a * b) >> 32); }

// IEEE binary16, converted with round-to-nearest-even (as Metal's float -> half).
struct half {
    uint16_t bits;
    half() = default;
    half(float f) : bits(emu_fp::f32_to_half(f)) {}
    operator float() const { return emu_fp::half_to_f32(bits); }
};

// bfloat16 (MSL 3.1 `bfloat`), round-to-nearest-even.
struct bfloat {
    uint16_t bits;
    bfloat() = default;
    bfloat(float f) : bits(emu_fp::f32_to_bf16(f)) {}
    operator float() const { return emu_fp::bf16_to_f32(bits); }
};
#define __HAVE_BFLOAT__ 1

// ---- barriers and simdgroup collectives ----------------------------------------------------------
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline void threadgroup_barrier(mem_flags) { simt::block_barrier(); }
inline void simdgroup_barrier(mem_flags) { simt::warp_barrier(); }

template <typename T> inline T simd_shuffle(T v, ushort src) {
    static_assert(sizeof(T) <= simt::kSlotBytes, "shuffle payload");
    const unsigned char* all = simt::warp_exchange(&v, sizeof(T));
    T out;
    std::memcpy(&out, all + (src & 31) * simt::kSlotBytes, sizeof(T));
    return out;
}
template <typename T> inline T simd_shuffle_xor(T v, ushort mask) {
    return simd_shuffle(v, (ushort)(simt::lane() ^ mask));
}
template <typename T> inline T simd_sum(T v) {
    const unsigned char* all = simt::warp_exchange(&v, sizeof(T));
    T s = 0;
    for (int l = 0; l < simt::kWarpSize; ++l) {
        T x;
        std::memcpy(&x, all + l * simt::kSlotBytes, sizeof(T));
        s += x;
    }
    return s;
}
template <typename T> inline T simd_max(T v) {
    const unsigned char* all = simt::warp_exchange(&v, sizeof(T));
    T s = v;
    for (int l = 0; l < simt::kWarpSize; ++l) {
        T x;
        std::memcpy(&x, all + l * simt::kSlotBytes, sizeof(T));
        s = x > s ? x : s;
    }
    return s;
}

// ---- simdgroup_matrix ------------------------------------------------------------------------------
namespace msl_emu {
// Lane l holds elements (row, col) and (row, col + 1) of the 8x8 matrix.
inline int frag_row(int l) { return ((l / 4) & 4) + ((l / 2) % 4); }
inline int frag_col(int l) { return ((l / 4) & 2) * 2 + (l % 2) * 2; }
// The lane holding element (row, col).
inline int owner(int row, int col) {
    static const struct Table {
        signed char lane[8][8];
        Table() {
            for (int l = 0; l < 32; ++l) {
                lane[frag_row(l)][frag_col(l)] = (signed char)l;
                lane[frag_row(l)][frag_col(l) + 1] = (signed char)l;
            }
        }
    } t;
    return t.lane[row][col];
}
}  // namespace msl_emu

template <typename T, int Cols, int Rows> struct simdgroup_matrix {
    static_assert(Cols == 8 && Rows == 8, "the emulator implements 8x8 simdgroup matrices");
    T e[2];
    simdgroup_matrix() = default;
    // MSL: constructs a diagonal matrix with `dval` on the diagonal.
    explicit simdgroup_matrix(T dval) {
        const int l = (int)simt::lane(), r = msl_emu::frag_row(l), c = msl_emu::frag_col(l);
        e[0] = r == c ? dval : T(0.0f);
        e[1] = r == c + 1 ? dval : T(0.0f);
    }
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

template <typename T, int C, int R> inline simdgroup_matrix<T, C, R> make_filled_simdgroup_matrix(T v) {
    simdgroup_matrix<T, C, R> m;
    m.e[0] = m.e[1] = v;
    return m;
}

// Element (r, c) of the matrix is src[r * pitch + c], or src[c * pitch + r] when transposed.
// (Only the zero origin is implemented: the kernels offset the pointer instead.)
template <typename T, int C, int R>
inline void simdgroup_load(simdgroup_matrix<T, C, R>& m, const T* src, ulong pitch = 8,
                           ulong2 origin = ulong2(0, 0), bool transpose = false) {
    if (origin.x != 0 || origin.y != 0) simt::fail("simdgroup_load: non-zero origin not emulated");
    const int l = (int)simt::lane(), r = msl_emu::frag_row(l), c = msl_emu::frag_col(l);
    for (int t = 0; t < 2; ++t)
        m.e[t] = transpose ? src[(c + t) * pitch + r] : src[r * pitch + c + t];
}
template <typename T, int C, int R>
inline void simdgroup_store(const simdgroup_matrix<T, C, R>& m, T* dst, ulong pitch = 8,
                            ulong2 origin = ulong2(0, 0), bool transpose = false) {
    if (origin.x != 0 || origin.y != 0) simt::fail("simdgroup_store: non-zero origin not emulated");
    const int l = (int)simt::lane(), r = msl_emu::frag_row(l), c = msl_emu::frag_col(l);
    for (int t = 0; t < 2; ++t) {
        if (transpose)
            dst[(c + t) * pitch + r] = m.e[t];
        else
            dst[r * pitch + c + t] = m.e[t];
    }
}

// D = A·B + C over the simdgroup: every lane deposits its elements of A and B, then computes its
// own two elements of D (f32 accumulation in k order; c read before d is written, so d may
// alias a, b or c as in MSL).
template <typename T, int C, int R>
inline void simdgroup_multiply_accumulate(simdgroup_matrix<T, C, R>& d, const simdgroup_matrix<T, C, R>& a,
                                          const simdgroup_matrix<T, C, R>& b,
                                          const simdgroup_matrix<T, C, R>& c) {
    struct Payload {
        float a[2], b[2];
    } mine = {{(float)a.e[0], (float)a.e[1]}, {(float)b.e[0], (float)b.e[1]}};
    const float c0 = (float)c.e[0], c1 = (float)c.e[1];
    const unsigned char* all = simt::warp_exchange(&mine, sizeof(mine));
    Payload lanes[32];
    for (int l = 0; l < 32; ++l) std::memcpy(&lanes[l], all + l * simt::kSlotBytes, sizeof(Payload));
    auto at = [&](bool is_a, int row, int col) {
        const Payload& p = lanes[msl_emu::owner(row, col)];
        return (is_a ? p.a : p.b)[col % 2];
    };
    const int l = (int)simt::lane(), r = msl_emu::frag_row(l), col = msl_emu::frag_col(l);
    float acc[2] = {c0, c1};
    for (int t = 0; t < 2; ++t)
        for (int k = 0; k < 8; ++k) acc[t] += at(true, r, k) * at(false, k, col + t);
    d.e[0] = T(acc[0]);
    d.e[1] = T(acc[1]);
}
template <typename T, int C, int R>
inline void simdgroup_multiply(simdgroup_matrix<T, C, R>& d, const simdgroup_matrix<T, C, R>& a,
                               const simdgroup_matrix<T, C, R>& b) {
    simdgroup_multiply_accumulate(d, a, b, make_filled_simdgroup_matrix<T, C, R>(T(0.0f)));
}

// ---- address spaces, kernel arguments, registration ---------------------------------------------
// Defined last: these names must not reach the standard headers above.
#define device
#define constant
#define threadgroup
#define thread
#define FLASH_THREAD_ARGS float *smem, uint3 tgid, uint tid, uint sg, uint lane
#define FLASH_CHECK_SMEM(bytes)                                                               \
    if (simt::shared_bytes() < (size_t)(bytes))                                               \
        simt::fail("launch gave less threadgroup memory than the kernel needs");              \
    if (simt::block_dim().x != FLASH_THREADS)                                                 \
        simt::fail("launch threadgroup size differs from the kernel's");

namespace emu_metal {
// Calls a kernel with its buffer arguments taken positionally from `args` (buffer index i is
// args[i]: a pointer argument gets the pointer, a reference argument the object behind it).
using Invoker = std::function<void(void* const* args, float* smem, uint3 tgid, uint tid, uint sg, uint lane)>;
template <typename A> inline A arg_as(void* p) {
    if constexpr (std::is_pointer_v<A>)
        return static_cast<A>(p);
    else
        return *static_cast<std::remove_reference_t<A>*>(p);
}
template <typename... A, size_t... I>
inline void invoke(void (*k)(float*, uint3, uint, uint, uint, A...), void* const* args, float* smem, uint3 tgid,
                   uint tid, uint sg, uint lane, std::index_sequence<I...>) {
    k(smem, tgid, tid, sg, lane, arg_as<A>(args[I])...);
}
struct Entry {
    Invoker fn;
    size_t nargs;
};
template <typename... A> inline Entry wrap(void (*k)(float*, uint3, uint, uint, uint, A...)) {
    return Entry{[k](void* const* args, float* smem, uint3 tgid, uint tid, uint sg, uint lane) {
                     invoke(k, args, smem, tgid, tid, sg, lane, std::index_sequence_for<A...>{});
                 },
                 sizeof...(A)};
}
void register_kernel(const char* name, Entry e);
struct Registrar {
    Registrar(const char* name, Entry e) { register_kernel(name, std::move(e)); }
};
}  // namespace emu_metal
#define FLASH_INSTANCE(name, fn, T, D) static emu_metal::Registrar emu_reg_##name(#name, emu_metal::wrap(&fn<T, D>));

extern "C" {
// Runs kernel `name` on a grid of 1-D threadgroups; `args[i]` is buffer i. Returns 0, 1 for an
// unknown name, 2 for a wrong argument count.
int emu_metal_launch(const char* name, const unsigned grid[3], unsigned threads, size_t smem,
                     void* const* args, size_t nargs);
}
