//! `train gpt2` / `train bert`: the setup of a run, then its training loop, which reads like
//! llm.c's `train_gpt2.c`: for each step the micro-batches' forward and backward, clipping, the
//! learning rate, the AdamW update, then the log, validation and checkpoint on their schedules.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use candle_nn::VarMap;
use flash_ops_models::rng;
use tokenizers::Tokenizer;

use crate::batching::{content_len, document_separator, Batcher};
use crate::checkpoint::{self, TrainState};
use crate::data::{self, Batches};
use crate::evaluation::evaluate;
use crate::hf::HfDir;
use crate::masking::MlmSettings;
use crate::metrics::{self, Metrics};
use crate::model::{self, Dims, ModelKind, Net, Preset, SizeOverrides};
use crate::optim::{self, AdamW, Grads};
use crate::progress::Progress;
use crate::recipe::{Hyper, Schedule};
use crate::stepping::{self, backward_into, Clock, Done, StepEnd};
use crate::{DTypeArg, TrainArgs};

/// Returned when Ctrl-C stopped the run (after its checkpoint was written); exit code 130.
#[derive(Debug)]
pub struct Interrupted(pub String);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Interrupted {}

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
    #[serde(flatten)]
    pub schedule: Schedule,
    pub mlm: Option<MlmSettings>,
    pub params: usize,
    pub unigram_entropy: f64,
    /// The Hugging Face directory the weights started from (`--init-from`).
    #[serde(default)]
    pub init_from: Option<String>,
}

/// Salts the dropout seeds of a micro-batch apart from its masking seed.
const DROPOUT_SALT: u64 = 0xD0;

/// `train gpt2` / `train bert`.
pub fn run(kind: ModelKind, a: TrainArgs, mlm: Option<MlmSettings>) -> Result<()> {
    flash_ops_bench::reuse_freed_memory();
    let t_setup = Instant::now();
    let Setup {
        out,
        resumed,
        tok,
        config,
        hp,
        tokens,
        batcher,
        net,
        mut opt,
        mut state,
        mut progress,
    } = setup(kind, &a, mlm)?;
    let content = content_len(kind, hp.seq_len);
    let val_windows = data::val_windows(&tokens.val, content, a.val_tokens);
    let mut batches = Batches::new(&tokens.train, content, a.seed, state.data_pos);
    let stop = ctrl_c_flag();
    let save = |state: &TrainState, opt: &AdamW| {
        checkpoint::save_run(&out, opt, state, &config, &tok, a.keep_checkpoints)
    };
    let validate = || evaluate(&net, &val_windows, hp.batch_size, &batcher, a.seed);

    // Train.
    let clock = Clock::start(&state);
    if !resumed {
        progress.untrained(validate()?)?;
    }
    if state.step < hp.steps {
        let setup_s = t_setup.elapsed().as_secs_f64();
        progress.say(format!("setup {setup_s:.1}s; training"));
    }
    while state.step < hp.steps {
        let started = Instant::now();
        let (loss, grads) = forward_backward(&net, &opt, &batcher, &mut batches, &hp, &state)?;
        let done = Done {
            loss,
            grads,
            tokens: hp.tokens_per_step(),
            pos: batches.pos(),
            epochs: batches.epochs(),
            started,
        };
        if !stepping::apply(&mut opt, &done, &hp, &a, &mut state, &clock, &mut progress)? {
            continue;
        }
        let end = StepEnd::at(&hp, &state, a.time_limit, &stop);
        if end.validate {
            progress.val(validate()?, loss, &state)?;
        }
        let saved = end.checkpoint.then(|| save(&state, &opt)).transpose()?;
        if end.stops(saved.as_deref(), &state, a.time_limit, &progress)? {
            break;
        }
    }
    progress.finish(&state, &out);
    Ok(())
}

/// A run ready for its first step.
struct Setup {
    out: PathBuf,
    /// Whether the state and optimizer come from a checkpoint.
    resumed: bool,
    tok: Tokenizer,
    config: serde_json::Value,
    hp: Hyper,
    tokens: Split,
    batcher: Batcher,
    net: Net,
    opt: AdamW,
    state: TrainState,
    progress: Progress,
}

/// The token stream, split.
struct Split {
    train: Vec<u32>,
    val: Vec<u32>,
}

