//! The published numbers our tables are printed beside. Copied from the papers (and
//! `shared/paper-numbers.md`, which cites them): FlashAttention arXiv 2205.14135, FlashAttention-2
//! arXiv 2307.08691, llm.c. These are references, never our measurements. Values read from a
//! figure ("≈" in the source) are marked `~` in the rendered tables; `None` is out of memory.

/// FlashAttention (2022), A100-40GB, batch 16, 8 heads, d 64, fp16: fwd+bwd speedup of
/// FlashAttention over PyTorch attention, sequence lengths 128..4K.
pub const FA1_LENGTHS: [usize; 6] = [128, 256, 512, 1024, 2048, 4096];
pub const FA1_SPEEDUP_DROPOUT_MASK: [f64; 6] = [1.95, 2.10, 2.47, 3.25, 3.32, 3.31];
pub const FA1_SPEEDUP_PLAIN: [f64; 6] = [2.16, 2.26, 1.62, 1.60, 1.73, 1.68];
/// Memory (MB), PyTorch / FlashAttention, same lengths.
pub const FA1_MEMORY_MB: [(f64, f64); 6] = [
    (36.0, 22.0),
    (104.0, 44.0),
    (336.0, 104.0),
    (1184.0, 209.0),
    (4416.0, 418.0),
    (17024.0, 836.0),
];
pub const FA1_MEMORY_NOTE: &str =
    "PyTorch runs out of memory from 8K; FlashAttention reaches 64K (13376 MB).";

/// FlashAttention-2, A100-80GB SXM4, fp16, 16K tokens, hidden 2048: fwd+bwd TFLOP/s for seq
/// 512..16K. `(d, causal, [PyTorch, FA1, FA2] per length)`.
pub const FA2_LENGTHS: [usize; 6] = [512, 1024, 2048, 4096, 8192, 16384];
#[allow(clippy::type_complexity)]
pub const FA2_FWD_BWD_TFLOPS: [(usize, bool, [[Option<f64>; 6]; 3]); 4] = [
    (
        64,
        false,
        [
            [
                Some(36.0),
                Some(40.0),
                Some(43.0),
                Some(45.0),
                Some(46.0),
                None,
            ],
            [
                Some(91.0),
                Some(92.0),
                Some(104.0),
                Some(108.0),
                Some(110.0),
                Some(110.0),
            ],
            [
                Some(132.0),
                Some(153.0),
                Some(162.0),
                Some(171.0),
                Some(175.0),
                Some(176.0),
            ],
        ],
    ),
    (
        128,
        false,
        [
            [
                Some(53.0),
                Some(67.0),
                Some(76.0),
                Some(79.0),
                Some(86.0),
                None,
            ],
            [
                Some(76.0),
                Some(72.0),
                Some(76.0),
                Some(80.0),
                Some(82.0),
                Some(83.0),
            ],
            [
                Some(150.0),
                Some(173.0),
                Some(187.0),
                Some(196.0),
                Some(201.0),
                Some(203.0),
            ],
        ],
    ),
    (
        64,
        true,
        [
            [
                Some(15.0),
                Some(16.0),
                Some(17.0),
                Some(18.0),
                Some(18.0),
                None,
            ],
            [
                Some(58.0),
                Some(70.0),
                Some(77.0),
                Some(87.0),
                Some(92.0),
                Some(97.0),
            ],
            [
                Some(88.0),
                Some(119.0),
                Some(140.0),
                Some(156.0),
                Some(165.0),
                Some(171.0),
            ],
        ],
    ),
    (
        128,
        true,
        [
            [
                Some(23.0),
                Some(28.0),
                Some(32.0),
                Some(32.0),
                Some(34.0),
                None,
            ],
            [
                Some(55.0),
                Some(62.0),
                Some(69.0),
                Some(76.0),
                Some(80.0),
                Some(83.0),
            ],
            [
                Some(99.0),
                Some(133.0),
                Some(155.0),
                Some(173.0),
                Some(182.0),
                Some(189.0),
            ],
        ],
    ),
];
/// Cells of [`FA2_FWD_BWD_TFLOPS`] read from the figure rather than its labels: (d, causal, variant
/// index, length index).
pub const FA2_READ_FROM_FIGURE: [(usize, bool, usize, usize); 3] =
    [(64, false, 2, 1), (128, false, 2, 0), (128, false, 2, 1)];

pub fn fa2_paper(d: usize, causal: bool) -> Option<&'static [[Option<f64>; 6]; 3]> {
    FA2_FWD_BWD_TFLOPS
        .iter()
        .find(|(pd, pc, _)| *pd == d && *pc == causal)
        .map(|(_, _, t)| t)
}

/// End-to-end references, printed as text beside Table 3.
pub const E2E_REFERENCE: &str = "\
Published end-to-end numbers (GPU, for reference):
- FlashAttention (2022), GPT-2 on OpenWebText, 8×A100-40GB: small 18.2 ppl in 9.5 days (HuggingFace) / 4.7 (Megatron-LM) / 2.7 (FlashAttention, 3.5×); medium 21.0 / 11.5 / 6.9 days (3.0×).
- FlashAttention (2022), GPT-2 small with longer context (FlashAttention): 1K 18.2 ppl in 2.7 days, 2K 17.6 in 3.0 days, 4K 17.5 in 3.6 days.
- FlashAttention (2022), BERT-large seq 512 to 72.0% MLM accuracy on 8×A100: MLPerf 1.1 20.0 ± 1.5 min, FlashAttention 17.4 ± 1.4 min (15% faster).
- FlashAttention-2, GPT-style training, TFLOP/s per A100 (no FA / FA1 / FA2): 1.3B 2K 142/189/196; 1.3B 8K 72/170/220; 2.7B 2K 149/189/205; 2.7B 8K 80/175/225 (72% MFU).
- llm.c GPT-2 124M: ~218K tokens/s per A100-80GB, ~468K tokens/s per H100 (bf16, 1024 context).";

/// The model-FLOPs formula of FlashAttention-2 and llm.c, which `train bench` uses for MFU.
pub const MFU_FORMULA: &str = "MFU = tokens/s × FLOPs per token / peak FLOP/s, with FLOPs per token = 6·params + 12·layers·hidden·seq (FlashAttention-2's count; llm.c writes it 6N + 6·L·C·T counting the causal half; the attention term is not halved for causal here). Peak = a dense matmul measured on the same machine in the same run (CPU), or the GPU's datasheet peak given with --peak-tflops.";
