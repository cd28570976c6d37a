//! `train bench`: end-to-end training-step throughput of one model with each attention kind,
//! across sequence lengths, at a fixed number of tokens per step (FlashAttention's Table 4 idea:
//! what longer context costs). The kinds share one set of weights and the same batches and are
//! timed in interleaved rounds, so machine noise hits them alike; ratios are within one run.
//! With `--torch PYTHON`, [`torch`] compares our step with PyTorch's in the same way.
//! `--sparsity PATTERN` (repeatable) adds each block-sparse pattern's rows beside the dense ones:
//! one model per pattern on the same weights, in the same interleaved rounds.

mod torch;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarMap;
use clap::Args;
use flash_ops_bench::{cpu_model, gemm_ceiling, gemm_path, median};
use flash_ops_models::{AttentionKind, Sparsity};
use serde_json::json;

use crate::batching::causal_batch;
use crate::masking::{mlm_batch, MlmIds, MlmSettings};
use crate::model::{self, Batch, ModelKind, Net, SizeOverrides};
use crate::optim::{self, AdamW, AdamWConfig, Grads};
use crate::{DTypeArg, DeviceArg, SizeArgs};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchModel {
    Gpt2,
    Bert,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(long, value_enum, default_value = "gpt2")]
    pub model: BenchModel,
    #[command(flatten)]
    pub size: SizeArgs,
    /// A tokenizer.json whose vocabulary sizes the model (default: GPT-2 BPE for gpt2,
    /// bert-base-uncased WordPiece for bert), as `train --tokenizer`.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Sequence lengths to measure.
    #[arg(long, value_delimiter = ',', default_value = "256,512,1024")]
    pub seq_lens: Vec<usize>,
    /// Attention kinds to compare (default naive,flash1,flash2; with --torch, flash2).
    #[arg(long, value_delimiter = ',', value_parser = crate::parse_attn)]
    pub attn: Vec<AttentionKind>,
    /// Block-sparse patterns measured beside dense attention (repeat the flag for several), as
    /// `train --sparsity` takes them.
    #[arg(long, value_parser = crate::parse_sparsity)]
    pub sparsity: Vec<Sparsity>,
    /// Tokens per training step (batch = tokens / seq_len, at least 1).
    #[arg(long, default_value_t = 2048)]
    pub tokens_per_step: usize,
    /// Timed steps per kind and length.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Untimed warm-up steps per kind and length.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Peak FLOP/s for MFU, in TFLOP/s (default: a large matmul measured here).
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// JSON results.
    #[arg(long, default_value = "runs/bench.json")]
    pub out: PathBuf,
    /// Compare with PyTorch: this Python (with torch) runs scripts/torch_train_baseline.py, the
    /// same model and step, interleaved with ours; rows are --cases, not --seq-lens.
    #[arg(long, value_name = "PYTHON")]
    pub torch: Option<String>,
    /// The PyTorch baseline script (default: scripts/torch_train_baseline.py of this checkout).
    #[arg(long)]
    pub torch_script: Option<PathBuf>,
    /// With --torch: the model shapes to measure.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "tiny,gpt2-small-width"
    )]
    pub cases: Vec<torch::Case>,
}

/// Resets the process' peak-RSS counter (Linux); false where unsupported.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", b"5").is_ok()
}

/// Peak resident set size since the last reset, bytes (Linux `VmHWM`).
fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Clipping and learning rate of a benchmarked step: `train`'s default clip and the tiny
/// preset's schedule (peak, warmup, total steps, final ratio); the values do not change the work.
const GRAD_CLIP: f64 = 1.0;
const SCHEDULE: (f64, u64, u64, f64) = (1.5e-3, 20, 300, 0.1);
/// GPT-2's AdamW (llm.c; `train gpt2`'s recipe).
const ADAMW: AdamWConfig = AdamWConfig {
    beta1: 0.9,
    beta2: 0.95,
    eps: 1e-8,
    weight_decay: 0.1,
};

fn lr_at(step: u64) -> f64 {
    let (peak, warmup, total, min_ratio) = SCHEDULE;
    optim::lr_at(step, peak, warmup, total, min_ratio)
}

