// Kernel parameters, shared with Rust: crates/flash-ops/src/plan/cuda.rs mirrors this struct
// field for field (#[repr(C)], pointers as u64). Change both together; the Rust side has a
// size/offset test against the numbers below.
//
// One struct serves every kernel (forward, backward, pre/post passes): each kernel reads the
// fields it needs and ignores the rest. Passed by value (it is ~350 bytes, well under the 4 KiB
// kernel-parameter limit), so kernels read it from the constant bank.
#pragma once

// Per-sequence record in `seq_info`: FLASH_SI_STRIDE int64 per sequence. Offsets are element
// offsets of row 0 of the sequence (head 0) in each buffer, start offset of the input layout
// included, so dense (batch-strided) and varlen (packed) inputs look the same to the kernels.
#define FLASH_SI_Q_LEN 0
#define FLASH_SI_K_LEN 1
#define FLASH_SI_Q_OFF 2   // q input
#define FLASH_SI_K_OFF 3   // k input
#define FLASH_SI_V_OFF 4   // v input
#define FLASH_SI_O_OFF 5   // o, d_o, dq, dq_accum, o_accum: contiguous (total_q, hq, d)
#define FLASH_SI_LSE_OFF 6 // lse, delta, m/l: index = lse_off + head * lse_head_stride + row
#define FLASH_SI_DK_OFF 7  // dk, dv: contiguous (total_k, hk, d)
#define FLASH_SI_STRIDE 8

#ifdef __cplusplus
extern "C" {
#endif

// Where the lists of a block-sparse mask (flash_ops::BlockMask, issue 12) lie in the one u32
// buffer `FlashParams::mask`, and their extents. Mirrored by `MaskDims` (src/plan/layout.rs);
// the Metal header declares the same fields.
typedef struct FlashMaskDims {
    // Word offsets in the buffer of kv_start, kv_block, kv_bits (rows: per query block, the
    // key blocks it lists, ascending, and their partial-block ids), q_start, q_block, q_bits
    // (the transposed columns) and bits (bq rows of wpr words per partial block).
    unsigned kv_start, kv_block, kv_bits, q_start, q_block, q_bits, bits;
    int qb, kb;          // query / key blocks per sequence
    int batch, heads;    // the mask's extents: 1 = broadcast over sequences / query heads
    int bq, bk, wpr;     // block size; words per bit row of a partial block
    int pad_[2];
} FlashMaskDims;

typedef struct FlashParams {
    // Buffers (device pointers; host pointers in the emulator).
    const void* q;
    const void* k;
    const void* v;
    void* o;            // forward: output; backward: the forward output (read)
    const void* d_o;    // backward: gradient of the output
    float* lse;         // V2 forward: written; backward: read (for V1, made by bwd_pre from m_l)
    float* m_l;         // V1 forward: m at [i], l at [lse_len + i]
    float* o_accum;     // V1 forward: f32 output accumulator (read-modify-written per k/v tile)
    float* delta;       // backward: rowsum(dO * O)
    float* dq_accum;    // backward: f32 dQ accumulator (atomics, or plain adds in V1)
    void* dq;
    void* dk;
    void* dv;
    const long long* seq_info;  // FLASH_SI_STRIDE int64 per sequence
    const float* alibi;         // slope per (sequence, query head), or null
    const float* dlse;          // backward: gradient of the lse (lse layout), or null: D -= dlse

    // Strides in elements.
    long long q_tok_stride, q_head_stride;
    long long k_tok_stride, k_head_stride;
    long long v_tok_stride, v_head_stride;
    long long o_tok_stride;     // heads_q * head_dim
    long long dk_tok_stride;    // heads_k * head_dim
    long long lse_head_stride;  // dense: seqlen_q; varlen: total_q
    long long lse_len;          // heads_q * total_q
    long long total_q;          // rows of the q token axis (bwd_post's element count / o_tok_stride)

    int batch, heads_q, heads_k, head_dim;
    int max_q_len, max_k_len;
    int window_left, window_right;  // -1: unbounded. Causal is window_right = 0.
    int has_dropout;
    int vec_loads;      // 1: every row start is 16-byte aligned, tiles load with cp.async
    float scale;
    float softcap;      // 0: off
    float dropout_scale;            // 1 / (1 - p)
    unsigned int dropout_threshold; // keep iff draw >= threshold
    unsigned int seed_lo, seed_hi;

    // Block-sparse mask: null when there is none (every kernel then takes its dense path).
    const unsigned* mask;
    FlashMaskDims mask_dims;
} FlashParams;

#ifdef __cplusplus
}
#endif
