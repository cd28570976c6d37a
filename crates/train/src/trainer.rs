//! The training loop of `train gpt2` / `train bert`, and `train eval`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use flash_ops_models::AttentionKind;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use tokenizers::Tokenizer;

use crate::checkpoint::{self, TrainState};
use crate::data::{self, Batches, DataPos};
use crate::metrics::{self, Metrics};
use crate::model::{self, Batch, ModelKind, Net, Preset, SizeOverrides};
use crate::optim::{self, AdamW, AdamWConfig, Grads};
use crate::{DTypeArg, EvalArgs, TrainArgs};

/// Returned when Ctrl-C stopped the run (after its checkpoint was written); exit code 130.
#[derive(Debug)]
pub struct Interrupted(pub String);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Interrupted {}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MlmSettings {
    pub mask_prob: f64,
    pub whole_word: bool,
}

/// Everything that defines a run; saved as `OUT/run.json` and inside every checkpoint.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunSettings {
    pub model: ModelKind,
    pub preset: Preset,
    pub attn: String,
    pub config: serde_json::Value,
    pub tokenizer: String,
    pub data: Vec<String>,
    pub data_tokens: usize,
    pub data_hash: u64,
    pub seq_len: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub steps: u64,
    pub lr: f64,
    pub warmup_steps: u64,
    pub min_lr_ratio: f64,
    pub adamw: AdamWConfig,
    pub grad_clip: f64,
    pub dtype: DTypeArg,
    pub seed: u64,
    pub mlm: Option<MlmSettings>,
    pub params: usize,
    pub unigram_entropy: f64,
}

/// Training defaults of a preset: (seq_len, batch, grad_accum, steps, lr, warmup, val_every,
/// ckpt_every, weight decay, beta2).
struct Recipe {
    seq_len: usize,
    batch: usize,
    accum: usize,
    steps: u64,
    lr: f64,
    warmup: u64,
    val_every: u64,
    ckpt_every: u64,
    weight_decay: f64,
    beta2: f64,
}

fn recipe(kind: ModelKind, preset: Preset) -> Recipe {
    match (kind, preset) {
        // Scaled down for 2 CPU cores: 1024 tokens per step, about one epoch of Moby-Dick.
        (ModelKind::Gpt2, Preset::Tiny) => Recipe {
            seq_len: 128,
            batch: 8,
            accum: 1,
            steps: 300,
            lr: 1.5e-3,
            warmup: 20,
            val_every: 25,
            ckpt_every: 50,
            weight_decay: 0.1,
            beta2: 0.95,
        },
        // llm.c's GPT-2 124M recipe (FlashAttention Table 2's lr 6e-4, wd 0.1): 2^19 tokens per
        // step, 10B tokens; GPT-3's learning rates for the larger ones.
        (ModelKind::Gpt2, p) => Recipe {
            seq_len: 1024,
            batch: 8,
            accum: 64,
            steps: 19073,
            lr: match p {
                Preset::Gpt2Medium => 3e-4,
                Preset::Gpt2Large => 2.5e-4,
                _ => 6e-4,
            },
            warmup: 700,
            val_every: 250,
            ckpt_every: 1000,
            weight_decay: 0.1,
            beta2: 0.95,
        },
        (ModelKind::Bert, Preset::Tiny) => Recipe {
            seq_len: 128,
            batch: 16,
            accum: 1,
            steps: 600,
            lr: 1e-3,
            warmup: 30,
            val_every: 50,
            ckpt_every: 100,
            weight_decay: 0.01,
            beta2: 0.999,
        },
        // BERT's phase-1 recipe: 256 sequences of 128, lr 1e-4, 10k warmup, wd 0.01.
        (ModelKind::Bert, _) => Recipe {
            seq_len: 128,
            batch: 32,
            accum: 8,
            steps: 900_000,
            lr: 1e-4,
            warmup: 10_000,
            val_every: 1000,
            ckpt_every: 5000,
            weight_decay: 0.01,
            beta2: 0.999,
        },
    }
}

