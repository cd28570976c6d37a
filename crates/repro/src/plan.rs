//! What each mode measures. The papers' protocols at their sizes (`gpu`), scaled down so the whole
//! reproduction fits 30 minutes on a 2-core CPU (`full`), and tiny for CI (`quick`). The scale-down
//! keeps each protocol's structure (fixed batch and heads for FlashAttention's table; fixed
//! batch×seq and hidden size for FlashAttention-2's figures) and is printed in every caption.

use serde::Serialize;

use crate::results::{AttnSetup, Fa2Setup};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Tiny sizes (~1–2 min): CI and tests.
    Quick,
    /// CPU reproduction, scaled down to fit ~30 min on 2 cores.
    Full,
    /// The papers' sizes, for the CUDA backend.
    Gpu,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Quick => "quick",
            Mode::Full => "full",
            Mode::Gpu => "gpu",
        }
    }
}

/// One `train bench` invocation of Table 3.
#[derive(Clone, Debug)]
pub struct E2eSpec {
    pub label: &'static str,
    pub args: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct Plan {
    /// Timed repeats per cell (median reported), after one warm-up.
    pub reps: usize,
    /// Table 1: FlashAttention (2022) §4.3 / Appendix E.
    pub t1: AttnSetup,
    /// Naive attention is skipped where its predicted peak memory passes this: the "out of
    /// memory" of the papers' tables, at a size chosen for the machine.
    pub memory_budget: u64,
    /// Table 2: FlashAttention-2 Fig. 4–6.
    pub t2: Fa2Setup,
    // Table 3: end-to-end.
    pub e2e: Vec<E2eSpec>,
}

fn bench_args(
    model: &str,
    preset: &str,
    extra: &[&str],
    seq: &str,
    tokens: usize,
    steps: usize,
    warmup: usize,
) -> Vec<String> {
    let mut v: Vec<String> = ["--model", model, "--preset", preset, "--seq-lens", seq]
        .iter()
        .map(|s| s.to_string())
        .collect();
    // train bench's --attn accumulates when repeated: only add the default order if not given.
    if !extra.contains(&"--attn") {
        v.extend(["--attn".into(), "naive,flash1,flash2".into()]);
    }
    v.extend(extra.iter().map(|s| s.to_string()));
    v.extend([
        "--tokens-per-step".into(),
        tokens.to_string(),
        "--steps".into(),
        steps.to_string(),
        "--warmup".into(),
        warmup.to_string(),
    ]);
    v
}

/// GPT-2 and BERT at the `tiny` preset: the first end-to-end rows of a CPU run.
fn tiny_models(seqs: &str, tokens: usize, steps: usize, warmup: usize) -> Vec<E2eSpec> {
    [
        ("GPT-2 tiny (4 layers, width 128)", "gpt2"),
        ("BERT tiny (4 layers, width 128)", "bert"),
    ]
    .into_iter()
    .map(|(label, model)| E2eSpec {
        label,
        args: bench_args(model, "tiny", &[], seqs, tokens, steps, warmup),
    })
    .collect()
}

/// GPT-2 small's width and heads with one of its 12 layers, one timed step and no warm-up: its
/// attention at long context within a CPU budget.
fn gpt2_small_layer(label: &'static str, attn: &[&str], seqs: &str, tokens: usize) -> E2eSpec {
    let extra = [&["--n-layer", "1"], attn].concat();
    E2eSpec {
        label,
        args: bench_args("gpt2", "gpt2-small", &extra, seqs, tokens, 1, 0),
    }
}

const GB: u64 = 1 << 30;

impl Plan {
    pub fn new(mode: Mode) -> Self {
        match mode {
            Mode::Quick => Plan {
                reps: 1,
                t1: AttnSetup {
                    batch: 1,
                    heads: 2,
                    d: 64,
                    dropout: 0.1,
                    lengths: vec![128, 256],
                    memory_lengths: vec![512],
                },
                // Small enough that naive "runs out" inside the quick range, so CI exercises it.
                memory_budget: 24 << 20,
                t2: Fa2Setup {
                    tokens: 512,
                    hidden: 128,
                    lengths: vec![128, 256],
                    head_dims: vec![64, 128],
                },
                e2e: [
                    tiny_models("64,128", 256, 1, 0),
                    vec![gpt2_small_layer(
                        "GPT-2 small width (768, 12 heads), 1 layer",
                        &[],
                        "128",
                        128,
                    )],
                ]
                .concat(),
            },
            Mode::Full => Plan {
                reps: 3,
                t1: AttnSetup {
                    batch: 2,
                    heads: 8,
                    d: 64,
                    dropout: 0.1,
                    lengths: vec![128, 256, 512, 1024, 2048, 4096],
                    memory_lengths: vec![8192],
                },
                // Half of the 24 GiB machine: naive runs to 2K (4.4 GB measured at batch 2, 8
                // heads); 4K is predicted at ~17 GB and skipped, as the papers' OOM cells.
                memory_budget: 12 * GB,
                t2: Fa2Setup {
                    tokens: 4096,
                    hidden: 768,
                    lengths: vec![512, 1024, 2048, 4096],
                    head_dims: vec![64, 128],
                },
                // train bench runs at ~10–15% of the matmul peak on 2 cores (small matmuls, the
                // 50K-word LM head, AdamW): one timed step per cell is what 30 minutes allow.
                e2e: [
                    tiny_models("256,512,1024", 2048, 1, 1),
                    // GPT-2 small's width and heads at 1K/2K/4K context (FlashAttention Table 4),
                    // one of its 12 layers, one sequence per step and no warm-up step so it fits
                    // the CPU budget; flash2 runs first in each round, so a cold start counts
                    // against flash, not for it.
                    vec![gpt2_small_layer(
                        "GPT-2 small width (768, 12 heads), 1 layer, no warm-up step",
                        &["--attn", "flash2,flash1,naive"],
                        "1024,2048,4096",
                        1024,
                    )],
                ]
                .concat(),
            },
            Mode::Gpu => Plan {
                reps: 10,
                t1: AttnSetup {
                    batch: 16,
                    heads: 8,
                    d: 64,
                    dropout: 0.1,
                    lengths: vec![128, 256, 512, 1024, 2048, 4096],
                    memory_lengths: vec![8192, 16384, 32768, 65536],
                },
                // Below an H100/A100's 80 GB: naive is skipped before the device runs out.
                memory_budget: 60 * GB,
                t2: Fa2Setup {
                    tokens: 16384,
                    hidden: 2048,
                    lengths: vec![512, 1024, 2048, 4096, 8192, 16384],
                    head_dims: vec![64, 128],
                },
                e2e: vec![
                    E2eSpec {
                        label: "GPT-2 small (124M)",
                        args: bench_args(
                            "gpt2",
                            "gpt2-small",
                            &["--device", "cuda", "--dtype", "bf16"],
                            "1024,2048,4096",
                            16384,
                            10,
                            2,
                        ),
                    },
                    E2eSpec {
                        label: "BERT-base",
                        args: bench_args(
                            "bert",
                            "bert-base",
                            &["--device", "cuda", "--dtype", "bf16"],
                            "128,512",
                            16384,
                            10,
                            2,
                        ),
                    },
                ],
            },
        }
    }
}

impl Plan {
    /// FLOPs the attention sections execute (warm-up and timed repeats, forward and
    /// forward+backward, every variant, naive included even where it will be skipped): a size
    /// to compare modes and machines by, not a time.
    pub fn attention_flops(&self) -> (f64, f64) {
        use flash_ops_bench::{flops_fwd, BWD_PER_FWD_FLOPS};
        let per_cell =
            |f: f64, reps: usize| (1 + reps) as f64 * (f + (1.0 + BWD_PER_FWD_FLOPS) * f);
        let mut t1 = 0.0;
        for &n in &self.t1.lengths {
            let f = self.t1.batch as f64 * flops_fwd(n, self.t1.d, self.t1.heads, false);
            t1 += 2.0 * 3.0 * per_cell(f, self.reps);
        }
        for &n in &self.t1.memory_lengths {
            t1 += per_cell(
                self.t1.batch as f64 * flops_fwd(n, self.t1.d, self.t1.heads, false),
                1,
            );
        }
        let mut t2 = 0.0;
        for &d in &self.t2.head_dims {
            for causal in [false, true] {
                for &n in &self.t2.lengths {
                    let b = (self.t2.tokens / n).max(1) as f64;
                    let h = (self.t2.hidden / d).max(1);
                    t2 += 3.0 * per_cell(b * flops_fwd(n, d, h, causal), self.reps);
                }
            }
        }
        (t1, t2)
    }
}
