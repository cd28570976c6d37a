// Shared part of the Metal FlashAttention kernels (kernels/metal/*.metal): the parameter
// struct, the per-sequence records, score modifiers and visibility, and the tile movers.
//
// Two consumers compile these sources unchanged:
//  * the Metal backend (crates/flash-ops/src/metal): it concatenates this header and the
//    kernel files (dropping the `#include "..."` lines, since newLibraryWithSource has no file
//    system) and compiles the result at run time;
//  * the SIMT emulator (crates/flash-emu): g++ -DFLASH_EMU compiles the same files as C++
//    against its csrc/msl_shim.h.
//
// Design (the metal-flash-attention / MLX split): every tile GEMM is a chain of 8x8
// `simdgroup_matrix` multiply-accumulates on f32 operands, and everything that needs single
// elements (masking, softmax, dS) goes through threadgroup memory, so the kernels never depend
// on how a simdgroup_matrix is spread over the lanes (Apple leaves that undocumented).
#pragma once
#include "../head_dims.h"

#ifdef FLASH_EMU
#include "msl_shim.h"
#else
#include <metal_stdlib>
using namespace metal;
// The threadgroup buffer and the thread's coordinates, first in every kernel's argument list.
// (The emulator passes the same five values positionally.)
#define FLASH_THREAD_ARGS                                                                  \
    threadgroup float *smem [[threadgroup(0)]], uint3 tgid [[threadgroup_position_in_grid]], \
        uint tid [[thread_index_in_threadgroup]], uint sg [[simdgroup_index_in_threadgroup]], \
        uint lane [[thread_index_in_simdgroup]]