fn fnv(tokens: &[u32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for t in tokens {
        h ^= *t as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Special ids masked LM needs.
#[derive(Debug, Clone)]
pub struct MlmIds {
    cls: u32,
    sep: u32,
    mask: u32,
    vocab: u32,
    /// Whether each id continues a word (`##` WordPiece pieces).
    continuation: Vec<bool>,
}

impl MlmIds {
    pub fn new(tok: &Tokenizer, vocab: usize) -> Result<Self> {
        let id = |t: &str| {
            tok.token_to_id(t).ok_or_else(|| {
                anyhow::anyhow!(
                    "the tokenizer has no {t} token; BERT needs a WordPiece tokenizer with [CLS] [SEP] [MASK] (the default, or `train tokenizer --kind wordpiece`)"
                )
            })
        };
        let mut continuation = vec![false; vocab];
        for (t, i) in tok.get_vocab(true) {
            if t.starts_with("##") && (i as usize) < vocab {
                continuation[i as usize] = true;
            }
        }
        Ok(Self {
            cls: id("[CLS]")?,
            sep: id("[SEP]")?,
            mask: id("[MASK]")?,
            vocab: tok.get_vocab_size(true) as u32,
            continuation,
        })
    }
}

/// Builds a masked-LM batch from windows of `seq_len - 2` content tokens: `[CLS] x [SEP]`; of the
/// content, `mask_prob` of tokens (or whole words) are predicted, 80% replaced by [MASK], 10% by
/// a random token, 10% kept (BERT). Deterministic in `rng_seed`.
pub fn mlm_batch(
    windows: &[&[u32]],
    ids: &MlmIds,
    mlm: MlmSettings,
    rng_seed: u64,
    dev: &Device,
) -> Result<Batch> {
    let mut rng = ChaCha8Rng::seed_from_u64(rng_seed);
    let t = windows[0].len() + 2;
    let mut inputs = Vec::with_capacity(windows.len() * t);
    let mut positions = Vec::new();
    let mut labels = Vec::new();
    for (row, w) in windows.iter().enumerate() {
        let base = inputs.len();
        inputs.push(ids.cls);
        inputs.extend_from_slice(w);
        inputs.push(ids.sep);
        // Word starts (a continuation piece joins the word before it).
        let mut chosen = vec![false; w.len()];
        let mut i = 0;
        while i < w.len() {
            let mut j = i + 1;
            if mlm.whole_word {
                while j < w.len() && ids.continuation[w[j] as usize] {
                    j += 1;
                }
            }
            if rng.random::<f64>() < mlm.mask_prob {
                chosen[i..j].iter_mut().for_each(|c| *c = true);
            }
            i = j;
        }
        if !chosen.iter().any(|&c| c) {
            chosen[rng.random_range(0..w.len())] = true;
        }
        for (k, &c) in chosen.iter().enumerate() {
            if !c {
                continue;
            }
            let p = base + 1 + k;
            positions.push(p as u32);
            labels.push(w[k]);
            let r: f64 = rng.random();
            if r < 0.8 {
                inputs[p] = ids.mask;
            } else if r < 0.9 {
                inputs[p] = rng.random_range(0..ids.vocab);
            }
        }
        debug_assert_eq!(inputs.len(), (row + 1) * t);
    }
    let b = windows.len();
    let n = positions.len();
    Ok(Batch::Masked {
        inputs: Tensor::from_vec(inputs, (b, t), dev)?,
        lengths: vec![t; b],
        positions: Tensor::from_vec(positions, n, dev)?,
        labels: Tensor::from_vec(labels, n, dev)?,
    })
}

/// A causal-LM batch from windows of `seq_len + 1` tokens.
pub fn causal_batch(windows: &[&[u32]], dev: &Device) -> Result<Batch> {
    let b = windows.len();
    let t = windows[0].len() - 1;
    let mut x = Vec::with_capacity(b * t);
    let mut y = Vec::with_capacity(b * t);
    for w in windows {
        x.extend_from_slice(&w[..t]);
        y.extend_from_slice(&w[1..]);
    }
    Ok(Batch::Causal {
        inputs: Tensor::from_vec(x, (b, t), dev)?,
        targets: Tensor::from_vec(y, (b, t), dev)?,
    })
}

/// Content tokens per window: BERT spends two positions on [CLS]/[SEP].
fn content_len(kind: ModelKind, seq_len: usize) -> usize {
    match kind {
        ModelKind::Gpt2 => seq_len,
        ModelKind::Bert => seq_len - 2,
    }
}

fn make_batch(
    windows: &[&[u32]],
    kind: ModelKind,
    mlm: Option<(&MlmIds, MlmSettings)>,
    seed: u64,
    dev: &Device,
) -> Result<Batch> {
    match (kind, mlm) {
        (ModelKind::Gpt2, _) => causal_batch(windows, dev),
        (ModelKind::Bert, Some((ids, s))) => {
            // Windows carry one extra token (the causal target); BERT does not need it.
            let trimmed: Vec<&[u32]> = windows.iter().map(|w| &w[..w.len() - 1]).collect();
            mlm_batch(&trimmed, ids, s, seed, dev)
        }
        (ModelKind::Bert, None) => bail!("internal: BERT without MLM settings"),
    }
}

/// Mean loss over fixed validation windows (eval mode; BERT masks from a fixed seed).
pub fn evaluate(
    net: &Net,
    windows: &[&[u32]],
    batch_size: usize,
    kind: ModelKind,
    mlm: Option<(&MlmIds, MlmSettings)>,
    seed: u64,
    dev: &Device,
) -> Result<f64> {
    let mut total = 0f64;
    let mut n = 0usize;
    for (i, chunk) in windows.chunks(batch_size).enumerate() {
        let batch = make_batch(chunk, kind, mlm, mix(seed ^ 0x5EED_F7A1, i as u64), dev)?;
        let loss = net.loss(&batch, false)?.to_scalar::<f32>()? as f64;
        total += loss * chunk.len() as f64;
        n += chunk.len();
    }
    Ok(total / n.max(1) as f64)
}

fn dtype_of(d: DTypeArg) -> DType {
    match d {
        DTypeArg::F32 => DType::F32,
        DTypeArg::Bf16 => DType::BF16,
        DTypeArg::F16 => DType::F16,
    }
}

fn fmt_secs(s: f64) -> String {
    if s < 90.0 {
        format!("{s:.0}s")
    } else {
        format!("{}m{:02}s", (s / 60.0) as u64, (s as u64) % 60)
    }
}

/// `train gpt2` / `train bert`.
pub fn run(kind: ModelKind, a: TrainArgs, mlm: Option<MlmSettings>) -> Result<()> {
    let t_setup = Instant::now();
    let dev = crate::device(a.device)?;
    let r = recipe(kind, a.preset);
    let name = match kind {
        ModelKind::Gpt2 => "gpt2",
        ModelKind::Bert => "bert",
    };
    let out = a.out.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "runs/{name}-{}-{}",
            format!("{:?}", a.preset).to_lowercase(),
            a.attn
        ))
    });
    metrics::ensure_writable_dir(&out)?;

    // Resume source, if any.
    let resume_dir = match (&a.resume_from, a.resume) {
        (Some(p), _) => Some(checkpoint::resolve(p)?),
        (None, true) => match checkpoint::latest(&out)? {
            Some(d) => Some(d),
            None => bail!(
                "--resume: {} has no checkpoint to resume; drop --resume to start a new run there",
                out.display()
            ),
        },
        (None, false) => None,
    };
    if resume_dir.is_none() {
        if let Some(d) = checkpoint::latest(&out)? {
            if a.overwrite {
                std::fs::remove_dir_all(out.join("checkpoints")).ok();
            } else {
                bail!(
                    "{} already holds a run (checkpoint {}); pass --resume to continue it, --overwrite to replace it, or another --out",
                    out.display(),
                    d.file_name().and_then(|n| n.to_str()).unwrap_or("?")
                )
            }
        }
    }

    // Tokenizer: --tokenizer, else the resumed checkpoint's, else the default for the model.
    let (tok, tok_desc) = match (&a.tokenizer, &resume_dir) {
        (Some(p), _) => (crate::tokenizer::from_file(p)?, p.display().to_string()),
        (None, Some(d)) if d.join("tokenizer.json").exists() => (
            crate::tokenizer::from_file(&d.join("tokenizer.json"))?,
            "checkpoint tokenizer.json".to_string(),
        ),
        (None, _) => match kind {
            ModelKind::Gpt2 => (crate::tokenizer::gpt2()?, "gpt2 (OpenAI BPE, 50257)".into()),
            ModelKind::Bert => (
                crate::tokenizer::bert_uncased()?,
                "bert-base-uncased (WordPiece, 30522)".into(),
            ),
        },
    };
    let tok_vocab = crate::tokenizer::vocab_size(&tok);
    let overrides = SizeOverrides {
        n_layer: a.n_layer,
        n_head: a.n_head,
        n_embd: a.n_embd,
        n_positions: a.n_positions,
        vocab_size: a.vocab_size,
        dropout: a.dropout,
    };
    let config = model::model_config(kind, a.preset, tok_vocab, &overrides)?;
    let dims = model::dims(&config)?;
    let seq_len = a.seq_len.unwrap_or(r.seq_len.min(dims.positions));
    if seq_len > dims.positions {
        bail!(
            "--seq-len {seq_len} exceeds the model's {} positions; lower --seq-len or raise --n-positions",
            dims.positions
        )
    }
    if seq_len < 4 {
        bail!("--seq-len {seq_len} is too short; use at least 4")
    }
    let batch_size = a.batch_size.unwrap_or(r.batch);
    let grad_accum = a.grad_accum.unwrap_or(r.accum);
    if batch_size == 0 || grad_accum == 0 {
        bail!("--batch-size and --grad-accum must be at least 1")
    }
    let tokens_per_step = (batch_size * grad_accum * seq_len) as u64;
    let steps = match (a.steps, a.tokens) {
        (Some(s), _) => s,
        (None, Some(t)) => t.div_ceil(tokens_per_step),
        (None, None) => r.steps,
    };
    if steps == 0 {
        bail!("--steps/--tokens gives 0 optimizer steps; ask for at least one step")
    }
    let warmup = a.warmup_steps.unwrap_or(r.warmup.min(steps / 10).max(1));

    // Data.
    let sources = data::read_sources(&a.data)?;
    let sep = match kind {
        ModelKind::Gpt2 => tok.token_to_id(crate::tokenizer::GPT2_EOT),
        ModelKind::Bert => tok.token_to_id("[SEP]"),
    };
    let tokens = data::tokenize_sources(&sources, &tok, sep, dims.vocab)?;
    let (train_tokens, val_tokens) = data::split(&tokens, content_len(kind, seq_len))?;
    let entropy = data::unigram_entropy(&tokens);
    let mlm_ids = match kind {
        ModelKind::Bert => Some(MlmIds::new(&tok, dims.vocab)?),
        ModelKind::Gpt2 => None,
    };
    let mlm_arg = mlm_ids.as_ref().zip(mlm);

    let adamw = AdamWConfig {
        beta1: a.beta1.unwrap_or(0.9),
        beta2: a.beta2.unwrap_or(r.beta2),
        eps: a.eps,
        weight_decay: a.weight_decay.unwrap_or(r.weight_decay),
    };
    let lr = a.lr.unwrap_or(r.lr);

    // Model and optimizer.
    let dtype = dtype_of(a.dtype);
    let varmap = VarMap::new();
    let net = Net::build(&config, &varmap, dtype, &dev, a.attn)?;
    optim::init_params(&varmap, a.seed, dims.layers, kind == ModelKind::Gpt2)?;
    let mut opt = AdamW::new(&varmap, adamw)?;
    let settings = RunSettings {
        model: kind,
        preset: a.preset,
        attn: a.attn.to_string(),
        config: config.clone(),
        tokenizer: tok_desc.clone(),
        data: sources
            .iter()
            .map(|s| match s {
                data::Source::Text(n, _) | data::Source::Tokens(n, _) => n.clone(),
            })
            .collect(),
        data_tokens: tokens.len(),
        data_hash: fnv(&tokens),
        seq_len,
        batch_size,
        grad_accum,
        steps,
        lr,
        warmup_steps: warmup,
        min_lr_ratio: a.min_lr_ratio,
        adamw,
        grad_clip: a.grad_clip,
        dtype: a.dtype,
        seed: a.seed,
        mlm,
        params: opt.num_params(),
        unigram_entropy: entropy,
    };

    let mut state = TrainState {
        format: checkpoint::FORMAT.into(),
        step: 0,
        tokens_seen: 0,
        data_pos: DataPos {
            epoch: 0,
            cursor: 0,
        },
        seed: a.seed,
        loss_scale: if a.dtype == DTypeArg::F16 {
            65536.0
        } else {
            1.0
        },
        elapsed_s: 0.0,
        settings: serde_json::to_value(&settings)?,
    };
    if let Some(dir) = &resume_dir {
        let ck = checkpoint::load(dir, &dev)?;
        let ck_vocab = model::dims(&ck.config)?.vocab;
        if ck_vocab < tok_vocab || (a.vocab_size.is_none() && ck_vocab != tok_vocab) {
            bail!(
                "the tokenizer ({tok_desc}) has {tok_vocab} tokens but the checkpoint's model has a vocabulary of {ck_vocab}; omit --tokenizer to use the checkpoint's own tokenizer.json"
            )
        }
        let diff = model::config_diff(&ck.config, &config);
        if !diff.is_empty() {
            bail!(
                "checkpoint {} is from a different model config ({}); resume with the same --preset and size flags, or start a new --out",
                dir.display(),
                diff.join(", ")
            )
        }
        let old: RunSettings = serde_json::from_value(ck.state.settings.clone())
            .context("reading the checkpoint's run settings")?;
        if old.data_hash != settings.data_hash {
            bail!(
                "the data differs from the checkpoint's run ({} tokens then, {} now); resume with the same --data and --tokenizer",
                old.data_tokens,
                settings.data_tokens
            )
        }
        for (what, then, now) in [
            ("--seq-len", old.seq_len, seq_len),
            ("--batch-size", old.batch_size, batch_size),
            ("--grad-accum", old.grad_accum, grad_accum),
        ] {
            if then != now {
                bail!(
                    "the checkpoint's run used {what} {then}, not {now}; resume with {what} {then}"
                )
            }
        }
        if old.seed != a.seed {
            bail!(
                "the checkpoint's run used --seed {}, not {}; resume with --seed {}",
                old.seed,
                a.seed,
                old.seed
            )
        }
        opt.load(&ck.params, &ck.optimizer, ck.state.step)?;
        if ck.params.len() != opt.num_tensors() {
            bail!(
                "checkpoint {} has {} tensors, the model {}; it is from a different model config, so start a new --out",
                dir.display(),
                ck.params.len(),
                opt.num_tensors()
            )
        }
        state.step = ck.state.step;
        state.tokens_seen = ck.state.tokens_seen;
        state.data_pos = ck.state.data_pos;
        state.loss_scale = ck.state.loss_scale;
        state.elapsed_s = ck.state.elapsed_s;
    }
    std::fs::write(
        out.join("run.json"),
        serde_json::to_string_pretty(&settings)?,
    )
    .with_context(|| format!("writing {}", out.join("run.json").display()))?;
    let metrics = Metrics::open(&out, resume_dir.as_ref().map(|_| state.step))?;

    let val_windows = data::val_windows(&val_tokens, content_len(kind, seq_len), a.val_tokens);
    let mut batches = Batches::new(
        &train_tokens,
        content_len(kind, seq_len),
        a.seed,
        state.data_pos,
    );
    let val_every = a.val_every.unwrap_or(r.val_every);
    let ckpt_every = a.ckpt_every.unwrap_or(r.ckpt_every);

    println!(
        "{name} {:?} | attn {} | {:.2}M params ({} layers, width {}, vocab {}) | {} on {:?}",
        a.preset,
        a.attn,
        settings.params as f64 / 1e6,
        dims.layers,
        dims.hidden,
        dims.vocab,
        format!("{:?}", a.dtype).to_lowercase(),
        dev.location()
    );
    println!(
        "data: {} | {} tokens ({} train, {} val) | tokenizer {tok_desc}",
        settings.data.join(", "),
        tokens.len(),
        train_tokens.len(),
        val_tokens.len()
    );
    println!(
        "unigram entropy of the corpus: {entropy:.3} nats/token (perplexity {:.0}): the loss of the best context-free model",
        entropy.exp()
    );
    println!(
        "{steps} steps x {tokens_per_step} tokens (batch {batch_size} x seq {seq_len} x accum {grad_accum}) | lr {lr:.1e}, warmup {warmup}, cosine to {:.1e} | AdamW b=({}, {}) wd {} | clip {} | out {}",
        lr * a.min_lr_ratio,
        adamw.beta1,
        adamw.beta2,
        adamw.weight_decay,
        a.grad_clip,
        out.display()
    );
    if let Some(d) = &resume_dir {
        println!("resumed from {} at step {}", d.display(), state.step);
    }

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst)).ok();
    }
    let test_delay = std::env::var("TRAIN_TEST_STEP_DELAY_MS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok());

    let pb = ProgressBar::new(steps);
    pb.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30.cyan/blue}] {pos}/{len} {msg} ETA {eta}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    pb.set_position(state.step);
    let say = |s: String| pb.suspend(|| println!("{s}"));

    let save = |state: &TrainState, opt: &AdamW| -> Result<PathBuf> {
        checkpoint::save(
            &out.join("checkpoints"),
            &opt.f32_params()?,
            &opt.state(),
            state,
            &config,
            &tok,
            a.keep_checkpoints,
        )
    };

    let run_start = Instant::now();
    let elapsed_before = state.elapsed_s;
    let mut last_val: Option<f64> = None;
    let mut first_val: Option<f64> = None;
    let mut tok_s_ema: Option<f64> = None;
    if resume_dir.is_none() {
        let v = evaluate(&net, &val_windows, batch_size, kind, mlm_arg, a.seed, &dev)?;
        first_val = Some(v);
        say(format!(
            "step {:>5} | val loss {v:.4} | ppl {:.1} (untrained)",
            0,
            v.exp()
        ));
        metrics.append(&json!({"kind": "val", "step": 0, "loss": v, "ppl": v.exp(), "tokens": 0, "elapsed_s": 0.0}))?;
    }
    let mut setup_printed = false;
    while state.step < steps {
        if !setup_printed {
            say(format!(
                "setup {:.1}s; training",
                t_setup.elapsed().as_secs_f64()
            ));
            setup_printed = true;
        }
        let t0 = Instant::now();
        let step_lr = optim::lr_at(state.step, lr, warmup, steps, a.min_lr_ratio);
        let mut acc = Grads::new();
        let mut loss_sum = 0f64;
        for micro in 0..grad_accum {
            let windows: Vec<&[u32]> = (0..batch_size).map(|_| batches.next_window()).collect();
            let counter = state.step * grad_accum as u64 + micro as u64;
            let batch = make_batch(&windows, kind, mlm_arg, mix(a.seed, counter), &dev)?;
            net.set_dropout_seed(mix(a.seed ^ 0xD0, counter));
            let loss = net.loss(&batch, true)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            let scaled = loss.affine(state.loss_scale / grad_accum as f64, 0.0)?;
            let grads = scaled.backward()?;
            opt.accumulate(&mut acc, &grads, state.loss_scale)?;
        }
        let loss = loss_sum / grad_accum as f64;
        let norm = AdamW::grad_norm(&acc)?;
        if !loss.is_finite() || !norm.is_finite() {
            if a.dtype == DTypeArg::F16 && state.loss_scale > 1.0 {
                state.loss_scale /= 2.0;
                say(format!(
                    "step {}: f16 gradients overflowed, loss scale -> {}",
                    state.step + 1,
                    state.loss_scale
                ));
                continue;
            }
            bail!(
                "the loss became {loss} (gradient norm {norm}) at step {}; lower --lr (now {lr:.1e}) or raise --warmup-steps, then --resume from the last checkpoint",
                state.step + 1
            )
        }
        let clip = if a.grad_clip > 0.0 && norm > a.grad_clip {
            a.grad_clip / (norm + 1e-6)
        } else {
            1.0
        };
        opt.step(&acc, step_lr, clip)?;
        state.step += 1;
        state.tokens_seen += tokens_per_step;
        state.data_pos = batches.pos();
        if let Some(ms) = test_delay {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        let dt = t0.elapsed().as_secs_f64();
        let tok_s = tokens_per_step as f64 / dt;
        let ema = tok_s_ema.map_or(tok_s, |e| 0.8 * e + 0.2 * tok_s);
        tok_s_ema = Some(ema);
        state.elapsed_s = elapsed_before + run_start.elapsed().as_secs_f64();
        pb.set_position(state.step);
        pb.set_message(format!(
            "loss {loss:.4} | {ema:.0} tok/s | lr {step_lr:.2e}{}",
            last_val.map_or(String::new(), |v| format!(" | val {v:.3}"))
        ));
        metrics.append(&json!({
            "kind": "train", "step": state.step, "loss": loss, "lr": step_lr,
            "grad_norm": norm, "tokens": state.tokens_seen, "tokens_per_s": tok_s,
            "step_s": dt, "elapsed_s": state.elapsed_s, "epoch": batches.epochs(),
        }))?;
        if pb.is_hidden() && (state.step.is_multiple_of(a.log_every.max(1)) || state.step == 1) {
            println!(
                "step {:>5}/{steps} | loss {loss:.4} | {tok_s:.0} tok/s | lr {step_lr:.2e} | norm {norm:.2} | {}",
                state.step,
                fmt_secs(state.elapsed_s)
            );
        }
        let time_up = a.time_limit.is_some_and(|t| state.elapsed_s >= t);
        let stopping = stop.load(Ordering::SeqCst);
        let last = state.step == steps || time_up || stopping;
        if (val_every > 0 && state.step.is_multiple_of(val_every)) || last {
            let v = evaluate(&net, &val_windows, batch_size, kind, mlm_arg, a.seed, &dev)?;
            last_val = Some(v);
            say(format!(
                "step {:>5} | val loss {v:.4} | ppl {:.1} | train loss {loss:.4} | {:.0} tok/s | {} elapsed{}",
                state.step,
                v.exp(),
                ema,
                fmt_secs(state.elapsed_s),
                if v < entropy { " | below unigram entropy" } else { "" }
            ));
            metrics.append(&json!({
                "kind": "val", "step": state.step, "loss": v, "ppl": v.exp(),
                "tokens": state.tokens_seen, "elapsed_s": state.elapsed_s,
            }))?;
        }
        if (ckpt_every > 0 && state.step.is_multiple_of(ckpt_every)) || last {
            let p = save(&state, &opt)?;
            if stopping {
                pb.finish_and_clear();
                return Err(Interrupted(format!(
                    "interrupted at step {}: checkpoint saved to {}; continue with the same command plus --resume",
                    state.step,
                    p.display()
                ))
                .into());
            }
        }
        if time_up {
            say(format!(
                "--time-limit {}s reached at step {}; checkpoint saved, continue with --resume",
                a.time_limit.unwrap_or_default(),
                state.step
            ));
            break;
        }
    }
    pb.finish_and_clear();
    if let Some(v) = last_val {
        println!(
            "done: step {} | {} tokens | {} | val loss {v:.4} (ppl {:.1}){} | unigram entropy {entropy:.3} | val loss {} the unigram entropy",
            state.step,
            state.tokens_seen,
            fmt_secs(state.elapsed_s),
            v.exp(),
            first_val.map_or(String::new(), |f| format!(", from {f:.3} untrained")),
            if v < entropy { "is below" } else { "is NOT below" }
        );
    } else {
        println!("nothing to do: the run is already at step {steps}");
    }
    match crate::plot::render_runs(std::slice::from_ref(&out), &out.join("loss.png")) {
        Ok(()) => println!(
            "metrics: {} | curve: {} | sample: train sample --checkpoint {}",
            Metrics::path(&out).display(),
            out.join("loss.png").display(),
            out.display()
        ),
        Err(e) => println!("(could not render loss.png: {e})"),
    }
    Ok(())
}