/// Everything before the first step: the output folder and resume source, tokenizer, model
/// config and hyper-parameters, data, model and optimizer (restored when resuming), `run.json`,
/// the metrics file and the banner.
fn setup(kind: ModelKind, a: &TrainArgs, mlm: Option<MlmSettings>) -> Result<Setup> {
    let dev = crate::device(a.device)?;
    let out = a.out.clone().unwrap_or_else(|| default_out(kind, a));
    let Start {
        resume_dir,
        init,
        tok,
        tok_desc,
    } = start(kind, &out, a)?;
    let tok_vocab = crate::tokenizer::vocab_size(&tok);
    let config = match &init {
        Some(h) => h.run_config(kind, "BertForMaskedLM", tok_vocab, &size_overrides(a))?,
        None => model::model_config(kind, a.size.preset, tok_vocab, &size_overrides(a))?,
    };
    let dims = model::dims(&config)?;
    let hp = Hyper::resolve(kind, a, dims.positions)?;

    // Data: one token stream, split into train and validation.
    let sources = data::read_sources(&a.data)?;
    let sep = document_separator(kind, &tok);
    let tokens = data::tokenize_sources(&sources, &tok, sep, dims.vocab)?;
    let (train, val) = data::split(&tokens, content_len(kind, hp.seq_len))?;
    let entropy = data::unigram_entropy(&tokens);
    let batcher = Batcher::new(kind, &tok, dims.vocab, mlm, &dev)?;

    // Model and optimizer, from the seed or from the checkpoint resumed.
    let varmap = VarMap::new();
    let net = Net::build(&config, &varmap, a.dtype.dtype(), &dev, a.attn)?;
    optim::init_params(&varmap, a.seed, dims.layers, kind == ModelKind::Gpt2)?;
    let init_line = match (&init, &resume_dir) {
        (Some(h), None) => Some(h.load_weights(&varmap, |_| false)?),
        _ => None,
    };
    let mut opt = AdamW::new(&varmap, hp.adamw)?;
    let settings = RunSettings {
        model: kind,
        preset: a.size.preset,
        attn: a.attn.to_string(),
        config: config.clone(),
        tokenizer: tok_desc,
        data: sources
            .iter()
            .map(|s| match s {
                data::Source::Text(n, _) | data::Source::Tokens(n, _) => n.clone(),
            })
            .collect(),
        data_tokens: tokens.len(),
        data_hash: rng::fnv1a(tokens.iter().map(|&t| u64::from(t))),
        seq_len: hp.seq_len,
        schedule: Schedule::of(&hp, a),
        mlm,
        params: opt.num_params(),
        unigram_entropy: entropy,
        init_from: a.init_from.as_ref().map(|p| p.display().to_string()),
    };
    let mut state = TrainState::fresh(serde_json::to_value(&settings)?, a.seed, a.dtype);
    if let Some(dir) = &resume_dir {
        let vocab_flag = a.vocab_size.is_some();
        resume(
            dir, &dev, &settings, vocab_flag, tok_vocab, &mut opt, &mut state,
        )?;
    }
    // Only now, with every input checked, does the run write anything.
    metrics::ensure_writable_dir(&out)?;
    let run_json = out.join("run.json");
    std::fs::write(&run_json, serde_json::to_string_pretty(&settings)?)
        .with_context(|| format!("writing {}", run_json.display()))?;
    let metrics = Metrics::open(&out, resume_dir.as_ref().map(|_| state.step))?;
    describe(&settings, &dims, &dev, (train.len(), val.len()), &out);
    if let Some(l) = init_line {
        println!("{l}");
    }
    if let Some(d) = &resume_dir {
        println!("resumed from {} at step {}", d.display(), state.step);
    }
    let progress = Progress::new(
        metrics,
        &state,
        hp.steps,
        hp.tokens_per_step(),
        a.log_every,
        entropy,
    );
    Ok(Setup {
        out,
        resumed: resume_dir.is_some(),
        tok,
        config,
        hp,
        tokens: Split { train, val },
        batcher,
        net,
        opt,
        state,
        progress,
    })
}

