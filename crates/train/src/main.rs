//! `train`: pretrain GPT-2 (causal LM) and BERT (masked LM) with naive attention, FlashAttention
//! or FlashAttention-2, on an embedded public-domain corpus or your own data; sample, evaluate,
//! plot, benchmark, and train tokenizers.

mod batching;
mod bench;
mod checkpoint;
mod classify;
mod data;
mod evaluation;
mod hf;
mod labelled;
mod listops;
mod masking;
mod metrics;
mod model;
mod optim;
mod plot;
mod progress;
mod recipe;
mod stepping;
mod tokenizer;
mod trainer;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use flash_ops_models::{AttentionKind, Sparsity};

use model::Preset;

#[derive(Parser, Debug)]
#[command(
    name = "train",
    version,
    about = "Pretrain GPT-2 and BERT with FlashAttention (Candle)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Pretrain a GPT-2 (causal language modelling).
    Gpt2(TrainArgs),
    /// Pretrain a BERT (masked language modelling).
    Bert(BertArgs),
    /// Fine-tune BERT for sequence classification on labelled text (JSONL, CSV/TSV, or a folder
    /// per label), from --init-from DIR or from scratch; `--task listops`: Long Range Arena ListOps.
    BertClassify(classify::ClassifyArgs),
    /// Generate text from a GPT-2 checkpoint or Hugging Face model directory.
    Sample(SampleArgs),
    /// Validation loss and perplexity of a checkpoint or Hugging Face model directory.
    Eval(EvalArgs),
    /// Training throughput of each attention kind across sequence lengths.
    Bench(bench::BenchArgs),
    /// Render the loss curves of one or more run folders to PNG.
    Plot(plot::PlotArgs),
    /// Train a new BPE or WordPiece tokenizer on text files.
    Tokenizer(TokenizerArgs),
    /// Tokenize text files into an llm.c-layout token file for --data.
    Encode(EncodeArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DTypeArg {
    F32,
    Bf16,
    F16,
}

impl DTypeArg {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            DTypeArg::F32 => candle_core::DType::F32,
            DTypeArg::Bf16 => candle_core::DType::BF16,
            DTypeArg::F16 => candle_core::DType::F16,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
    Metal,
}

pub fn parse_attn(s: &str) -> std::result::Result<AttentionKind, String> {
    s.parse()
}

pub fn parse_sparsity(s: &str) -> std::result::Result<Sparsity, String> {
    s.parse()
}

/// The model size flags shared by `train` and `bench`: a preset and its overrides.
#[derive(Args, Debug, Clone)]
pub struct SizeArgs {
    /// Model size preset (tiny for CPU).
    #[arg(long, value_enum, default_value = "tiny")]
    pub preset: Preset,
    /// Override the number of layers.
    #[arg(long)]
    pub n_layer: Option<usize>,
    /// Override the number of attention heads.
    #[arg(long)]
    pub n_head: Option<usize>,
    /// Override the model width (hidden size).
    #[arg(long, alias = "hidden")]
    pub n_embd: Option<usize>,
}

#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// Attention implementation: naive, flash1 (FlashAttention) or flash2 (FlashAttention-2).
    #[arg(long, default_value = "flash2", value_parser = parse_attn)]
    pub attn: AttentionKind,
    #[command(flatten)]
    pub size: SizeArgs,
    /// Block-sparse attention in every layer: dense, butterfly, local:W, strided:S,
    /// local-global:W,G or random:DENSITY[:SEED], optionally @BQxBK (block size, default 128x128).
    #[arg(long, value_parser = parse_sparsity)]
    pub sparsity: Option<Sparsity>,
    /// Override the number of learned positions (maximum sequence length).
    #[arg(long)]
    pub n_positions: Option<usize>,
    /// Embedding rows (default: the tokenizer's vocabulary; larger pads it, e.g. 50304).
    #[arg(long)]
    pub vocab_size: Option<usize>,
    /// Dropout probability (default 0 for GPT-2 as in llm.c, 0.1 for BERT).
    #[arg(long)]
    pub dropout: Option<f32>,
    /// Run folder: checkpoints, metrics.jsonl, run.json, loss.png.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Text files / directories or llm.c token files (default: the embedded Moby-Dick).
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// A tokenizer.json (default: GPT-2 BPE for gpt2, bert-base-uncased WordPiece for bert).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Tokens per sequence.
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Sequences per micro-batch.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Optimizer steps.
    #[arg(long, conflicts_with = "tokens")]
    pub steps: Option<u64>,
    /// Train on this many tokens (sets --steps).
    #[arg(long)]
    pub tokens: Option<u64>,
    /// Stop (with a checkpoint) after this many seconds of training.
    #[arg(long)]
    pub time_limit: Option<f64>,
    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Linear warmup steps.
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// Final learning rate as a fraction of --lr (cosine decay).
    #[arg(long, default_value_t = 0.1)]
    pub min_lr_ratio: f64,
    /// AdamW decoupled weight decay (not on norms, biases, embeddings).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    #[arg(long)]
    pub beta1: Option<f64>,
    #[arg(long)]
    pub beta2: Option<f64>,
    #[arg(long, default_value_t = 1e-8)]
    pub eps: f64,
    /// Clip the global gradient norm to this (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f64,
    /// Compute dtype; bf16/f16 keep f32 master weights (f16 with dynamic loss scaling).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
    /// Validation every N steps (0 = only at the end).
    #[arg(long)]
    pub val_every: Option<u64>,
    /// Validation tokens per evaluation.
    #[arg(long, default_value_t = 4096)]
    pub val_tokens: usize,
    /// Checkpoint every N steps (and at the end and on Ctrl-C).
    #[arg(long)]
    pub ckpt_every: Option<u64>,
    /// Checkpoints to keep.
    #[arg(long, default_value_t = 3)]
    pub keep_checkpoints: usize,
    /// Continue the run in --out from its latest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Continue from this checkpoint directory or run folder (writing to --out).
    #[arg(long, conflicts_with = "resume")]
    pub resume_from: Option<PathBuf>,
    /// Start from the weights of a Hugging Face model directory (config.json + model.safetensors
    /// or a sharded index; its tokenizer.json if present). The model's shape comes from its
    /// config.json.
    #[arg(long, value_name = "DIR")]
    pub init_from: Option<PathBuf>,
    /// Replace an existing run in --out instead of refusing.
    #[arg(long)]
    pub overwrite: bool,
    /// Print a log line every N steps when there is no progress bar.
    #[arg(long, default_value_t = 10)]
    pub log_every: u64,
}

