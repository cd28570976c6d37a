// Platform layer and building blocks shared by every FlashAttention kernel.
//
// Everything that differs between the GPU and the CPU emulation harness (crates/flash-emu) is
// behind a small set of device functions here (and in flash_mma.cuh): each has an inline-PTX
// path for the GPU (`__CUDA_ARCH__`) and a path through the emulator's collectives otherwise.
// The kernel sources themselves are identical for both.
#pragma once

#ifdef FLASH_EMU
#include "cuda_shim.h"  // crates/flash-emu/csrc: threads as fibers, barriers, warp collectives
#else
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>
#endif

#include "../head_dims.h"
#include "flash_params.h"

#define FLASH_DEV __device__ __forceinline__
#ifndef FLASH_EMU
#define FLASH_EMU_REGISTER(name)  // the emulator registers kernels by name; the GPU needs nothing
// The block's dynamic shared memory (the emulator hands out a per-block buffer instead).
#define FLASH_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif
#define FLASH_INF __int_as_float(0x7f800000)

namespace flash {

// ---------------------------------------------------------------------------------------------
// Element types. All arithmetic is f32; f16/bf16 are storage and tensor-core operand types.

FLASH_DEV float to_f32(float x) { return x; }
FLASH_DEV float to_f32(__half x) { return __half2float(x); }
FLASH_DEV float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> FLASH_DEV T from_f32(float x);
template <> FLASH_DEV float from_f32<float>(float x) { return x; }
template <> FLASH_DEV __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> FLASH_DEV __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Two values packed into one 32-bit register, low half first (the mma operand layout).
template <typename T> FLASH_DEV uint32_t pack2(float lo, float hi) {
    T a = from_f32<T>(lo), b = from_f32<T>(hi);
    uint16_t ua, ub;
    memcpy(&ua, &a, 2);
    memcpy(&ub, &b, 2);
    return (uint32_t)ua | ((uint32_t)ub << 16);
}

// Fast exponential: ex2.approx on the GPU (what FlashAttention uses), expf in emulation.
FLASH_DEV float fexp(float x) {
#ifdef __CUDA_ARCH__
    return __expf(x);
#else
    return expf(x);
#endif
}

// ---------------------------------------------------------------------------------------------
// Warp reductions over the four lanes of a quad (lanes 4g..4g+3 hold one accumulator row).

FLASH_DEV float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
    return x;
}
FLASH_DEV float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    x += __shfl_xor_sync(0xffffffffu, x, 2);
    return x;
}

// ---------------------------------------------------------------------------------------------
// Asynchronous global->shared copies (cp.async, sm_80+). In emulation they are plain copies,
// which is a legal (fully synchronous) schedule of the same program.