/// One step's `grad_accum` micro-batches, forward and backward: their mean loss and summed
/// gradients (each backward of the loss times `loss_scale / grad_accum`, divided back by
/// `loss_scale`).
fn forward_backward(
    net: &Net,
    opt: &AdamW,
    batcher: &Batcher,
    batches: &mut Batches,
    hp: &Hyper,
    state: &TrainState,
) -> Result<(f64, Grads)> {
    let mut grads = Grads::new();
    let mut loss_sum = 0f64;
    for micro in 0..hp.grad_accum {
        let windows: Vec<&[u32]> = (0..hp.batch_size).map(|_| batches.next_window()).collect();
        // Masking and dropout are functions of (seed, micro-batch number): a resumed run
        // draws them again exactly.
        let n = state.step * hp.grad_accum as u64 + micro as u64;
        let batch = batcher.batch(&windows, rng::derive(state.seed, n))?;
        net.set_dropout_seed(rng::derive(state.seed ^ DROPOUT_SALT, n));
        loss_sum += backward_into(
            opt,
            &mut grads,
            &net.loss(&batch, true)?,
            state,
            hp.grad_accum,
        )?;
    }
    Ok((loss_sum / hp.grad_accum as f64, grads))
}

/// The factor that clips the global gradient norm to `max_norm` (0 = no clipping).
pub(crate) fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// A non-finite loss or gradient norm: under f16 the loss scale is halved and the step redone;
/// otherwise the run has diverged.
pub fn back_off_loss_scale(
    state: &mut TrainState,
    dtype: DTypeArg,
    (loss, norm): (f64, f64),
    lr: f64,
    progress: &Progress,
) -> Result<()> {
    if dtype == DTypeArg::F16 && state.loss_scale > 1.0 {
        state.loss_scale /= 2.0;
        progress.say(format!(
            "step {}: f16 gradients overflowed, loss scale -> {}",
            state.step + 1,
            state.loss_scale
        ));
        return Ok(());
    }
    bail!(
        "the loss became {loss} (gradient norm {norm}) at step {}; lower --lr (now {lr:.1e}) or raise --warmup-steps, then --resume from the last checkpoint",
        state.step + 1
    )
}

/// Set by Ctrl-C: the loop ends its step, validates, checkpoints and stops.
pub fn ctrl_c_flag() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst)).ok();
    stop
}

/// `runs/{model}-{preset}-{attn}`.
fn default_out(kind: ModelKind, a: &TrainArgs) -> PathBuf {
    let name = match kind {
        ModelKind::Gpt2 => "gpt2",
        ModelKind::Bert => "bert",
    };
    let preset = format!("{:?}", a.size.preset).to_lowercase();
    PathBuf::from(format!("runs/{name}-{preset}-{}", a.attn))
}