#[derive(Args, Debug, Clone)]
pub struct BertArgs {
    #[command(flatten)]
    pub train: TrainArgs,
    /// Fraction of tokens selected for prediction.
    #[arg(long, default_value_t = 0.15)]
    pub mask_prob: f64,
    /// Select whole words (a token and its ## continuations) together.
    #[arg(long)]
    pub whole_word: bool,
}

#[derive(Args, Debug)]
struct SampleArgs {
    /// A checkpoint directory or a run folder (its latest checkpoint).
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long, default_value = "Call me Ishmael.")]
    prompt: String,
    #[arg(long, default_value_t = 100)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Sample among the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Samples of the prompt, decoded in one batch (sample i is what `--seed` gives alone for
    /// i = 0, and its own stream otherwise); each stops after `<|endoftext|>`.
    #[arg(long, default_value_t = 1)]
    num_samples: usize,
    /// How the batch caches the prompt: once, shared by all samples (shared-prefix attention),
    /// or copied into every sample's cache (flash decoding; the baseline).
    #[arg(long, value_enum, default_value = "shared")]
    prompt_cache: PromptCache,
    #[arg(long, default_value = "flash2", value_parser = parse_attn)]
    attn: AttentionKind,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PromptCache {
    Shared,
    Duplicated,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// A checkpoint directory, a run folder (its latest checkpoint) or a Hugging Face model
    /// directory.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Data to evaluate on (default: the embedded corpus); its validation split is used.
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Tokenizer (default: the checkpoint's tokenizer.json).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Validation tokens to evaluate.
    #[arg(long, default_value_t = 65536)]
    pub max_tokens: usize,
    #[arg(long, default_value = "flash2", value_parser = parse_attn)]
    pub attn: AttentionKind,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
}

#[derive(Args, Debug)]
struct TokenizerArgs {
    #[arg(long, value_enum, default_value = "bpe")]
    kind: tokenizer::TokenizerKind,
    #[arg(long, default_value_t = 8192)]
    vocab_size: usize,
    /// Text files to train on (default: the embedded corpus).
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Where to write tokenizer.json.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct EncodeArgs {
    /// Text files to tokenize (default: the embedded corpus).
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// tokenizer.json (default: GPT-2).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Output token file (llm.c layout).
    #[arg(long)]
    out: PathBuf,
}

pub fn device(d: DeviceArg) -> Result<candle_core::Device> {
    Ok(match d {
        DeviceArg::Cpu => candle_core::Device::Cpu,
        DeviceArg::Cuda => candle_core::Device::new_cuda(0).map_err(|e| {
            anyhow::anyhow!(
                "cannot open CUDA device 0 ({e}); build with `--features cuda` on a machine with an NVIDIA GPU, or use --device cpu"
            )
        })?,
        DeviceArg::Metal => candle_core::Device::new_metal(0).map_err(|e| {
            anyhow::anyhow!(
                "cannot open the Metal device ({e}); build with `--features metal` on macOS, or use --device cpu"
            )
        })?,
    })
}

fn run_tokenizer(a: TokenizerArgs) -> Result<()> {
    if a.vocab_size < 300 {
        bail!(
            "--vocab-size {} is too small; use at least 300 (byte-level BPE alone needs 257)",
            a.vocab_size
        )
    }
    let tmp;
    let files: Vec<String> = if a.data.is_empty() {
        tmp = std::env::temp_dir().join(format!("train-corpus-{}.txt", std::process::id()));
        std::fs::write(&tmp, data::DEFAULT_CORPUS)?;
        vec![tmp.to_string_lossy().into_owned()]
    } else {
        for s in data::read_sources(&a.data)? {
            if let data::Source::Tokens(name, _) = s {
                bail!("{name} is a token file; `train tokenizer` needs text files")
            }
        }
        a.data
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect()
    };
    let t0 = std::time::Instant::now();
    let tok = tokenizer::train_new(a.kind, a.vocab_size, &files)?;
    if a.data.is_empty() {
        std::fs::remove_file(&files[0]).ok();
    }
    metrics::ensure_writable_parent(&a.out)?;
    tok.save(&a.out, false)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", a.out.display()))?;
    println!(
        "trained a {:?} tokenizer with {} tokens in {:.1}s -> {}",
        a.kind,
        tokenizer::vocab_size(&tok),
        t0.elapsed().as_secs_f64(),
        a.out.display()
    );
    Ok(())
}

fn run_encode(a: EncodeArgs) -> Result<()> {
    let tok = match &a.tokenizer {
        Some(p) => tokenizer::from_file(p)?,
        None => tokenizer::gpt2()?,
    };
    let sources = data::read_sources(&a.data)?;
    let sep = tok.token_to_id(tokenizer::GPT2_EOT);
    let ids = data::tokenize_sources(&sources, &tok, sep, tokenizer::vocab_size(&tok))?;
    metrics::ensure_writable_parent(&a.out)?;
    data::write_token_file(&a.out, &ids)?;
    println!("wrote {} tokens to {}", ids.len(), a.out.display());
    Ok(())
}

fn run_sample(a: SampleArgs) -> Result<()> {
    let dev = device(a.device)?;
    let loaded = evaluation::load_for_inference(&a.checkpoint, None, &dev, a.attn)?;
    let model::Net::Gpt2(gpt) = &loaded.net else {
        bail!(
            "{} is a BERT checkpoint; `train sample` generates from GPT-2 checkpoints (use `train eval` for BERT)",
            loaded.dir.display()
        )
    };
    let prompt = loaded
        .tokenizer
        .encode(a.prompt.as_str(), false)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .get_ids()
        .to_vec();
    if prompt.is_empty() {
        bail!("--prompt is empty; give some text to continue")
    }
    let sampling = if a.temperature <= 0.0 {
        flash_ops_models::Sampling::Greedy
    } else if a.top_k == 0 {
        flash_ops_models::Sampling::Temperature(a.temperature)
    } else {
        flash_ops_models::Sampling::TopK {
            k: a.top_k,
            temperature: a.temperature,
        }
    };
    if a.num_samples == 0 {
        bail!("--num-samples must be at least 1")
    }
    let cfg = flash_ops_models::BatchConfig {
        num_samples: a.num_samples,
        max_new_tokens: a.max_new_tokens,
        sampling,
        seed: a.seed,
        stop: loaded.tokenizer.token_to_id(tokenizer::GPT2_EOT),
        cache: match a.prompt_cache {
            PromptCache::Shared => flash_ops_models::BatchCache::SharedPrefix,
            PromptCache::Duplicated => flash_ops_models::BatchCache::Duplicated,
        },
    };
    let out = flash_ops_models::generate_batch(gpt, &prompt, &cfg)?;
    for (i, seq) in out.sequences.iter().enumerate() {
        let text = loaded
            .tokenizer
            .decode(seq, false)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if a.num_samples > 1 {
            println!("--- sample {i} ---");
        }
        println!("{text}");
    }
    // On stderr: stdout is the samples alone.
    let new = out.new_tokens(prompt.len());
    let secs = (out.prefill + out.decode).as_secs_f64();
    eprintln!(
        "{} sample(s), {new} new tokens in {secs:.2} s: {:.1} tokens/s (prompt of {} tokens prefilled once in {:.2} s; decoding {:.1} tokens/s, {} prompt cache)",
        a.num_samples,
        new as f64 / secs.max(1e-9),
        prompt.len(),
        out.prefill.as_secs_f64(),
        (new.saturating_sub(a.num_samples)) as f64 / out.decode.as_secs_f64().max(1e-9),
        format!("{:?}", a.prompt_cache).to_lowercase(),
    );
    Ok(())
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Gpt2(a) => {
            recipe::check_numbers(&a)?;
            trainer::run(model::ModelKind::Gpt2, a, None)
        }
        Cmd::Bert(a) => {
            recipe::check_numbers(&a.train)?;
            if !(a.mask_prob > 0.0 && a.mask_prob < 1.0) {
                bail!(
                    "--mask-prob {} is out of range; pass a fraction in (0, 1) such as 0.15",
                    a.mask_prob
                )
            }
            let mlm = masking::MlmSettings {
                mask_prob: a.mask_prob,
                whole_word: a.whole_word,
            };
            trainer::run(model::ModelKind::Bert, a.train, Some(mlm))
        }
        Cmd::BertClassify(a) => classify::run(a),
        Cmd::Sample(a) => run_sample(a),
        Cmd::Eval(a) => evaluation::run_eval(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Plot(a) => plot::run(a),
        Cmd::Tokenizer(a) => run_tokenizer(a),
        Cmd::Encode(a) => run_encode(a),
    }
}

fn main() -> ExitCode {
    stepping::candle_elementwise_on_caller();
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if e.downcast_ref::<trainer::Interrupted>().is_some() {
                eprintln!("{e}");
                return ExitCode::from(130);
            }
            // One line: the outermost message, then its causes.
            let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", msg.join(": "));
            ExitCode::FAILURE
        }
    }
}