/// One optimizer step as `train`'s loop takes it: forward, backward, global-norm clipping,
/// AdamW. Returns the loss.
fn train_step(net: &Net, opt: &mut AdamW, batch: &Batch, step: u64) -> Result<f64> {
    let loss = net.loss(batch, true)?;
    let grads = loss.backward()?;
    let mut acc = Grads::new();
    opt.accumulate(&mut acc, &grads, 1.0)?;
    let clip = crate::trainer::clip_scale(AdamW::grad_norm(&acc)?, GRAD_CLIP);
    opt.step(&acc, lr_at(step), clip)?;
    Ok(loss.to_scalar::<f32>()? as f64)
}

/// The FLOP/s that MFU divides by, and where it comes from.
fn peak_flops(a: &BenchArgs, dev: &Device, dtype: DType) -> Result<(f64, &'static str)> {
    Ok(match a.peak_tflops {
        Some(t) => (t * 1e12, "--peak-tflops"),
        // The same matmul ceiling as the attention tables of `repro` (GFLOP/s → FLOP/s).
        None => (gemm_ceiling(5, dev, dtype)? * 1e9, "measured matmul"),
    })
}

/// Training FLOPs per token (FlashAttention-2 / llm.c count): `6·params + 12·layers·hidden·seq`.
fn flops_per_token(params: usize, dims: &model::Dims, seq: usize) -> f64 {
    6.0 * params as f64 + 12.0 * dims.layers as f64 * dims.hidden as f64 * seq as f64
}