/// A checkpoint loaded for sampling or evaluation.
pub struct Loaded {
    pub net: Net,
    pub tokenizer: Tokenizer,
    pub config: serde_json::Value,
    pub dir: PathBuf,
    pub settings: Option<RunSettings>,
}

pub fn load_for_inference(
    path: &Path,
    tokenizer: Option<&Path>,
    dev: &Device,
    attn: AttentionKind,
) -> Result<Loaded> {
    let dir = checkpoint::resolve(path)?;
    let config = checkpoint::read_config(&dir)?;
    let dims = model::dims(&config)?;
    let tok_path = tokenizer
        .map(Path::to_path_buf)
        .unwrap_or_else(|| dir.join("tokenizer.json"));
    let tok = crate::tokenizer::from_file(&tok_path)?;
    let tv = crate::tokenizer::vocab_size(&tok);
    if tv > dims.vocab || dims.vocab - tv >= 128 {
        bail!(
            "tokenizer {} has {tv} tokens but the model's vocabulary has {}; pass the tokenizer the model was trained with ({})",
            tok_path.display(),
            dims.vocab,
            dir.join("tokenizer.json").display()
        )
    }
    let varmap = VarMap::new();
    let net = Net::build(&config, &varmap, DType::F32, dev, attn)?;
    let report = flash_ops_models::load_hf_safetensors(&varmap, dir.join("model.safetensors"))
        .map_err(|e| {
            anyhow::anyhow!(
                "checkpoint {} does not fit its config.json ({e}); the checkpoint is damaged or from a different config",
                dir.display()
            )
        })?;
    if !report.missing.is_empty() {
        bail!(
            "checkpoint {} lacks {} of the model's tensors (e.g. {}); it is from a different model config",
            dir.display(),
            report.missing.len(),
            report.missing[0]
        )
    }
    let settings = std::fs::read(dir.join("optimizer.safetensors"))
        .ok()
        .and_then(|b| {
            let (_, meta) = safetensors::SafeTensors::read_metadata(&b).ok()?;
            let st: TrainState =
                serde_json::from_str(meta.metadata().as_ref()?.get("train_state")?).ok()?;
            serde_json::from_value(st.settings).ok()
        });
    Ok(Loaded {
        net,
        tokenizer: tok,
        config,
        dir,
        settings,
    })
}

