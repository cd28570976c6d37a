// Warp-level matrix products for the attention tiles: one 16x8 f32 accumulator tile per
// `mma`, k = 16. Fragment layouts are the PTX ISA's for mma.m16n8k16 (row.col), with
// g = lane / 4 and c = lane % 4:
//   A (16x16): a0 = (g, 2c..2c+1), a1 = (g+8, 2c..), a2 = (g, 2c+8..), a3 = (g+8, 2c+8..)
//   B (16x8):  b0 = (k = 2c..2c+1, n = g), b1 = (k = 2c+8.., n = g)
//   C (16x8):  c0, c1 = (g, 2c..2c+1), c2, c3 = (g+8, 2c..2c+1)
// The accumulator of two adjacent n-tiles is therefore exactly an A fragment (acc_to_a): the
// probabilities P never leave registers between S = QK^T and O += PV (FlashAttention-2's trick).
//
// f16/bf16 use tensor cores (ldmatrix + mma.sync, sm_80+). f32 keeps the same fragment layout
// (each 32-bit register holds one float instead of two halves) and multiplies with exact FMAs,
// exchanging operands with warp shuffles, so the kernels are written once for all three types.
// In the emulator (FLASH_EMU) ldmatrix and mma go through cuda_shim.h's warp collectives, which
// implement the same documented layouts on the CPU.
#pragma once
#include "flash_common.cuh"

namespace flash {

template <typename T> struct Mma;

// ---- f16 / bf16: tensor cores -----------------------------------------------------------------

// ldmatrix.x4: four 8x8 b16 matrices, lanes 8i..8i+7 giving the row addresses of matrix i
// (.trans: each matrix transposed).
template <bool kTrans> FLASH_DEV void ldsm_x4(uint32_t (&r)[4], const void* p) {
#ifdef __CUDA_ARCH__
    unsigned s = (unsigned)__cvta_generic_to_shared(p);
#define FLASH_LDSM(SUFFIX)                                                                   \
    asm volatile("ldmatrix.sync.aligned.m8n8.x4" SUFFIX ".shared.b16 {%0,%1,%2,%3}, [%4];\n" \
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])                            \
                 : "r"(s))
    if constexpr (kTrans) FLASH_LDSM(".trans");
    else FLASH_LDSM("");
#undef FLASH_LDSM
#else
    emu_ldmatrix_x4(r, p, kTrans);
#endif
}

template <bool kBf16>
FLASH_DEV void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef __CUDA_ARCH__
#define FLASH_MMA(AB)                                                                          \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." AB "." AB                            \
                 ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                \
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                              \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))
    if constexpr (kBf16) FLASH_MMA("bf16");
    else FLASH_MMA("f16");
#undef FLASH_MMA
#else
    emu_mma_m16n8k16_16bit(c, a, b, kBf16);
#endif
}

template <typename T, bool kBf16> struct Mma16 {
    struct FragA { uint32_t r[4]; };
    struct FragB { uint32_t r[2]; };

    // A = 16x16 tile of row-major [m][k] storage at `base` (pitch ld).
    static FLASH_DEV void load_a(FragA& a, const T* base, int ld, int lane) {
        ldsm_x4<false>(a.r, base + (lane & 15) * ld + (lane >> 4) * 8);
    }
    // A from transposed storage [k][m] (dS^T kept as [key][query]).
    static FLASH_DEV void load_a_trans(FragA& a, const T* base, int ld, int lane) {
        ldsm_x4<true>(a.r, base + ((lane & 7) + (lane >> 4) * 8) * ld + ((lane >> 3) & 1) * 8);
    }
    // Two B tiles (n = 0..7, 8..15) of one k-step from [n][k] storage (K as the B of Q K^T).
    static FLASH_DEV void load_b_nk2(FragB& b0, FragB& b1, const T* base, int ld, int lane) {
        uint32_t r[4];
        ldsm_x4<false>(r, base + ((lane & 7) + (lane >> 4) * 8) * ld + ((lane >> 3) & 1) * 8);
        b0.r[0] = r[0]; b0.r[1] = r[1]; b1.r[0] = r[2]; b1.r[1] = r[3];
    }
    // Two B tiles from [k][n] storage (V as the B of P V): ldmatrix.trans.
    static FLASH_DEV void load_b_kn2(FragB& b0, FragB& b1, const T* base, int ld, int lane) {
        uint32_t r[4];
        ldsm_x4<true>(r, base + ((lane & 7) + ((lane >> 3) & 1) * 8) * ld + (lane >> 4) * 8);
        b0.r[0] = r[0]; b0.r[1] = r[1]; b1.r[0] = r[2]; b1.r[1] = r[3];
    }
    // Accumulators of n-tiles 2t, 2t+1 as the A operand of k-step t (rounded to T).
    static FLASH_DEV void acc_to_a(FragA& a, const float (&c0)[4], const float (&c1)[4]) {
        a.r[0] = pack2<T>(c0[0], c0[1]);
        a.r[1] = pack2<T>(c0[2], c0[3]);
        a.r[2] = pack2<T>(c1[0], c1[1]);
        a.r[3] = pack2<T>(c1[2], c1[3]);
    }
    static FLASH_DEV void mma(float (&c)[4], const FragA& a, const FragB& b) {
        mma_16816<kBf16>(c, a.r, b.r);
    }
};
template <> struct Mma<__half> : Mma16<__half, false> {};
template <> struct Mma<__nv_bfloat16> : Mma16<__nv_bfloat16, true> {};