pub fn run(a: BenchArgs) -> Result<()> {
    // As in training: the measured steps reuse freed memory.
    flash_ops_bench::reuse_freed_memory();
    if a.steps == 0 {
        bail!("bench needs --steps >= 1")
    }
    crate::metrics::ensure_writable_parent(&a.out)?;
    if let Some(python) = &a.torch {
        if !a.sparsity.is_empty() {
            bail!("--sparsity is not measured against PyTorch (--torch); drop one of them")
        }
        if a.tokenizer.is_some() {
            bail!("--tokenizer is not used by the PyTorch comparison (--torch, GPT-2's vocabulary); drop one of them")
        }
        return torch::run(&a, python);
    }
    let attn = if a.attn.is_empty() {
        vec![
            AttentionKind::Naive,
            AttentionKind::FlashV1,
            AttentionKind::FlashV2,
        ]
    } else {
        a.attn.clone()
    };
    if a.seq_lens.is_empty() {
        bail!("bench needs at least one --seq-lens value")
    }
    let dev = crate::device(a.device)?;
    let dtype = a.dtype.dtype();
    let kind = match a.model {
        BenchModel::Gpt2 => ModelKind::Gpt2,
        BenchModel::Bert => ModelKind::Bert,
    };
    let (tok, _) = crate::trainer::pick_tokenizer(kind, a.tokenizer.as_deref(), None)?;
    let vocab = crate::tokenizer::vocab_size(&tok);
    let tokens = crate::tokenizer::encode_text(&tok, crate::data::DEFAULT_CORPUS)?;
    let max_seq = *a.seq_lens.iter().max().unwrap_or(&1024);
    let config = model::model_config(
        kind,
        a.size.preset,
        vocab,
        &SizeOverrides {
            n_layer: a.size.n_layer,
            n_head: a.size.n_head,
            n_embd: a.size.n_embd,
            n_positions: None,
            vocab_size: None,
            dropout: Some(0.0),
            sparsity: None,
        },
    )?;
    let mut config = config;
    let dims = model::dims(&config)?;
    if max_seq > dims.positions {
        // Benchmarks may exceed the preset's context: grow the position table.
        let key = match kind {
            ModelKind::Gpt2 => "n_positions",
            ModelKind::Bert => "max_position_embeddings",
        };
        config[key] = max_seq.into();
    }
    // Dense first (the baseline of `vs dense`), then each pattern: one net each, all on the
    // same variables (a VarMap hands a second builder the first one's tensors).
    let mut patterns = vec![Sparsity::default()];
    patterns.extend(a.sparsity.iter().copied().filter(|s| !s.is_dense()));
    let varmap = VarMap::new();
    let mut nets = patterns
        .iter()
        .map(|s| {
            let mut c = config.clone();
            if !s.is_dense() {
                c["sparsity"] = s.to_string().into();
            }
            Net::build(&c, &varmap, dtype, &dev, attn[0])
        })
        .collect::<Result<Vec<_>>>()?;
    optim::init_params(&varmap, 0, dims.layers, kind == ModelKind::Gpt2)?;
    // Every (pattern, kind) cell, timed in turn within each round.
    let cells: Vec<(usize, AttentionKind)> = (0..patterns.len())
        .flat_map(|p| attn.iter().map(move |&k| (p, k)))
        .collect();
    let mut opt = AdamW::new(&varmap, ADAMW)?;
    let params = opt.num_params();
    let mlm_ids = match kind {
        ModelKind::Bert => Some(MlmIds::new(&tok, vocab)?),
        ModelKind::Gpt2 => None,
    };
    let (peak, peak_src) = peak_flops(&a, &dev, dtype)?;
    println!(
        "bench: {:?} {:?}, {:.2}M params ({} layers, width {}), {} tokens/step, {} timed + {} warm-up steps per cell, dtype {:?}, device {:?}, {} threads; MFU peak {:.1} GFLOP/s ({peak_src})",
        kind,
        a.size.preset,
        params as f64 / 1e6,
        dims.layers,
        dims.hidden,
        a.tokens_per_step,
        a.steps,
        a.warmup,
        a.dtype,
        dev.location(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        peak / 1e9
    );
    println!("CPU: {}; gemm micro-kernels: {}", cpu_model(), gemm_path());
    let mut rows = Vec::new();
    let mut cursor = 0usize;
    for &seq in &a.seq_lens {
        let batch = (a.tokens_per_step / seq).max(1);
        let content = match kind {
            ModelKind::Gpt2 => seq,
            ModelKind::Bert => seq - 2,
        };
        let mut next_batch = |step: u64| -> Result<Batch> {
            let need = batch * (content + 1);
            if cursor + need > tokens.len() {
                cursor = 0;
            }
            let windows: Vec<&[u32]> = (0..batch)
                .map(|i| &tokens[cursor + i * (content + 1)..cursor + (i + 1) * (content + 1)])
                .collect();
            cursor += need;
            match &mlm_ids {
                None => causal_batch(&windows, &dev),
                Some(ids) => {
                    let w: Vec<&[u32]> = windows.iter().map(|w| &w[..content]).collect();
                    mlm_batch(
                        &w,
                        ids,
                        MlmSettings {
                            mask_prob: 0.15,
                            whole_word: false,
                        },
                        step,
                        &dev,
                    )
                }
            }
        };
        // Same weights, same batch: every kind must give the same loss (per pattern).
        let probe = next_batch(0)?;
        let mut probe_losses = Vec::new();
        for &(p, k) in &cells {
            nets[p].set_attention(k);
            probe_losses.push(nets[p].loss(&probe, false)?.to_scalar::<f32>()? as f64);
        }
        let spread = cells
            .iter()
            .zip(&probe_losses)
            .map(|(&(p, _), l)| (l - probe_losses[p * attn.len()]).abs())
            .fold(0f64, f64::max);
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); cells.len()];
        let mut peaks: Vec<Option<u64>> = vec![None; cells.len()];
        let mut step_no = 1u64;
        for round in 0..a.warmup + a.steps {
            for (ki, &(p, k)) in cells.iter().enumerate() {
                let net = &mut nets[p];
                net.set_attention(k);
                let b = next_batch(step_no)?;
                let measure_mem = reset_peak_rss();
                dev.synchronize()?;
                let t0 = Instant::now();
                train_step(net, &mut opt, &b, step_no - 1)?;
                step_no += 1;
                dev.synchronize()?;
                let dt = t0.elapsed().as_secs_f64();
                if round >= a.warmup {
                    times[ki].push(dt);
                    if measure_mem {
                        peaks[ki] = peaks[ki].max(peak_rss());
                    }
                }
            }
        }
        let flops_per_token = flops_per_token(params, &dims, seq);
        let medians = times
            .iter()
            .map(|t| median(t).context("no timed steps"))
            .collect::<Result<Vec<_>>>()?;
        let mins: Vec<f64> = times
            .iter()
            .map(|t| t.iter().copied().fold(f64::INFINITY, f64::min))
            .collect();
        // Naive of the same pattern; dense of the same kind.
        let tps_of = |ki: usize| ((batch * seq) as f64 / medians[ki], mins[ki]);
        let naive_ki = |p: usize| cells.iter().position(|&c| c == (p, AttentionKind::Naive));
        for (ki, &(p, k)) in cells.iter().enumerate() {
            let (step_s, step_min) = (medians[ki], mins[ki]);
            let tps = (batch * seq) as f64 / step_s;
            let naive_tps = naive_ki(p).map(tps_of);
            let dense_tps = (p > 0).then(|| tps_of(ki % attn.len()));
            rows.push(json!({
                "seq_len": seq, "batch": batch, "attn": k.to_string(),
                "sparsity": patterns[p].to_string(),
                "step_s_median": step_s, "step_s_all": times[ki],
                "tokens_per_s": tps,
                "step_s_min": step_min,
                "speedup_vs_naive": naive_tps.map(|n| tps / n.0),
                "speedup_vs_naive_min": naive_tps.map(|n| n.1 / step_min),
                "speedup_vs_dense": dense_tps.map(|n| tps / n.0),
                "peak_rss_bytes": peaks[ki],
                "flops_per_token": flops_per_token,
                "mfu": tps * flops_per_token / peak,
                "probe_loss": probe_losses[ki],
            }));
        }
        println!(
            "seq {seq}: batch {batch}; probe loss spread across kinds (per pattern) {spread:.2e}"
        );
    }
    println!();
    let width = patterns
        .iter()
        .map(|s| s.to_string().len())
        .max()
        .unwrap_or(5);
    println!(
        "{:>6} {:>6} {:>8} {:<width$} {:>10} {:>10} {:>10} {:>9} {:>12} {:>8} {:>11} {:>7}",
        "seq",
        "batch",
        "attn",
        "sparsity",
        "step med",
        "step min",
        "tok/s",
        "vs naive",
        "(by min)",
        "vs dense",
        "peak RSS",
        "MFU"
    );
    for r in &rows {
        println!(
            "{:>6} {:>6} {:>8} {:<width$} {:>10.3} {:>10.3} {:>10.0} {:>9} {:>12} {:>8} {:>11} {:>6.1}%",
            r["seq_len"].to_string(),
            r["batch"].to_string(),
            r["attn"].as_str().unwrap_or(""),
            r["sparsity"].as_str().unwrap_or(""),
            r["step_s_median"].as_f64().unwrap_or(0.0),
            r["step_s_min"].as_f64().unwrap_or(0.0),
            r["tokens_per_s"].as_f64().unwrap_or(0.0),
            r["speedup_vs_naive"]
                .as_f64()
                .map_or("-".into(), |x| format!("{x:.2}x")),
            r["speedup_vs_naive_min"]
                .as_f64()
                .map_or("-".into(), |x| format!("{x:.2}x")),
            r["speedup_vs_dense"]
                .as_f64()
                .map_or("-".into(), |x| format!("{x:.2}x")),
            r["peak_rss_bytes"]
                .as_u64()
                .map_or("-".into(), |b| format!("{:.0} MiB", b as f64 / 1048576.0)),
            100.0 * r["mfu"].as_f64().unwrap_or(0.0)
        );
    }
    let report = json!({
        "model": format!("{kind:?}"), "preset": format!("{:?}", a.size.preset), "config": config,
        "params": params, "tokens_per_step": a.tokens_per_step, "steps": a.steps, "warmup": a.warmup,
        "dtype": format!("{:?}", a.dtype), "device": format!("{:?}", dev.location()),
        "threads": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "cpu": cpu_model(), "gemm_path": gemm_path(),
        "peak_flops": peak, "peak_source": peak_src,
        "mfu_formula": "6*params + 12*layers*hidden*seq FLOPs per token",
        "peak_memory": "process VmHWM after resetting it to the current RSS before the step (Linux; includes memory the allocator retains from earlier steps, so it is an upper bound), CPU only",
        "rows": rows,
    });
    write_report(&a.out, &report)
}

/// The JSON report, written atomically.
fn write_report(out: &std::path::Path, report: &serde_json::Value) -> Result<()> {
    crate::checkpoint::write_atomic(out, serde_json::to_string_pretty(report)?.as_bytes())?;
    println!("\nwrote {}", out.display());
    Ok(())
}