// One named entry point per (kernel, element type, head dim).
#define FLASH_INSTANCE(name, fn, T, D) \
    template [[host_name(#name)]] [[kernel]] decltype(fn<T, D>) fn<T, D>;
// The emulator checks the host's threadgroup-memory size against the kernel's needs.
#define FLASH_CHECK_SMEM(bytes)
#endif

// The element types with kernels, as X(name, type, args...): bf16 where the compiler has MSL
// 3.1's `bfloat`.
#if defined(__HAVE_BFLOAT__)
#define FLASH_BF16(X, ...) X(bf16, bfloat, __VA_ARGS__)
#else
#define FLASH_BF16(X, ...)
#endif
#define FLASH_DTYPES(X, ...) X(f32, float, __VA_ARGS__) X(f16, half, __VA_ARGS__) FLASH_BF16(X, __VA_ARGS__)

// Every instance of the kernel template fn<T, D> the launch plan (src/plan/metal.rs) names:
// fn_<dt>_d<D> per element type and head dim (FLASH_INSTANCES_TD), or fn_<dt> for a kernel
// whose head dim is a run-time loop bound (FLASH_INSTANCES_T, D = 0).
#define FLASH_INSTANCE_TD(D, tn, T, fn) FLASH_INSTANCE(fn##_##tn##_d##D, fn, T, D)
#define FLASH_INSTANCES_D(tn, T, fn) FLASH_HEAD_DIMS(FLASH_INSTANCE_TD, tn, T, fn)
#define FLASH_INSTANCES_TD(fn) FLASH_DTYPES(FLASH_INSTANCES_D, fn)
#define FLASH_INSTANCE_T(tn, T, fn) FLASH_INSTANCE(fn##_##tn, fn, T, 0)
#define FLASH_INSTANCES_T(fn) FLASH_DTYPES(FLASH_INSTANCE_T, fn)

// Mirrored by `MetalParams` in crates/flash-ops/src/plan/metal.rs (#[repr(C)], same order).
struct MetalFlashParams {
    long q_tok_stride, q_head_stride;
    long k_tok_stride, k_head_stride;
    long v_tok_stride, v_head_stride;
    long o_tok_stride;     // heads_q * head_dim: o, d_o, dq are contiguous (total_q, hq, d)
    long dk_tok_stride;    // heads_k * head_dim: dk, dv are contiguous (total_k, hk, d)
    long lse_head_stride;  // dense: seqlen_q; varlen: total_q
    long lse_len;          // heads_q * total_q
    int batch, heads_q, heads_k, head_dim;
    int window_left, window_right;  // -1: unbounded (clamped to 2^30 by the host). Causal: wr = 0.
    int has_alibi;
    int stats_v1;  // 1: forward saves m ‖ l (Algorithm::V1); 0: the log-sum-exp
    float scale;
    float softcap;  // 0: off
    int has_dropout;
    uint dropout_threshold;  // keep iff the Philox draw >= threshold
    float dropout_scale;     // 1 / (1 - p)
    uint seed_lo, seed_hi;
    int has_dlse;  // backward: bwd_pre subtracts dlse (the lse's gradient) from delta
    // Block-sparse mask (flash_ops::BlockMask; `MaskDims` of src/plan/layout.rs): word offsets
    // in the `mask` buffer of kv_start, kv_block, kv_bits (per query block: the key blocks it
    // lists, ascending, and their partial-block ids), q_start, q_block, q_bits (the transposed
    // columns) and bits (bq rows of wpr words per partial block); the extents.
    uint m_kv_start, m_kv_block, m_kv_bits, m_q_start, m_q_block, m_q_bits, m_bits;
    int m_qb, m_kb;        // query / key blocks per sequence
    int m_batch, m_heads;  // 1: broadcast over sequences / query heads
    int m_bq, m_bk, m_wpr; // block size; words per bit row
    int m_on;              // 1: a mask (the buffer is always bound; a stand-in without one)
    int m_pad;
};

// Per-sequence record: 8 longs per sequence in `seq_info` (element offsets of row 0, head 0,
// layout start included, so dense and varlen inputs look the same to the kernels).
struct SeqInfo {
    long q_len, k_len, q_off, k_off, v_off, o_off, lse_off, dk_off;
};

inline SeqInfo load_seq(device const long *info, int b) {
    device const long *r = info + 8 * b;
    SeqInfo s;
    s.q_len = r[0];
    s.k_len = r[1];
    s.q_off = r[2];
    s.k_off = r[3];
    s.v_off = r[4];
    s.o_off = r[5];
    s.lse_off = r[6];
    s.dk_off = r[7];
    return s;
}

// Visibility and score modifiers of one (sequence, query head); the same definitions as
// crates/flash-ops/src/mask.rs. Query i sees keys [i+diag-wl, i+diag+wr] ∩ [0, k_len).
struct Mods {
    int q_len, k_len, diag, wl, wr;
    float softcap, slope;
    int has_alibi;
};

inline Mods make_mods(constant MetalFlashParams &p, SeqInfo si, device const float *alibi, int b,
                      int h) {
    Mods m;
    m.q_len = (int)si.q_len;
    m.k_len = (int)si.k_len;
    m.diag = m.k_len - m.q_len;
    m.wl = p.window_left;
    m.wr = p.window_right;
    m.softcap = p.softcap;
    m.has_alibi = p.has_alibi;
    m.slope = p.has_alibi ? alibi[b * p.heads_q + h] : 0.0f;
    return m;
}

// First visible key of row i (may exceed k_len: empty row).
inline int key_lo(Mods m, int i) { return m.wl < 0 ? 0 : max(0, i + m.diag - m.wl); }
// One past the last visible key of row i (may be <= key_lo: empty row).
inline int key_hi(Mods m, int i) { return m.wr < 0 ? m.k_len : min(m.k_len, i + m.diag + m.wr + 1); }
inline bool visible(Mods m, int i, int j) {
    return i < m.q_len && j >= key_lo(m, i) && j < key_hi(m, i);
}
// Query rows [lo, hi) that see some key of [j0, j1).
inline int query_lo(Mods m, int j0) { return m.wr < 0 ? 0 : max(0, j0 - m.diag - m.wr); }
inline int query_hi(Mods m, int j1) { return m.wl < 0 ? m.q_len : min(m.q_len, j1 - m.diag + m.wl); }

// A scaled score after softcap (c·tanh(s/c)) and ALiBi (−slope·|i+diag−j|); `dcap` receives
// d(modified)/d(scaled), the softcap derivative 1 − tanh², for the backward pass.
inline float modify(Mods m, float s, int i, int j, thread float &dcap) {
    dcap = 1.0f;
    if (m.softcap > 0.0f) {
        const float t = tanh(s / m.softcap);
        s = m.softcap * t;
        dcap = 1.0f - t * t;
    }
    if (m.has_alibi) s -= m.slope * (float)abs(i + m.diag - j);
    return s;
}

// ---- Philox4x32-10 dropout (crates/flash-ops/src/dropout.rs) -----------------------------------
// Counter [j/4, i, seq*heads_q + head, 0], key [seed lo, hi]; keep iff draw[j%4] >= threshold.
inline uint philox_draw(uint seed_lo, uint seed_hi, uint i, uint j, uint sh) {
    uint c0 = j / 4, c1 = i, c2 = sh, c3 = 0, k0 = seed_lo, k1 = seed_hi;
    for (int r = 0; r < 10; ++r) {
        const uint hi0 = mulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
        const uint hi1 = mulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
        const uint n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    const uint w = j % 4;
    return w == 0 ? c0 : w == 1 ? c1 : w == 2 ? c2 : c3;
}

// Dropout factor of probability (i, j): 0 or 1/(1-p); 1 without dropout.
inline float dropout_factor(constant MetalFlashParams &p, int b, int h, int i, int j) {
    if (!p.has_dropout) return 1.0f;
    const uint draw = philox_draw(p.seed_lo, p.seed_hi, (uint)i, (uint)j, (uint)(b * p.heads_q + h));
    return draw >= p.dropout_threshold ? p.dropout_scale : 0.0f;
}

// ---- block-sparse attention (FlashAttention §3.3, flash_ops::BlockMask) ----------------------
// A query block visits only the key blocks its row lists, a key block (dK/dV) only the query
// blocks its column lists. The launch plan guarantees the block size is a multiple of every
// tile, so a tile lies inside one block; *full* blocks skip the element bits, *partial* ones
// test them where the causal/window mask is applied.
#define FLASH_FULL_BLOCK 0xffffffffu  // the partial-block id of a full block

// One tile of a walk: positions [x0, x0 + n) inside block `blk`, partial-block id `id`.
struct Tile {
    int x0, n, blk;
    uint id;
};

// Tiles of `step` positions over [lo, hi), ascending: all of them (dense), or only those inside
// the listed blocks of `bsize` positions, each cut at its block's end. Uniform over the
// threadgroup (every thread walks the same list).
struct TileWalk {
    device const uint *blk;  // listed block indices (ascending) ...
    device const uint *ids;  // ... and their partial-block ids
    int dense, pos, end, lo, hi, bsize, step, x, cur_end, cur_blk;
    uint cur_id;
};

// Row (query block; `rows`) or column (key block) `b` of (sequence s, query head h): the
// mask broadcasts an extent of 1.
inline int mask_line(constant MetalFlashParams &p, int s, int h, int b, bool rows) {
    const int base = (p.m_batch > 1 ? s : 0) * p.m_heads + (p.m_heads > 1 ? h : 0);
    return base * (rows ? p.m_qb : p.m_kb) + b;
}

// Key tiles (`rows`: of query block b's row) or query tiles (of key block b's column).
inline TileWalk make_walk(constant MetalFlashParams &p, device const uint *mask, bool rows, int s,
                          int h, int b, int lo, int hi, int step) {
    TileWalk w;
    w.blk = mask;
    w.ids = mask;
    w.dense = !p.m_on;
    w.pos = 0;
    w.end = 0;
    w.lo = lo;
    w.hi = hi;
    w.bsize = 1;
    w.step = step;
    w.x = lo;
    w.cur_end = lo;
    w.cur_blk = 0;
    w.cur_id = FLASH_FULL_BLOCK;
    if (p.m_on) {
        const int line = mask_line(p, s, h, b, rows);
        const uint start = rows ? p.m_kv_start : p.m_q_start;
        const uint a = mask[start + line], e = mask[start + line + 1];
        w.blk = mask + (rows ? p.m_kv_block : p.m_q_block) + a;
        w.ids = mask + (rows ? p.m_kv_bits : p.m_q_bits) + a;
        w.end = (int)(e - a);
        w.bsize = rows ? p.m_bk : p.m_bq;
    }
    return w;
}

inline bool walk_next(thread TileWalk &w, thread Tile &t) {
    if (w.dense) {
        if (w.x >= w.hi) return false;
        t.x0 = w.x;
        t.n = min(w.step, w.hi - w.x);
        t.blk = 0;
        t.id = FLASH_FULL_BLOCK;
        w.x += w.step;
        return true;
    }
    while (w.x >= w.cur_end) {  // on to the next listed block that meets [lo, hi)
        if (w.pos >= w.end) return false;
        const int b = (int)w.blk[w.pos], s = max(b * w.bsize, w.lo), e = min((b + 1) * w.bsize, w.hi);
        w.cur_id = w.ids[w.pos];
        w.pos += 1;
        if (s >= w.hi) {  // ascending: no later block meets the range
            w.pos = w.end;
            return false;
        }
        if (s < e) {
            w.x = s;
            w.cur_end = e;
            w.cur_blk = b;
        }
    }
    t.x0 = w.x;
    t.n = min(w.step, w.cur_end - w.x);
    t.blk = w.cur_blk;
    t.id = w.cur_id;
    w.x += w.step;
    return true;
}

// The element bits of listed block (qb, kb), origin (i0, j0): row r is wpr words, bit c % 32
// of word c / 32. `full`: every element visible (a full block, or no mask).
struct BlockBits {
    device const uint *w;
    int wpr, i0, j0, full;
};

inline BlockBits block_bits(constant MetalFlashParams &p, device const uint *mask, uint id, int qb,
                            int kb) {
    BlockBits bb;
    bb.full = !p.m_on || id == FLASH_FULL_BLOCK;
    bb.w = mask + (bb.full ? 0 : p.m_bits + (long)id * p.m_bq * p.m_wpr);
    bb.wpr = p.m_wpr;
    bb.i0 = qb * p.m_bq;
    bb.j0 = kb * p.m_bk;
    return bb;
}

inline bool bits_test(BlockBits bb, int i, int j) {
    if (bb.full) return true;
    const int r = i - bb.i0, c = j - bb.j0;
    return ((bb.w[r * bb.wpr + c / 32] >> (uint)(c % 32)) & 1u) != 0;
}

// The query block of row i, the key block of key j (0 without a mask).
inline int mask_q_block(constant MetalFlashParams &p, int i) { return p.m_on ? i / p.m_bq : 0; }
inline int mask_k_block(constant MetalFlashParams &p, int j) { return p.m_on ? j / p.m_bk : 0; }

// ---- tile movers ------------------------------------------------------------------------------
// Tiles live in threadgroup memory as f32 rows of D (the kernel's head dim): rows past `len`
// and columns past `hd` (the problem's head dim) are zero, so they add nothing to any product.

// Cooperative load of `rows` rows starting at `row0`, scaled by `mul`.
template <typename T, int D>
inline void load_rows(threadgroup float *dst, device const T *src, long tok_stride, int row0, int len,
                      int rows, int hd, uint tid, uint nthreads, float mul) {
    for (int e = (int)tid; e < rows * D; e += (int)nthreads) {
        const int r = e / D, c = e % D, row = row0 + r;
        dst[e] = (row < len && c < hd) ? (float)src[(long)row * tok_stride + c] * mul : 0.0f;
    }
}

// Cooperative store of `rows` rows (those below `len`, columns below `hd`), scaled by `mul`.
template <typename T, int D>
inline void store_rows(device T *dst, long tok_stride, threadgroup const float *src, int row0, int len,
                       int rows, int hd, uint tid, uint nthreads, float mul) {
    for (int e = (int)tid; e < rows * D; e += (int)nthreads) {
        const int r = e / D, c = e % D, row = row0 + r;
        if (row < len && c < hd) dst[(long)row * tok_stride + c] = (T)(src[e] * mul);
    }
}

// Loads this simdgroup's 8 rows (8*sg .. 8*sg+7 of a `total`-row block starting at row0) into
// D/8 matrices, staging `cap` rows at a time through `stage`. Every thread of the threadgroup
// must call it (it has threadgroup barriers).
template <typename T, int D>
inline void rows_to_matrices(thread simdgroup_float8x8 *m, threadgroup float *stage, int cap,
                             int total, device const T *src, long tok_stride, int row0, int len,
                             int hd, uint tid, uint nthreads, uint sg, float mul) {
    for (int c = 0; c < total; c += cap) {
        load_rows<T, D>(stage, src, tok_stride, row0 + c, len, cap, hd, tid, nthreads, mul);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        const int mine = 8 * (int)sg - c;
        if (mine >= 0 && mine < cap)
            for (int n = 0; n < D / 8; ++n) simdgroup_load(m[n], stage + mine * D + 8 * n, D);
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
}

// The reverse: stores this simdgroup's matrices as rows of the block, through `stage`.
template <typename T, int D>
inline void matrices_to_rows(thread simdgroup_float8x8 *m, threadgroup float *stage, int cap,
                             int total, device T *dst, long tok_stride, int row0, int len, int hd,
                             uint tid, uint nthreads, uint sg, float mul) {
    for (int c = 0; c < total; c += cap) {
        const int mine = 8 * (int)sg - c;
        if (mine >= 0 && mine < cap)
            for (int n = 0; n < D / 8; ++n) simdgroup_store(m[n], stage + mine * D + 8 * n, D);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        store_rows<T, D>(dst, tok_stride, stage, row0 + c, len, cap, hd, tid, nthreads, mul);
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
}

// C (8 x 8·NB, stored at `out` with row pitch `pitch`) = A · Bᵀ, A this simdgroup's D/8
// matrices (8 x D), B `8·NB` rows of D in threadgroup memory: the QKᵀ-shaped product.
template <int D, int NB>
inline void a_bt(thread simdgroup_float8x8 *a, threadgroup const float *b, threadgroup float *out,
                 int pitch) {
    for (int nb = 0; nb < NB; ++nb) {
        simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
        for (int kk = 0; kk < D / 8; ++kk) {
            simdgroup_float8x8 bt;
            // Transposed load: bt(r, c) = B[8nb + c][8kk + r].
            simdgroup_load(bt, b + 8 * nb * D + 8 * kk, D, ulong2(0, 0), true);
            simdgroup_multiply_accumulate(acc, a[kk], bt, acc);
        }
        simdgroup_store(acc, out + 8 * nb, pitch);
    }
}

// acc[n] (8 x D) += A · B, A (8 x 8·NK, at `a` with row pitch `pitch`), B `8·NK` rows of D in
// threadgroup memory: the PV-shaped product.
template <int D, int NK>
inline void acc_ab(thread simdgroup_float8x8 *acc, threadgroup const float *a, int pitch,
                   threadgroup const float *b) {
    simdgroup_float8x8 am[NK];
    for (int kk = 0; kk < NK; ++kk) simdgroup_load(am[kk], a + 8 * kk, pitch);
    for (int n = 0; n < D / 8; ++n)
        for (int kk = 0; kk < NK; ++kk) {
            simdgroup_float8x8 bm;
            simdgroup_load(bm, b + 8 * kk * D + 8 * n, D);
            simdgroup_multiply_accumulate(acc[n], am[kk], bm, acc[n]);
        }
}

// acc[n] = diag(·) · acc[n] for the diagonal 8x8 matrix at `diag` (rows scaled without knowing
// which lane holds which element).
template <int D>
inline void scale_rows(thread simdgroup_float8x8 *acc, threadgroup const float *diag) {
    simdgroup_float8x8 dm;
    simdgroup_load(dm, diag, 8);
    for (int n = 0; n < D / 8; ++n) {
        simdgroup_float8x8 t;
        simdgroup_multiply(t, dm, acc[n]);
        acc[n] = t;
    }
}

// Tile sizes (mirrored by crates/flash-ops/src/plan/metal.rs). 4 simdgroups of 32 threads;
// every f32 tile fits Apple's 32 KiB of threadgroup memory for D up to 256.
#define FLASH_THREADS 128
#define FLASH_BR 32  // query rows per forward / dQ threadgroup, 8 per simdgroup
#define FLASH_BK 32  // key rows per dK/dV threadgroup, 8 per simdgroup
// Keys per forward / dQ tile: the k (or v) tile is BC x D f32, at most 16 KiB.
#define FLASH_BC(D) ((D) <= 128 ? 32 : 16)
// Query rows per dK/dV tile: q and dO tiles are BQ x D f32 each, at most 16 KiB together.
#define FLASH_BQ(D) ((D) <= 64 ? 32 : (D) <= 128 ? 16 : 8)