// ---- f32: exact FMAs in the same fragment layout ------------------------------------------------
// Register r[2*reg + half] holds what half `half` of 32-bit register `reg` holds above.

template <> struct Mma<float> {
    struct FragA { float r[8]; };
    struct FragB { float r[4]; };

    // Element (row, k) of a tile stored [row][k], or [k][row] when kTrans: one loader per
    // fragment for both storage orders.
    template <bool kTrans> static FLASH_DEV float at(const float* base, int ld, int row, int k) {
        return kTrans ? base[k * ld + row] : base[row * ld + k];
    }
    template <bool kTrans>
    static FLASH_DEV void load_a2(FragA& a, const float* base, int ld, int lane) {
        int g = lane >> 2, c = lane & 3;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            int reg = i >> 1, half = i & 1;
            a.r[i] = at<kTrans>(base, ld, g + 8 * (reg & 1), 2 * c + half + 8 * (reg >> 1));
        }
    }
    static FLASH_DEV void load_a(FragA& a, const float* base, int ld, int lane) {
        load_a2<false>(a, base, ld, lane);
    }
    static FLASH_DEV void load_a_trans(FragA& a, const float* base, int ld, int lane) {
        load_a2<true>(a, base, ld, lane);
    }
    // The B fragments of n-tiles [0, 8) and [8, 16) of a tile stored [n][k], or [k][n] when kKN.
    template <bool kKN>
    static FLASH_DEV void load_b2(FragB& b0, FragB& b1, const float* base, int ld, int lane) {
        int g = lane >> 2, c = lane & 3;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int k = 2 * c + (i & 1) + 8 * (i >> 1);
            b0.r[i] = at<kKN>(base, ld, g, k);
            b1.r[i] = at<kKN>(base, ld, g + 8, k);
        }
    }
    static FLASH_DEV void load_b_nk2(FragB& b0, FragB& b1, const float* base, int ld, int lane) {
        load_b2<false>(b0, b1, base, ld, lane);
    }
    static FLASH_DEV void load_b_kn2(FragB& b0, FragB& b1, const float* base, int ld, int lane) {
        load_b2<true>(b0, b1, base, ld, lane);
    }
    static FLASH_DEV void acc_to_a(FragA& a, const float (&c0)[4], const float (&c1)[4]) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            a.r[i] = c0[i];
            a.r[4 + i] = c1[i];
        }
    }
    // D += A B. Lane (g, c) owns rows g, g+8 and columns 2c, 2c+1; the k values are spread over
    // the quad, so for each quad member c' fetch its slice of A's rows (lane 4g+c') and of B's
    // columns (lanes 4(2c)+c', 4(2c+1)+c'): 16 shuffles and 16 FMAs per c'.
    static FLASH_DEV void mma(float (&d)[4], const FragA& a, const FragB& b) {
#ifdef FLASH_EMU_FAST_F32_MMA
        // Optional emulator shortcut (one collective instead of 64 shuffles); off by default so
        // the emulated tests run the shuffle code below, the code the GPU runs.
        emu_mma_m16n8k16_f32(d, a.r, b.r);
#else
        int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
        // Not unrolled: the body indexes registers by constants only, and unrolling every
        // mma of a tile 4x makes the f32 kernels too large for ptxas to compile quickly.
#pragma unroll 1
        for (int cp = 0; cp < 4; ++cp) {
            float av[8], b0[4], b1[4];
#pragma unroll
            for (int i = 0; i < 8; ++i) av[i] = __shfl_sync(0xffffffffu, a.r[i], 4 * g + cp);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                b0[i] = __shfl_sync(0xffffffffu, b.r[i], 8 * c + cp);
                b1[i] = __shfl_sync(0xffffffffu, b.r[i], 8 * c + 4 + cp);
            }
            // av: [0,1] (g, k0..k0+1) [2,3] (g+8, ..) [4,5] (g, k0+8..) [6,7] (g+8, k0+8..)
            d[0] += av[0] * b0[0] + av[1] * b0[1] + av[4] * b0[2] + av[5] * b0[3];
            d[1] += av[0] * b1[0] + av[1] * b1[1] + av[4] * b1[2] + av[5] * b1[3];
            d[2] += av[2] * b0[0] + av[3] * b0[1] + av[6] * b0[2] + av[7] * b0[3];
            d[3] += av[2] * b1[0] + av[3] * b1[1] + av[6] * b1[2] + av[7] * b1[3];
        }