/// `train eval`.
pub fn run_eval(a: EvalArgs) -> Result<()> {
    let dev = crate::device(a.device)?;
    let loaded = load_for_inference(&a.checkpoint, a.tokenizer.as_deref(), &dev, a.attn)?;
    let kind = model::kind_of(&loaded.config)?;
    let dims = model::dims(&loaded.config)?;
    if a.seq_len > dims.positions {
        bail!(
            "--seq-len {} exceeds the model's {} positions; lower --seq-len",
            a.seq_len,
            dims.positions
        )
    }
    let sources = data::read_sources(&a.data)?;
    let sep = match kind {
        ModelKind::Gpt2 => loaded.tokenizer.token_to_id(crate::tokenizer::GPT2_EOT),
        ModelKind::Bert => loaded.tokenizer.token_to_id("[SEP]"),
    };
    let tokens = data::tokenize_sources(&sources, &loaded.tokenizer, sep, dims.vocab)?;
    let (_, val) = data::split(&tokens, content_len(kind, a.seq_len))?;
    let windows = data::val_windows(&val, content_len(kind, a.seq_len), a.max_tokens);
    let ids = match kind {
        ModelKind::Bert => Some(MlmIds::new(&loaded.tokenizer, dims.vocab)?),
        ModelKind::Gpt2 => None,
    };
    let mlm = loaded
        .settings
        .as_ref()
        .and_then(|s| s.mlm)
        .unwrap_or(MlmSettings {
            mask_prob: 0.15,
            whole_word: false,
        });
    let t0 = Instant::now();
    let loss = evaluate(
        &loaded.net,
        &windows,
        a.batch_size.max(1),
        kind,
        ids.as_ref().map(|i| (i, mlm)),
        a.seed,
        &dev,
    )?;
    let n: usize = windows.len() * content_len(kind, a.seq_len);
    println!(
        "{}: validation loss {loss:.4} nats/token, perplexity {:.2} ({} tokens of the validation split, seq {}, {:.1}s){}",
        loaded.dir.display(),
        loss.exp(),
        n,
        a.seq_len,
        t0.elapsed().as_secs_f64(),
        if kind == ModelKind::Bert { " [masked-LM loss]" } else { "" }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mlm_masking_statistics() {
        let tok = crate::tokenizer::bert_uncased().unwrap();
        let ids = MlmIds::new(&tok, 30522).unwrap();
        let text = &crate::data::DEFAULT_CORPUS[..100_000];
        let t = crate::tokenizer::encode_text(&tok, text).unwrap();
        let windows: Vec<&[u32]> = t.chunks_exact(126).take(100).collect();
        let s = MlmSettings {
            mask_prob: 0.15,
            whole_word: false,
        };
        let Batch::Masked {
            inputs,
            positions,
            labels,
            ..
        } = mlm_batch(&windows, &ids, s, 3, &Device::Cpu).unwrap()
        else {
            panic!()
        };
        let inputs = inputs.flatten_all().unwrap().to_vec1::<u32>().unwrap();
        let pos = positions.to_vec1::<u32>().unwrap();
        let lab = labels.to_vec1::<u32>().unwrap();
        let frac = pos.len() as f64 / (100.0 * 126.0);
        assert!((frac - 0.15).abs() < 0.02, "{frac}");
        let masked = pos
            .iter()
            .filter(|&&p| inputs[p as usize] == ids.mask)
            .count() as f64;
        let kept = pos
            .iter()
            .zip(&lab)
            .filter(|(&p, &l)| inputs[p as usize] == l)
            .count() as f64;
        let n = pos.len() as f64;
        assert!((masked / n - 0.8).abs() < 0.04, "{}", masked / n);
        assert!(kept / n > 0.06 && kept / n < 0.16, "{}", kept / n);
        assert_eq!(inputs[0], ids.cls);
        assert_eq!(inputs[127], ids.sep);
        // Whole-word masking selects every piece of a word together.
        let ww = MlmSettings {
            mask_prob: 0.15,
            whole_word: true,
        };
        let Batch::Masked { positions, .. } =
            mlm_batch(&windows, &ids, ww, 3, &Device::Cpu).unwrap()
        else {
            panic!()
        };
        let chosen: std::collections::HashSet<u32> =
            positions.to_vec1::<u32>().unwrap().into_iter().collect();
        for (row, w) in windows.iter().enumerate() {
            for k in 1..w.len() {
                if ids.continuation[w[k] as usize] {
                    let p = (row * 128 + 1 + k) as u32;
                    assert_eq!(chosen.contains(&p), chosen.contains(&(p - 1)));
                }
            }
        }
    }
}
