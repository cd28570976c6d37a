// SIMT emulation core: runs a grid of thread blocks on the CPU, one block at a time, each
// GPU thread a cooperative fiber (ucontext) on the calling OS thread.
//
// Dialect-neutral on purpose: nothing here knows CUDA or Metal names. A dialect shim
// (cuda_shim.h; later an MSL one) maps threadIdx / thread_position_in_threadgroup, barriers,
// shared / threadgroup memory and warp / simdgroup collectives onto these primitives.
//
// Semantics provided:
//  * block barrier: all live threads of the block arrive before any continues; a thread that
//    has exited no longer counts (like the hardware barrier's expected count).
//  * warp (SIMD group) barrier over the 32 lanes, and warp_exchange(): every lane deposits up
//    to kSlotBytes, the warp synchronises, and each lane can read every lane's deposit. All
//    collectives (shuffles, votes, ldmatrix, mma, simdgroup_matrix) are built on it. Slots are
//    double-buffered, so one barrier per collective suffices.
//  * one shared-memory buffer per block, zero-filled (like nothing: real shared memory is
//    uninitialised; kernels must not rely on it, and the tests would not catch that).
//  * a deadlock (barrier that can never complete) aborts with a message instead of hanging.
// Fibers run to their next barrier in thread order, so a schedule is deterministic; memory
// races that depend on hardware interleaving are the GPU sanitizer's job (racecheck).
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>

namespace simt {

struct Dim3 {
    unsigned x = 1, y = 1, z = 1;
};

constexpr int kWarpSize = 32;
constexpr size_t kSlotBytes = 64;  // per-lane payload of one warp collective

// Runs `body` for every thread of every block of the grid. `shared_bytes` of shared memory
// per block. Thread-safe: concurrent launches from different OS threads are independent.
void launch(Dim3 grid, Dim3 block, size_t shared_bytes, const std::function<void()>& body);

// The calling fiber's coordinates.
Dim3 thread_idx();
Dim3 block_idx();
Dim3 block_dim();
Dim3 grid_dim();
unsigned lane();  // linear thread index % 32
unsigned char* shared_mem();
size_t shared_bytes();

void block_barrier();
void warp_barrier();
// Deposits `bytes` (<= kSlotBytes) from `mine`, synchronises the warp, and returns the base of
// the 32 deposits (lane i's at base + i * kSlotBytes), valid until the warp's next collective
// but one.
const unsigned char* warp_exchange(const void* mine, size_t bytes);

// Aborts the process with a message naming the block and thread.
[[noreturn]] void fail(const char* what);

}  // namespace simt