#endif
    }
};

// ---- one warp's tile products ------------------------------------------------------------------
// A 16 x 8N accumulator tile is float[N][4] per lane (layout C above). Operands in shared memory
// are row-major with pitch ld; kk is the k-step (16 values of the reduced index).

template <int N> FLASH_DEV void zero_acc(float (&c)[N][4]) {
#pragma unroll
    for (int n = 0; n < N; ++n) c[n][0] = c[n][1] = c[n][2] = c[n][3] = 0.f;
}

// n-tiles 2 n2, 2 n2 + 1 of C += A B for one k-step, A given: their B tiles at b, stored [n][k]
// (kKN false: K in S = Q K^T) or [k][n] (V in O = P V).
template <bool kKN, typename T, int N>
FLASH_DEV void mma_pair(float (&c)[N][4], const typename Mma<T>::FragA& a, const T* b, int n2,
                        int ld, int lane) {
    using M = Mma<T>;
    typename M::FragB b0, b1;
    if constexpr (kKN) M::load_b_kn2(b0, b1, b, ld, lane);
    else M::load_b_nk2(b0, b1, b, ld, lane);
    M::mma(c[2 * n2], a, b0);
    M::mma(c[2 * n2 + 1], a, b1);
}

// C (16 x 8N) += A B^T over K columns: A's 16 rows at a, B's 8N rows at b stored [n][k].
template <int K, typename T, int N>
FLASH_DEV void mma_abt(float (&c)[N][4], const T* a, const T* b, int ld, int lane) {
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
        typename Mma<T>::FragA fa;
        Mma<T>::load_a(fa, a + kk * 16, ld, lane);
#pragma unroll
        for (int n2 = 0; n2 < N / 2; ++n2)
            mma_pair<false>(c, fa, b + n2 * 16 * ld + kk * 16, n2, ld, lane);
    }
}

// Two such products interleaved over one k loop (the backward's S and dP; the order the
// compile gate's register counts were measured with).
template <int K, typename T, int N>
FLASH_DEV void mma_abt2(float (&c0)[N][4], const T* a0, const T* b0, float (&c1)[N][4],
                        const T* a1, const T* b1, int ld, int lane) {
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
        typename Mma<T>::FragA f0, f1;
        Mma<T>::load_a(f0, a0 + kk * 16, ld, lane);
        Mma<T>::load_a(f1, a1 + kk * 16, ld, lane);
#pragma unroll
        for (int n2 = 0; n2 < N / 2; ++n2) {
            mma_pair<false>(c0, f0, b0 + n2 * 16 * ld + kk * 16, n2, ld, lane);
            mma_pair<false>(c1, f1, b1 + n2 * 16 * ld + kk * 16, n2, ld, lane);
        }
    }
}

// C (16 x 8N) += P B: P (16 x 8NP) the accumulators, two n-tiles per k-step as the A operand
// (rounded to T: the probabilities never leave registers), B's rows at b stored [k][n].
template <typename T, int N, int NP>
FLASH_DEV void mma_pb(float (&c)[N][4], const float (&p)[NP][4], const T* b, int ld, int lane) {
#pragma unroll
    for (int kk = 0; kk < NP / 2; ++kk) {
        typename Mma<T>::FragA fa;
        Mma<T>::acc_to_a(fa, p[2 * kk], p[2 * kk + 1]);
#pragma unroll
        for (int n2 = 0; n2 < N / 2; ++n2)
            mma_pair<true>(c, fa, b + kk * 16 * ld + n2 * 16, n2, ld, lane);
    }
}

// Two such products interleaved over one k loop (the backward's dV and dK).
template <typename T, int N, int NP>
FLASH_DEV void mma_pb2(float (&c0)[N][4], const float (&p0)[NP][4], const T* b0, float (&c1)[N][4],
                       const float (&p1)[NP][4], const T* b1, int ld, int lane) {
#pragma unroll
    for (int kk = 0; kk < NP / 2; ++kk) {
        typename Mma<T>::FragA f0, f1;
        Mma<T>::acc_to_a(f0, p0[2 * kk], p0[2 * kk + 1]);
        Mma<T>::acc_to_a(f1, p1[2 * kk], p1[2 * kk + 1]);
#pragma unroll
        for (int n2 = 0; n2 < N / 2; ++n2) {
            mma_pair<true>(c0, f0, b0 + kk * 16 * ld + n2 * 16, n2, ld, lane);
            mma_pair<true>(c1, f1, b1 + kk * 16 * ld + n2 * 16, n2, ld, lane);
        }
    }
}

}  // namespace flash
