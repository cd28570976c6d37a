// Tile shapes per (element type, head dim). crates/flash-ops/src/plan/cuda.rs mirrors these
// numbers to size grids and dynamic shared memory; check_launch() traps on a mismatch.
#pragma once
#include "flash_common.cuh"

namespace flash {

// Row pitch of a shared-memory tile: D plus 16 bytes, so the 8 rows an ldmatrix reads fall in
// different bank groups (no swizzle needed).
template <typename T, int D> struct Pitch { static constexpr int kLd = D + 16 / (int)sizeof(T); };

// Forward (both schedules): 4 warps x 16 query rows. f32 and D = 256 use 32-key tiles to keep
// the S accumulator and shared memory small; f32 D = 256 is single-stage to fit 164 KiB (A100).
template <typename T, int D> struct FwdCfg {
    static constexpr int kWarps = 4, kThreads = kWarps * 32, kBr = 64;
    static constexpr bool kF32 = sizeof(T) == 4;
    static constexpr int kBc = (kF32 || D > 128) ? 32 : 64;
    static constexpr int kStages = (kF32 && D == 256) ? 1 : 2;
    static constexpr int kLd = Pitch<T, D>::kLd;
    static constexpr unsigned kSmem = (unsigned)((kBr + 2 * kStages * kBc) * kLd * sizeof(T));
};

// Backward: a block owns kBc keys; its warps form a kWarpsK x kWarpsD grid of (key group of 16)
// x (head-dim slice of kSliceD columns). Each warp accumulates dK and dV for its 16 keys and its
// slice in registers (kSliceD <= 64 keeps them at <= 64 registers), recomputing S^T and dP^T of
// its key group (the redundancy across slices only exists for D > 64).
// kMasked: the block-sparse instance (bwd_kv_tile's list walk and bit tests). Its extra live
// state pushes f16/bf16 past 255 registers (d128 sm_90, d64 sm_80) with 64-query tiles, so it
// steps 32 queries at a time: S^T / dP^T halve (kBr / 8 n-tiles each); 32 still divides every
// CUDA block size (multiples of 64, plan/cuda.rs). The dense instance keeps today's tiles.
template <typename T, int D, bool kMasked = false> struct BwdCfg {
    static constexpr bool kF32 = sizeof(T) == 4;
    static constexpr int kBc = (kF32 || D > 128) ? 32 : 64;
    static constexpr int kBr = (kF32 || D > 128 || kMasked) ? 32 : 64;
    static constexpr int kWarpsK = kBc / 16;
    static constexpr int kWarpsD = D <= 64 ? 1 : (D == 96 ? 2 : D / 64);
    static constexpr int kSliceD = D / kWarpsD;
    static_assert(kSliceD * kWarpsD == D && kSliceD % 16 == 0, "head-dim slices of 16-column steps");
    static constexpr int kWarps = kWarpsK * kWarpsD, kThreads = kWarps * 32;
    static constexpr int kLd = Pitch<T, D>::kLd;
    static constexpr int kLdS = kBr + 16 / (int)sizeof(T);  // dS^T tile [key][query]
    static constexpr unsigned kSmem =
        (unsigned)((2 * kBc + 2 * kBr) * kLd * sizeof(T) + kBc * kLdS * sizeof(T) + 2 * kBr * 4);
};
template <typename T, int D> using BwdCfgMasked = BwdCfg<T, D, true>;

}  // namespace flash
