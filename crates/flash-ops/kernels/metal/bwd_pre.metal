// Backward preprocessing: delta_i = rowsum(dO_i ∘ O_i) (FlashAttention-2 Algorithm 2, line 4),
// minus dlse_i when the lse has a gradient (dS = P ∘ (dP − (delta − dlse))), and the log-sum-exp the dQ and dK/dV kernels read (copied for V2, m + ln l for V1's m ‖ l).
// One thread per (query row, head): 32-row threadgroups, no threadgroup memory, no barriers.
#include "flash_metal.h"

template <typename T, int D>
[[kernel]] void flash_bwd_pre(FLASH_THREAD_ARGS, constant MetalFlashParams &p [[buffer(0)]],
                              device const long *seq_info [[buffer(1)]],
                              device const T *o [[buffer(2)]], device const T *d_o [[buffer(3)]],
                              device const float *stats [[buffer(4)]],
                              device float *lse [[buffer(5)]], device float *delta [[buffer(6)]],
                              device const float *dlse [[buffer(7)]]) {
    const int b = (int)tgid.z, h = (int)tgid.y, i = (int)tgid.x * 32 + (int)tid;
    const SeqInfo si = load_seq(seq_info, b);
    if (i >= si.q_len) return;
    const long row = si.o_off + (long)i * p.o_tok_stride + (long)h * p.head_dim;
    float acc = 0.0f;
    for (int c = 0; c < p.head_dim; ++c) acc += (float)d_o[row + c] * (float)o[row + c];
    const long idx = si.lse_off + (long)h * p.lse_head_stride + i;
    delta[idx] = p.has_dlse ? acc - dlse[idx] : acc;
    if (p.stats_v1) {
        const float m = stats[idx], l = stats[p.lse_len + idx];
        lse[idx] = l > 0.0f ? m + log(l) : -INFINITY;
    } else {
        lse[idx] = stats[idx];
    }
}

// The head dim is a run-time loop bound here: one instance per element type.
FLASH_INSTANCES_T(flash_bwd_pre)