/// The checkpoint to resume (`--resume-from`, or `--resume`: the latest in `out`); refuses to
/// start over a run without `--overwrite`.
fn resume_source(out: &Path, a: &TrainArgs) -> Result<Option<PathBuf>> {
    let resume_dir = match (&a.resume_from, a.resume) {
        (Some(p), _) => Some(checkpoint::resolve(p)?),
        (None, true) => match checkpoint::latest(out)? {
            Some(d) => Some(d),
            None => bail!(
                "--resume: {} has no checkpoint to resume; drop --resume to start a new run there",
                out.display()
            ),
        },
        (None, false) => None,
    };
    if resume_dir.is_none() {
        if let Some(d) = checkpoint::latest(out)? {
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
    Ok(resume_dir)
}

/// Where a run starts: the checkpoint it resumes, the model directory it starts from
/// (`--init-from`), and its tokenizer (with a description).
pub struct Start {
    pub resume_dir: Option<PathBuf>,
    pub init: Option<HfDir>,
    pub tok: Tokenizer,
    pub tok_desc: String,
}

pub fn start(kind: ModelKind, out: &Path, a: &TrainArgs) -> Result<Start> {
    let resume_dir = resume_source(out, a)?;
    let init = a
        .init_from
        .as_deref()
        .map(|d| HfDir::open(d, "--init-from"))
        .transpose()?;
    let tok_dir = resume_dir
        .as_deref()
        .or(init.as_ref().map(|h| h.dir.as_path()));
    let (tok, tok_desc) = pick_tokenizer(kind, a.tokenizer.as_deref(), tok_dir)?;
    Ok(Start {
        resume_dir,
        init,
        tok,
        tok_desc,
    })
}

/// The tokenizer and its description: `--tokenizer`, else the `tokenizer.json` of `dir` (the
/// checkpoint resumed or the model directory started from), else the model's default.
pub fn pick_tokenizer(
    kind: ModelKind,
    flag: Option<&Path>,
    dir: Option<&Path>,
) -> Result<(Tokenizer, String)> {
    Ok(match (flag, dir) {
        (Some(p), _) => (crate::tokenizer::from_file(p)?, p.display().to_string()),
        (None, Some(d)) if d.join("tokenizer.json").exists() => (
            crate::tokenizer::from_file(&d.join("tokenizer.json"))?,
            d.join("tokenizer.json").display().to_string(),
        ),
        (None, _) => match kind {
            ModelKind::Gpt2 => (crate::tokenizer::gpt2()?, "gpt2 (OpenAI BPE, 50257)".into()),
            ModelKind::Bert => (
                crate::tokenizer::bert_uncased()?,
                "bert-base-uncased (WordPiece, 30522)".into(),
            ),
        },
    })
}

pub fn size_overrides(a: &TrainArgs) -> SizeOverrides {
    SizeOverrides {
        n_layer: a.size.n_layer,
        n_head: a.size.n_head,
        n_embd: a.size.n_embd,
        n_positions: a.n_positions,
        vocab_size: a.vocab_size,
        dropout: a.dropout,
        sparsity: a.sparsity,
    }
}

/// Restores the optimizer and the state from checkpoint `dir`, after checking that it is this
/// run's: the same model config, data, batch shape and seed. `vocab_flag`: `--vocab-size` was
/// given (the model's vocabulary may then exceed the tokenizer's `tok_vocab`).
fn resume(
    dir: &Path,
    dev: &Device,
    settings: &RunSettings,
    vocab_flag: bool,
    tok_vocab: usize,
    opt: &mut AdamW,
    state: &mut TrainState,
) -> Result<()> {
    let ck = checkpoint::load(dir, dev)?;
    let ck_vocab = model::dims(&ck.config)?.vocab;
    if ck_vocab < tok_vocab || (!vocab_flag && ck_vocab != tok_vocab) {
        bail!(
            "the tokenizer ({}) has {tok_vocab} tokens but the checkpoint's model has a vocabulary of {ck_vocab}; omit --tokenizer to use the checkpoint's own tokenizer.json",
            settings.tokenizer
        )
    }
    checkpoint::check_config(
        dir,
        &ck.config,
        &settings.config,
        "the same --preset and size flags",
    )?;
    let old: RunSettings = serde_json::from_value(ck.state.settings.clone())
        .context("reading the checkpoint's run settings")?;
    if old.data_hash != settings.data_hash {
        bail!(
            "the data differs from the checkpoint's run ({} tokens then, {} now); resume with the same --data and --tokenizer",
            old.data_tokens,
            settings.data_tokens
        )
    }
    checkpoint::check_same(
        &old.schedule,
        &settings.schedule,
        &[("--seq-len", old.seq_len as u64, settings.seq_len as u64)],
    )?;
    ck.restore(dir, opt, state)?;
    Ok(())
}

/// The run's banner: model, data, the entropy to beat, the recipe.
fn describe(s: &RunSettings, dims: &Dims, dev: &Device, (train, val): (usize, usize), out: &Path) {
    let name = match s.model {
        ModelKind::Gpt2 => "gpt2",
        ModelKind::Bert => "bert",
    };
    println!(
        "{name} {:?} | attn {} | {:.2}M params ({} layers, width {}, vocab {}) | {} on {:?}",
        s.preset,
        s.attn,
        s.params as f64 / 1e6,
        dims.layers,
        dims.hidden,
        dims.vocab,
        format!("{:?}", s.schedule.dtype).to_lowercase(),
        dev.location()
    );
    println!(
        "data: {} | {} tokens ({train} train, {val} val) | tokenizer {}",
        s.data.join(", "),
        s.data_tokens,
        s.tokenizer
    );
    println!(
        "unigram entropy of the corpus: {:.3} nats/token (perplexity {:.0}): the loss of the best context-free model",
        s.unigram_entropy,
        s.unigram_entropy.exp()
    );
    println!(
        "{} | out {}",
        s.schedule.banner(Some(s.seq_len)),
        out.display()
    );
}