FLASH_DEV void cp_async16(void* smem, const void* gmem) {
#ifdef __CUDA_ARCH__
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
#else
    memcpy(smem, gmem, 16);
#endif
}
FLASH_DEV void cp_async_commit() {
#ifdef __CUDA_ARCH__
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N> FLASH_DEV void cp_async_wait() {
#ifdef __CUDA_ARCH__
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// The launch must give at least the dynamic shared memory and exactly the block size the kernel
// was written for; the Rust launch plan mirrors the configs, this catches a mismatch at once.
FLASH_DEV void check_launch(unsigned smem_needed, unsigned threads) {
#ifdef __CUDA_ARCH__
    unsigned dyn;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
    if (dyn < smem_needed || blockDim.x != threads) __trap();
#else
    simt::check_launch(smem_needed, threads);
#endif
}

// ---------------------------------------------------------------------------------------------
// One sequence of the batch, read from seq_info, and the rows of one head of each input.

// Row i of one head of one input at base + i * tok.
template <typename T> struct Rows {
    const T* base;
    long long tok;
    FLASH_DEV const T* row(int i) const { return base + (long long)i * tok; }
};

struct Seq {
    int q_len, k_len;
    long long q_off, k_off, v_off, o_off, lse_off, dk_off;
    FLASH_DEV Seq(const FlashParams& p, int s) {
        const long long* si = p.seq_info + (long long)s * FLASH_SI_STRIDE;
        q_len = (int)si[FLASH_SI_Q_LEN];
        k_len = (int)si[FLASH_SI_K_LEN];
        q_off = si[FLASH_SI_Q_OFF];
        k_off = si[FLASH_SI_K_OFF];
        v_off = si[FLASH_SI_V_OFF];
        o_off = si[FLASH_SI_O_OFF];
        lse_off = si[FLASH_SI_LSE_OFF];
        dk_off = si[FLASH_SI_DK_OFF];
    }
    // Head h of q, d_o (laid out like o) and k/v head hk.
    template <typename T> FLASH_DEV Rows<T> q(const FlashParams& p, int h) const {
        return {static_cast<const T*>(p.q) + q_off + h * p.q_head_stride, p.q_tok_stride};
    }
    template <typename T> FLASH_DEV Rows<T> d_o(const FlashParams& p, int h) const {
        return {static_cast<const T*>(p.d_o) + o_off + (long long)h * p.head_dim, p.o_tok_stride};
    }
    template <typename T> FLASH_DEV Rows<T> k(const FlashParams& p, int hk) const {
        return {static_cast<const T*>(p.k) + k_off + hk * p.k_head_stride, p.k_tok_stride};
    }
    template <typename T> FLASH_DEV Rows<T> v(const FlashParams& p, int hk) const {
        return {static_cast<const T*>(p.v) + v_off + hk * p.v_head_stride, p.v_tok_stride};
    }
};

// ---------------------------------------------------------------------------------------------
// Loading rows [r0, r0 + valid_rows) of x, D columns, into an nrows-row tile of shared memory
// (row pitch `ld` elements), by the block's nthreads threads. Rows past valid_rows and columns
// >= head_dim are zero-filled: padded keys then score 0 and carry V = 0, so a masked
// probability can never multiply garbage (NaN * 0 = NaN).

template <typename T, int D>
FLASH_DEV void load_tile(T* smem, int ld, Rows<T> x, int r0, int valid_rows, int nrows,
                         const FlashParams& p, int tid, int nthreads) {
    constexpr int kChunk = 16 / sizeof(T);  // elements per 16-byte copy
    constexpr int kChunksPerRow = D / kChunk;
    const T* gbase = x.row(r0);
    const bool vec = p.vec_loads != 0;
    for (int idx = tid; idx < nrows * kChunksPerRow; idx += nthreads) {
        int r = idx / kChunksPerRow, c = (idx % kChunksPerRow) * kChunk;
        T* dst = smem + r * ld + c;
        const T* src = gbase + (long long)r * x.tok + c;
        if (r < valid_rows && vec && c + kChunk <= p.head_dim) {
            cp_async16(dst, src);
        } else {
#pragma unroll
            for (int e = 0; e < kChunk; ++e)
                dst[e] = (r < valid_rows && c + e < p.head_dim) ? src[e] : from_f32<T>(0.f);
        }
    }
}

// Visibility and score modifiers of one (sequence, query head): the CUDA twin of
// flash_ops::mask::ScoreMods. Query i sees keys [i + diag - wl, i + diag + wr] within [0, k_len),
// diag = k_len - q_len (bottom-right alignment).
struct Mods {
    int q_len, k_len, diag, wl, wr;  // wl/wr < 0: unbounded
    float softcap, slope;            // 0: off
    FLASH_DEV Mods(const FlashParams& p, const Seq& sq, int s, int h) {
        q_len = sq.q_len;
        k_len = sq.k_len;
        diag = sq.k_len - sq.q_len;
        wl = p.window_left;
        wr = p.window_right;
        softcap = p.softcap;
        slope = p.alibi ? p.alibi[(long long)s * p.heads_q + h] : 0.f;
    }
    FLASH_DEV bool has_mods() const { return softcap != 0.f || slope != 0.f; }
    FLASH_DEV int key_lo(int i) const {
        int lo = wl >= 0 ? max(i + diag - wl, 0) : 0;
        return min(lo, k_len);
    }
    FLASH_DEV int key_hi(int i) const {
        int hi = wr >= 0 ? min(i + diag + wr + 1, k_len) : k_len;
        return max(hi, 0);
    }
    FLASH_DEV bool visible(int i, int j) const {
        return j < k_len && (wl < 0 || j >= i + diag - wl) && (wr < 0 || j <= i + diag + wr);
    }
    // Keys visible to at least one row of [i0, i1); both bounds grow with i.
    FLASH_DEV void key_range_rows(int i0, int i1, int& lo, int& hi) const {
        lo = key_lo(i0);
        hi = key_hi(i1 - 1);
    }
    // Query rows that see at least one key of [j0, j1).
    FLASH_DEV void query_range_keys(int j0, int j1, int& lo, int& hi) const {
        if (j0 >= k_len) { lo = hi = 0; return; }
        j1 = min(j1, k_len);
        lo = wr >= 0 ? max(j0 - diag - wr, 0) : 0;
        hi = wl >= 0 ? min(j1 - diag + wl, q_len) : q_len;
        lo = min(lo, q_len);
        hi = max(hi, 0);
    }
    // Every (row, key) of the tile visible: the mask can be skipped.
    FLASH_DEV bool tile_fully_visible(int i0, int i1, int j0, int j1) const {
        return j1 <= k_len && key_lo(i1 - 1) <= j0 && key_hi(i0) >= j1;
    }
    // Softcap, then ALiBi, on an already scaled score (FlashAttention-2's order).
    FLASH_DEV float modify(float x, int i, int j) const {
        if (softcap != 0.f) x = softcap * tanhf(x / softcap);
        if (slope != 0.f) x -= slope * (float)abs(i + diag - j);
        return x;
    }
    // d cap(x) / dx = 1 - tanh^2(x / cap), for the backward pass.
    FLASH_DEV float softcap_grad(float x) const {
        if (softcap == 0.f) return 1.f;
        float t = tanhf(x / softcap);
        return 1.f - t * t;
    }
};

// ---------------------------------------------------------------------------------------------
// Dropout: Philox4x32-10, bit-identical to flash_ops::dropout. Counter = [j/4, i, stream, 0],
// key = seed; the draw of key j is word j % 4; kept iff draw >= threshold.

FLASH_DEV uint4 philox(uint4 c, uint2 k) {
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        unsigned hi0 = __umulhi(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
        unsigned hi1 = __umulhi(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
        c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
        k.x += 0x9E3779B9u;
        k.y += 0xBB67AE85u;
    }
    return c;
}

struct Dropout {
    unsigned threshold, stream;
    uint2 key;
    float scale;
    FLASH_DEV Dropout(const FlashParams& p, int s, int h) {
        threshold = p.dropout_threshold;
        stream = (unsigned)(s * p.heads_q + h);
        key = make_uint2(p.seed_lo, p.seed_hi);
        scale = p.dropout_scale;
    }
    FLASH_DEV static unsigned word(uint4 v, int w) {
        return w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w;
    }
    // Factors (scale or 0) of keys j and j + 1 of row i; j is even, so one Philox call serves both.
    FLASH_DEV void pair(int i, int j, float& f0, float& f1) const {
        uint4 d = philox(make_uint4((unsigned)j >> 2, (unsigned)i, stream, 0u), key);
        f0 = word(d, j & 3) >= threshold ? scale : 0.f;
        f1 = word(d, (j + 1) & 3) >= threshold ? scale : 0.f;
    }
    FLASH_DEV float one(int i, int j) const {
        uint4 d = philox(make_uint4((unsigned)j >> 2, (unsigned)i, stream, 0u), key);
        return word(d, j & 3) >= threshold ? scale : 0.f;
    }
};

// Where a forward or dQ block starts: sequence s (grid z), query head h (grid y), the K/V head it
// reads (GQA: heads_q / heads_k query heads share one), and the visibility, score modifiers and
// dropout stream of (s, h). The grid mapping of plan::cuda's launches, written once.
struct QueryHead {
    int s, h, hk;
    Seq sq;
    Mods md;
    Dropout dr;
    FLASH_DEV explicit QueryHead(const FlashParams& p)
        : s(blockIdx.z), h(blockIdx.y), hk(blockIdx.y / (p.heads_q / p.heads_k)), sq(p, s),
          md(p, sq, s, h), dr(p, s, h) {}
};

// ---------------------------------------------------------------------------------------------
// Block-sparse attention (FlashAttention §3.3; flash_ops::BlockMask): a query block visits only
// the key blocks its row lists, a key block (dK/dV) only the query blocks its column lists.
// The launch plan guarantees the block size is a multiple of every kernel tile, so a tile lies
// inside one block; *full* blocks skip the element bits, *partial* ones test them where the
// causal/window mask is applied.

constexpr unsigned kFullBlock = 0xffffffffu;  // the partial-block id of a full block

// The element bits of one listed block, origin (i0, j0): row r is wpr words, bit c % 32 of
// word c / 32. Null words: every element visible (a full block, or no mask).
struct BlockBits {
    const unsigned* w;
    int wpr, i0, j0;
    FLASH_DEV bool full() const { return w == nullptr; }
    FLASH_DEV bool test(int i, int j) const {
        if (w == nullptr) return true;
        const int r = i - i0, c = j - j0;
        return (w[r * wpr + (c >> 5)] >> (c & 31)) & 1u;
    }
};

// One tile of a walk: positions [x0, x0 + n) inside block `blk`, whose partial-block id is id.
struct Tile {
    int x0, n, blk;
    unsigned id;
};

// Tiles of `step` positions over [lo, hi) along one axis, in ascending order: all of them
// (dense: `blk` null), or only those inside the listed blocks of `bsize` positions (a tile is
// cut at its block's end). The branch on `blk` is uniform over the block.
struct TileWalk {
    const unsigned* blk;  // listed block indices (ascending); their partial-block ids at + ids
    int ids, pos, end, lo, hi, bsize, step;
    int x = 0, cur_end = 0, cur_blk = 0;
    unsigned cur_id = kFullBlock;
    FLASH_DEV TileWalk(const unsigned* b, int i, int n, int lo_, int hi_, int bs, int st)
        : blk(b), ids(i), pos(0), end(n), lo(lo_), hi(hi_), bsize(bs), step(st), x(lo_), cur_end(lo_) {}
    FLASH_DEV bool next(Tile& t) {
        if (blk == nullptr) {
            if (x >= hi) return false;
            t = {x, min(step, hi - x), 0, kFullBlock};
            x += step;
            return true;
        }
        while (x >= cur_end) {  // on to the next listed block that meets [lo, hi)
            if (pos >= end) return false;
            const int b = (int)blk[pos], s = max(b * bsize, lo), e = min((b + 1) * bsize, hi);
            cur_id = blk[ids + pos++];
            if (s >= hi) { pos = end; return false; }  // ascending: no later block meets it
            if (s < e) { x = s; cur_end = e; cur_blk = b; }
        }
        t = {x, min(step, cur_end - x), cur_blk, cur_id};
        x += step;
        return true;
    }
};

// The mask of a launch (p.mask null: none).
struct BlockMask {
    const FlashParams& p;
    FLASH_DEV explicit BlockMask(const FlashParams& p_) : p(p_) {}
    FLASH_DEV bool on() const { return p.mask != nullptr; }
    // Row / column index of block `b` of (sequence s, query head h): the mask broadcasts an
    // extent of 1.
    FLASH_DEV int line(int s, int h, int nb, int b) const {
        const FlashMaskDims& d = p.mask_dims;
        return ((d.batch > 1 ? s : 0) * d.heads + (d.heads > 1 ? h : 0)) * nb + b;
    }
    FLASH_DEV TileWalk walk(unsigned start, unsigned block, unsigned ids, int line, int bsize, int lo,
                            int hi, int step) const {
        if (!on()) return TileWalk(nullptr, 0, 0, lo, hi, bsize, step);
        const unsigned* m = p.mask;
        const unsigned a = m[start + line], e = m[start + line + 1];
        return TileWalk(m + block + a, (int)(ids - block), (int)(e - a), lo, hi, bsize, step);
    }
    // Key tiles over [lo, hi) that query block qb of (s, h) lists (dense without a mask).
    FLASH_DEV TileWalk keys(int s, int h, int qb, int lo, int hi, int step) const {
        const FlashMaskDims& d = p.mask_dims;
        return walk(d.kv_start, d.kv_block, d.kv_bits, on() ? line(s, h, d.qb, qb) : 0, d.bk, lo,
                    hi, step);
    }
    // Query tiles over [lo, hi) that key block kb of (s, h) lists: the transposed lists.
    FLASH_DEV TileWalk queries(int s, int h, int kb, int lo, int hi, int step) const {
        const FlashMaskDims& d = p.mask_dims;
        return walk(d.q_start, d.q_block, d.q_bits, on() ? line(s, h, d.kb, kb) : 0, d.bq, lo, hi,
                    step);
    }
    // Key block kb's column of (s, h) for a two-level loop (entry, then its tiles): returns the
    // entry count, 1 without a mask (the whole range), and points `blk` at the entries. Fewer
    // live registers than a TileWalk: the dK/dV sweep has none to spare (d128 on sm_80).
    FLASH_DEV int column(int s, int h, int kb, const unsigned*& blk) const {
        blk = nullptr;
        if (!on()) return 1;
        const FlashMaskDims& d = p.mask_dims;
        const int c = line(s, h, d.kb, kb);
        const unsigned a = p.mask[d.q_start + c], e = p.mask[d.q_start + c + 1];
        blk = p.mask + d.q_block + a;
        return (int)(e - a);
    }
    // Entry e of a column: the query range [lo, hi) cut to its block, the block and its id.
    FLASH_DEV void column_entry(const unsigned* blk, int e, int& lo, int& hi, int& qb,
                                unsigned& id) const {
        if (blk == nullptr) return;  // no mask: the whole range, full
        const FlashMaskDims& d = p.mask_dims;
        qb = (int)blk[e];
        id = blk[e + (int)(d.q_bits - d.q_block)];
        lo = max(lo, qb * d.bq);
        hi = min(hi, (qb + 1) * d.bq);
    }
    // The query block of row i, the key block of key j (0 without a mask).
    FLASH_DEV int q_block(int i) const { return on() ? i / p.mask_dims.bq : 0; }
    FLASH_DEV int k_block(int j) const { return on() ? j / p.mask_dims.bk : 0; }
    // The bits of block (qb, kb) with partial-block id `id`.
    FLASH_DEV BlockBits bits(unsigned id, int qb, int kb) const {
        const FlashMaskDims& d = p.mask_dims;
        if (!on() || id == kFullBlock) return {nullptr, 0, 0, 0};
        return {p.mask + d.bits + (long long)id * d.bq * d.wpr, d.wpr, qb * d.bq, kb * d.bk};
    }
};

}  // namespace flash

// ---------------------------------------------------------------------------------------------
// Entry points: the extern "C" kernels the launch plan (src/plan/cuda.rs) names, one per element
// type (FLASH_DTYPES) and head dim (FLASH_HEAD_DIMS, kernels/head_dims.h).

// The element types with kernels, as X(name, type, args...).
#define FLASH_DTYPES(X, ...) X(f32, float, __VA_ARGS__) X(f16, __half, __VA_ARGS__) X(bf16, __nv_bfloat16, __VA_ARGS__)

// flash_<FN>_<dt>_d<D> for every element type and head dim: flash::FN<T, D>, a block of
// CFG<T, D>::kThreads threads.
#define FLASH_KERNEL_TD(D, DT, T, FN, CFG)                                                    \
    extern "C" __global__ void __launch_bounds__(flash::CFG<T, D>::kThreads, 1)               \
        flash_##FN##_##DT##_d##D(const FlashParams p) {                                       \
        flash::FN<T, D>(p);                                                                   \
    }                                                                                         \
    FLASH_EMU_REGISTER(flash_##FN##_##DT##_d##D)
#define FLASH_KERNELS_D(DT, T, FN, CFG) FLASH_HEAD_DIMS(FLASH_KERNEL_TD, DT, T, FN, CFG)
#define FLASH_KERNELS_TD(FN, CFG) FLASH_DTYPES(FLASH_KERNELS_D, FN, CFG)

// flash_<FN>_<dt> for every element type: flash::FN<T>, a block of at most THREADS threads.
#define FLASH_KERNEL_T(DT, T, FN, THREADS)                                                    \
    extern "C" __global__ void __launch_bounds__(THREADS) flash_##FN##_##DT(const FlashParams p) { \
        flash::FN<T>(p);                                                                      \
    }                                                                                         \
    FLASH_EMU_REGISTER(flash_##FN##_##DT)
#define FLASH_KERNELS_T(FN, THREADS) FLASH_DTYPES(FLASH_KERNEL_T, FN, THREADS)
