//! `train bert-classify`: fine-tune `BertForSequenceClassification` (from `--init-from` or from
//! scratch) on labelled text. Examples are `[CLS] text [SEP]` cut to `--max-len`, batched
//! right-padded with their lengths as the attention's key lengths (no `N×N` mask), and the run
//! has the checkpoints, `--resume`, metrics and loss plot of pretraining; each validation reports
//! accuracy and macro-F1, and the best model so far is kept in `OUT/best/`. `--task listops`
//! trains on our Long Range Arena ListOps generator ([`crate::listops`]) instead of `--data`,
//! and scores the final model on its test split (`OUT/test.json`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use clap::Args;
use flash_ops_models::{rng, BertConfig, BertForSequenceClassification, BertInput};
use serde_json::json;
use tokenizers::Tokenizer;

use crate::checkpoint::{self, TrainState};
use crate::data::Order;
use crate::labelled::{self, Columns, Example};
use crate::listops;
use crate::metrics::{self, Metrics};
use crate::model::{self, ModelKind};
use crate::optim::{self, AdamW, Grads};
use crate::progress::Progress;
use crate::recipe::{self, Hyper, Schedule};
use crate::stepping::{self, backward_into, Clock, Done, StepEnd};
use crate::trainer;
use crate::TrainArgs;

const ARCH: &str = "BertForSequenceClassification";
/// Salts the dropout seeds apart from the data order.
const DROPOUT_SALT: u64 = 0xD0;

#[derive(Args, Debug, Clone)]
pub struct ClassifyArgs {
    /// Training flags; --data takes labelled data: .jsonl ({"text": …, "label": …}), .csv/.tsv
    /// with a header row, or a folder with one subfolder of text files per label.
    #[command(flatten)]
    pub train: TrainArgs,
    /// Validation data in the same formats (default: hold out --val-fraction of --data).
    #[arg(long)]
    pub validation: Option<PathBuf>,
    /// Fraction of each label's examples held out for validation when there is no --validation.
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
    /// Tokens per example, [CLS] and [SEP] included; longer texts are truncated (default 128).
    #[arg(long)]
    pub max_len: Option<usize>,
    #[command(flatten)]
    pub columns: Columns,
    /// Attention for validation and test scoring (default --attn): the same function, so a slow
    /// training kind need not score slowly (the ListOps comparison scores every run with flash2).
    #[arg(long, value_parser = crate::parse_attn)]
    pub eval_attn: Option<flash_ops_models::AttentionKind>,
    /// `listops`: Long Range Arena ListOps from our generator instead of --data.
    #[arg(long, value_enum, default_value = "text")]
    pub task: Task,
    #[command(flatten)]
    pub listops: ListopsArgs,
}

/// The ListOps splits' sizes and shape (`--task listops`).
#[derive(Args, Debug, Clone)]
pub struct ListopsArgs {
    /// ListOps: train, validation and test examples.
    #[arg(long, value_delimiter = ',', default_value = "2000,200,500")]
    pub listops_examples: Vec<usize>,
    /// ListOps: the fewest tokens per expression (default a quarter of the most, as LRA's 500
    /// of 2000).
    #[arg(long)]
    pub listops_min_tokens: Option<usize>,
    /// ListOps: the most tokens per expression (default --max-len − 2, for [CLS] and [SEP]).
    #[arg(long)]
    pub listops_max_tokens: Option<usize>,
    /// ListOps: the deepest nesting (LRA: 10).
    #[arg(long, default_value_t = 10)]
    pub listops_max_depth: usize,
    /// ListOps: the most arguments per operator (LRA: 10).
    #[arg(long, default_value_t = 10)]
    pub listops_max_args: usize,
}

impl ListopsArgs {
    /// The splits for a run of `--max-len max_len`, as labelled examples.
    fn examples(
        &self,
        t: &TrainArgs,
        max_len: Option<usize>,
        validation: bool,
    ) -> Result<(Vec<Example>, Vec<Example>, Vec<Example>)> {
        if !t.data.is_empty() || validation || t.tokenizer.is_some() || t.init_from.is_some() {
            bail!("--task listops draws its own data and vocabulary; drop --data, --validation, --tokenizer and --init-from")
        }
        let Some(max_len) = max_len else {
            bail!("--task listops needs --max-len (tokens per example, e.g. 1024 or 2048)")
        };
        let mut spec = listops::Spec::for_positions(max_len);
        spec.max_tokens = self.listops_max_tokens.unwrap_or(spec.max_tokens);
        spec.min_tokens = self.listops_min_tokens.unwrap_or(spec.max_tokens / 4);
        (spec.max_depth, spec.max_args) = (self.listops_max_depth, self.listops_max_args);
        if spec.max_tokens + 2 > max_len {
            bail!(
                "--listops-max-tokens {} does not fit --max-len {max_len} with [CLS] and [SEP]; lower it to {}",
                spec.max_tokens,
                max_len.saturating_sub(2)
            )
        }
        let sizes: [usize; 3] = match self.listops_examples[..] {
            [a, b, c] if a > 0 && b > 0 && c > 0 => [a, b, c],
            _ => bail!(
                "--listops-examples {:?}: give three positive counts, TRAIN,VALIDATION,TEST (e.g. 2000,200,500)",
                self.listops_examples
            ),
        };
        let s = listops::splits(&spec, sizes, t.seed)?;
        let named = |xs: Vec<listops::Example>, split: &str| -> Vec<Example> {
            xs.into_iter()
                .enumerate()
                .map(|(i, e)| Example {
                    label: e.label.to_string(),
                    text: e.text,
                    origin: format!("listops {split} example {i}"),
                })
                .collect()
        };
        Ok((
            named(s.train, "train"),
            named(s.validation, "validation"),
            named(s.test, "test"),
        ))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Task {
    /// Labelled text from --data (and --validation).
    Text,
    /// ListOps (LRA): train/validation/test splits drawn by --seed.
    Listops,
}

/// Everything that defines a classification run; `OUT/run.json` and in every checkpoint.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClassifySettings {
    /// `"sequence-classification"`: tells these settings from pretraining's.
    pub task: String,
    pub attn: String,
    /// `config.json` (a `BertForSequenceClassification`'s, with `id2label`).
    pub config: serde_json::Value,
    pub tokenizer: String,
    /// The label names by class index.
    pub labels: Vec<String>,
    pub data: Vec<String>,
    pub validation: Option<String>,
    pub train_examples: usize,
    pub val_examples: usize,
    /// FNV-1a of every example's ids and label: resuming needs the same examples.
    pub data_hash: u64,
    /// Tokens per example, [CLS] and [SEP] included.
    pub max_len: usize,
    #[serde(flatten)]
    pub schedule: Schedule,
    pub params: usize,
    /// Entropy of the training labels (nats): the loss of a classifier that ignores the text,
    /// under the name `train plot` draws as the reference line.
    pub unigram_entropy: f64,
    pub init_from: Option<String>,
}

/// An example as token ids (`[CLS] … [SEP]`) and its label index.
struct Encoded {
    ids: Vec<u32>,
    label: u32,
}

/// Validation results.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct Scores {
    loss: f64,
    accuracy: f64,
    macro_f1: f64,
}

pub fn run(a: ClassifyArgs) -> Result<()> {
    let t_setup = Instant::now();
    let t = &a.train;
    recipe::check_numbers(t)?;
    recipe::check_range("--val-fraction", Some(a.val_fraction), 0.0, 1.0, false)?;
    if t.seq_len.is_some() {
        bail!("--seq-len does not apply to bert-classify; use --max-len (tokens per example)")
    }
    if a.max_len.is_some_and(|m| m < 4) {
        bail!(
            "--max-len {} is too short; use at least 4",
            a.max_len.unwrap_or(0)
        )
    }
    let dev = crate::device(t.device)?;
    let out = t
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("runs/bert-classify-{}", t.attn)));
    let st = trainer::start(ModelKind::Bert, &out, t)?;
    let (resume_dir, init) = (st.resume_dir, st.init);
    let (tok, tok_desc) = match a.task {
        Task::Text => (st.tok, st.tok_desc),
        Task::Listops => (listops::tokenizer()?, "listops (word level, 19)".into()),
    };
    let tok_vocab = crate::tokenizer::vocab_size(&tok);

    // Data and labels.
    let (train_ex, val_ex, test_ex) = match a.task {
        Task::Text => {
            let (train, val) = text_examples(&a)?;
            (train, val, Vec::new())
        }
        Task::Listops => a.listops.examples(t, a.max_len, a.validation.is_some())?,
    };
    let labels = match a.task {
        Task::Text => {
            let own = init.as_ref().and_then(|h| classifier_labels(&h.config));
            labelled::label_set(own, &train_ex, &val_ex)?
        }
        // All ten answers, whether or not a small training split has each.
        Task::Listops => listops::DIGITS.map(String::from).to_vec(),
    };

    // Model config: the directory's or the preset's, with the label set.
    let mut overrides = trainer::size_overrides(t);
    if a.task == Task::Listops {
        // Each model sized to its sequence length, as LRA's.
        overrides.n_positions = overrides.n_positions.or(a.max_len);
    }
    let base = match &init {
        Some(h) => h.run_config(ModelKind::Bert, ARCH, tok_vocab, &overrides)?,
        None => model::model_config(ModelKind::Bert, t.size.preset, tok_vocab, &overrides)?,
    };
    let cfg = with_labels(serde_json::from_value(base)?, &labels);
    let config = hf_config(&cfg, &labels);
    let max_len = a.max_len.unwrap_or(128.min(cfg.max_position_embeddings));
    if max_len > cfg.max_position_embeddings {
        bail!(
            "--max-len {max_len} exceeds the model's {} positions; lower --max-len",
            cfg.max_position_embeddings
        )
    }
    let mut args = t.clone();
    args.seq_len = Some(max_len);
    let hp = Hyper::resolve_classify(
        &args,
        cfg.max_position_embeddings,
        train_ex.len(),
        init.is_some(),
    )?;

    let train = encode(&train_ex, &labels, &tok, max_len, cfg.vocab_size)?;
    let val = encode(&val_ex, &labels, &tok, max_len, cfg.vocab_size)?;
    let test = encode(&test_ex, &labels, &tok, max_len, cfg.vocab_size)?;
    let data_hash = rng::fnv1a(train.iter().chain(&val).flat_map(|e| {
        e.ids
            .iter()
            .map(|&i| u64::from(i))
            .chain([u64::from(e.label) << 32])
    }));

    // Model and optimizer.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, t.dtype.dtype(), &dev);
    let mut net = BertForSequenceClassification::new(&cfg, vb, t.attn)?;
    optim::init_params(&varmap, t.seed, cfg.num_hidden_layers, false)?;
    let init_line = match (&init, &resume_dir) {
        // A pretrained encoder gets a new head (the pooler too when the source had none).
        (Some(h), None) => Some(h.load_weights(&varmap, |n| {
            n.starts_with("classifier.") || n.starts_with("bert.pooler.")
        })?),
        _ => None,
    };
    let mut opt = AdamW::new(&varmap, hp.adamw)?;
    let settings = ClassifySettings {
        task: "sequence-classification".into(),
        attn: t.attn.to_string(),
        config: config.clone(),
        tokenizer: tok_desc,
        labels: labels.clone(),
        data: match a.task {
            Task::Text => t.data.iter().map(|p| p.display().to_string()).collect(),
            Task::Listops => vec![format!("ListOps generator (seed {})", t.seed)],
        },
        validation: a.validation.as_ref().map(|p| p.display().to_string()),
        train_examples: train.len(),
        val_examples: val.len(),
        data_hash,
        max_len,
        schedule: Schedule::of(&hp, &args),
        params: opt.num_params(),
        unigram_entropy: label_entropy(&train, labels.len()),
        init_from: t.init_from.as_ref().map(|p| p.display().to_string()),
    };
    let mut state = TrainState::fresh(serde_json::to_value(&settings)?, t.seed, t.dtype);
    if let Some(dir) = &resume_dir {
        resume(dir, &dev, &settings, &mut opt, &mut state)?;
    }
    // Only now, with every input checked, does the run write anything.
    metrics::ensure_writable_dir(&out)?;
    let run_json = out.join("run.json");
    std::fs::write(&run_json, serde_json::to_string_pretty(&settings)?)
        .with_context(|| format!("writing {}", run_json.display()))?;
    let keep = resume_dir.as_ref().map(|_| state.step);
    let metrics = Metrics::open(&out, keep)?;
    // A second handle on the same file for the accuracy records (re-opening keeps what is there).
    let scores_log = Metrics::open(&out, Some(state.step))?;
    describe(&settings, &cfg, &out);
    if let Some(l) = &init_line {
        println!("{l}");
    }
    if let Some(d) = &resume_dir {
        println!("resumed from {} at step {}", d.display(), state.step);
    }
    let mean_len = train.iter().map(|e| e.ids.len()).sum::<usize>() as f64 / train.len() as f64;
    let per_step = (hp.batch_size * hp.grad_accum) as u64;
    let mut progress = Progress::new(
        metrics,
        &state,
        hp.steps,
        (mean_len * per_step as f64) as u64,
        t.log_every,
        settings.unigram_entropy,
    );

    // Train.
    let pad = cfg.pad_token_id;
    let best_dir = out.join("best");
    let mut best = read_best(&best_dir).filter(|_| resume_dir.is_some());
    // Scored with --eval-attn (the same function as --attn, so the same scores up to rounding).
    let eval_attn = a.eval_attn.unwrap_or(t.attn);
    let score = |net: &mut BertForSequenceClassification, xs: &[Encoded]| {
        net.set_attention(eval_attn);
        let s = scores(net, xs, hp.batch_size, pad, labels.len(), &dev);
        net.set_attention(t.attn);
        s
    };
    let report =
        |s: &Scores, state: &TrainState, best: &mut Option<Scores>, opt: &AdamW| -> Result<()> {
            let better = best.is_none_or(|b| (s.accuracy, s.macro_f1) > (b.accuracy, b.macro_f1));
            progress_line(s, state.step, better);
            scores_log.append(&json!({
                "kind": "val_classify", "step": state.step, "loss": s.loss, "accuracy": s.accuracy,
                "macro_f1": s.macro_f1, "tokens": state.tokens_seen, "elapsed_s": state.elapsed_s,
            }))?;
            if better {
                *best = Some(*s);
                let meta = json!({"step": state.step, "scores": s});
                checkpoint::save_model_dir(
                    &best_dir,
                    &opt.f32_params()?,
                    &config,
                    &tok,
                    &[("best.json", serde_json::to_string_pretty(&meta)?)],
                )?;
            }
            Ok(())
        };
    let save = |state: &TrainState, opt: &AdamW| {
        checkpoint::save_run(&out, opt, state, &config, &tok, t.keep_checkpoints)
    };
    let mut order = Order::new(train.len(), t.seed, state.data_pos);
    let stop = trainer::ctrl_c_flag();
    let clock = Clock::start(&state);
    if resume_dir.is_none() {
        let s = score(&mut net, &val)?;
        progress.untrained(s.loss)?;
        report(&s, &state, &mut best, &opt)?;
    }
    if state.step < hp.steps {
        progress.say(format!(
            "setup {:.1}s; training",
            t_setup.elapsed().as_secs_f64()
        ));
    }
    while state.step < hp.steps {
        let started = Instant::now();
        let mut grads = Grads::new();
        let (mut loss_sum, mut tokens) = (0f64, 0u64);
        for micro in 0..hp.grad_accum {
            let batch: Vec<&Encoded> = (0..hp.batch_size)
                .map(|_| &train[order.next_index()])
                .collect();
            tokens += batch.iter().map(|e| e.ids.len() as u64).sum::<u64>();
            let n = state.step * hp.grad_accum as u64 + micro as u64;
            net.set_dropout_seed(rng::derive(state.seed ^ DROPOUT_SALT, n));
            let (logits, labels) = forward(&net, &batch, pad, &dev, true)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
            loss_sum += backward_into(&opt, &mut grads, &loss, &state, hp.grad_accum)?;
        }
        let done = Done {
            loss: loss_sum / hp.grad_accum as f64,
            grads,
            tokens,
            pos: order.pos(),
            epochs: order.epochs(),
            started,
        };
        if !stepping::apply(&mut opt, &done, &hp, t, &mut state, &clock, &mut progress)? {
            // The f16 loss scale backed off: the same examples again.
            order = Order::new(train.len(), t.seed, state.data_pos);
            continue;
        }
        let end = StepEnd::at(&hp, &state, t.time_limit, &stop);
        if end.validate {
            let s = score(&mut net, &val)?;
            progress.val(s.loss, done.loss, &state)?;
            report(&s, &state, &mut best, &opt)?;
        }
        let saved = end.checkpoint.then(|| save(&state, &opt)).transpose()?;
        if end.stops(saved.as_deref(), &state, t.time_limit, &progress)? {
            break;
        }
    }
    progress.finish(&state, &out);
    if !test.is_empty() {
        let s = score(&mut net, &test)?;
        write_test(&out, &s, test.len(), &state)?;
    }
    if let Some(b) = best {
        println!(
            "best: accuracy {:.4}, macro-F1 {:.4} -> {} (a Hugging Face {ARCH} directory; also --init-from)",
            b.accuracy,
            b.macro_f1,
            best_dir.display()
        );
    }
    Ok(())
}

/// `--data` and `--validation` (or a held-out fraction of `--data`): `(train, validation)`.
fn text_examples(a: &ClassifyArgs) -> Result<(Vec<Example>, Vec<Example>)> {
    let (t, cols) = (&a.train, &a.columns);
    let all = labelled::read(&t.data, cols, "--data")?;
    match &a.validation {
        Some(v) => Ok((
            all,
            labelled::read(std::slice::from_ref(v), cols, "--validation")?,
        )),
        None => labelled::split(all, a.val_fraction, t.seed),
    }
}

/// `OUT/test.json`: the final model's scores on the test split, with the steps, tokens and
/// wall-clock seconds of the run (validation included: the time `--time-limit` counts).
fn write_test(out: &Path, s: &Scores, examples: usize, state: &TrainState) -> Result<()> {
    println!(
        "test: accuracy {:.4}, macro-F1 {:.4} on {examples} examples | {} steps, {} tokens in {:.1}s ({:.0} tok/s wall clock)",
        s.accuracy,
        s.macro_f1,
        state.step,
        state.tokens_seen,
        state.elapsed_s,
        state.tokens_seen as f64 / state.elapsed_s.max(1e-9)
    );
    let v = json!({
        "scores": s, "examples": examples, "step": state.step, "tokens": state.tokens_seen,
        "elapsed_s": state.elapsed_s,
        "tokens_per_s": state.tokens_seen as f64 / state.elapsed_s.max(1e-9),
    });
    let path = out.join("test.json");
    std::fs::write(&path, serde_json::to_string_pretty(&v)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

/// The labels of a classifier's config (`id2label` in index order); none for other heads,
/// whose `id2label` is only Hugging Face's placeholder.
fn classifier_labels(config: &serde_json::Value) -> Option<Vec<String>> {
    if config["architectures"][0].as_str() != Some(ARCH) {
        return None;
    }
    let map = config["id2label"].as_object()?;
    (0..map.len())
        .map(|i| map.get(&i.to_string())?.as_str().map(str::to_string))
        .collect()
}

fn with_labels(cfg: BertConfig, labels: &[String]) -> BertConfig {
    BertConfig {
        id2label: Some(
            labels
                .iter()
                .enumerate()
                .map(|(i, l)| (i.to_string(), l.clone()))
                .collect(),
        ),
        ..cfg
    }
}

/// `config.json` for `transformers`: the classifier architecture, `label2id` and the problem type.
fn hf_config(cfg: &BertConfig, labels: &[String]) -> serde_json::Value {
    let mut v = cfg.to_hf_json(ARCH);
    v["label2id"] = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.clone(), json!(i)))
        .collect();
    v["problem_type"] = "single_label_classification".into();
    v
}

/// `[CLS] text [SEP]` of at most `max_len` tokens, with the label's index.
fn encode(
    examples: &[Example],
    labels: &[String],
    tok: &Tokenizer,
    max_len: usize,
    vocab: usize,
) -> Result<Vec<Encoded>> {
    let special = |t: &str| {
        tok.token_to_id(t).ok_or_else(|| {
            anyhow::anyhow!("the tokenizer has no {t} token; bert-classify needs a BERT WordPiece tokenizer (the default, or the model's tokenizer.json)")
        })
    };
    let (cls, sep) = (special("[CLS]")?, special("[SEP]")?);
    // A token spans at least one byte, and 64 per token is far beyond real text: tokenizing more
    // of a long document would only be cut off.
    let texts: Vec<&str> = examples
        .iter()
        .map(|e| prefix(&e.text, 64 * max_len))
        .collect();
    let encs = tok
        .encode_batch(texts, false)
        .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
    examples
        .iter()
        .zip(encs)
        .map(|(e, enc)| {
            let body = enc.get_ids();
            let mut ids = Vec::with_capacity(max_len);
            ids.push(cls);
            ids.extend_from_slice(&body[..body.len().min(max_len - 2)]);
            ids.push(sep);
            if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
                bail!("{}: token id {bad} is outside the model's vocabulary of {vocab}; use the model's own tokenizer", e.origin)
            }
            let label = labels.iter().position(|l| *l == e.label).expect("label_set checked every label") as u32;
            Ok(Encoded { ids, label })
        })
        .collect()
}

/// The longest prefix of `s` of at most `n` bytes that ends on a character boundary.
fn prefix(s: &str, n: usize) -> &str {
    let mut end = n.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// f32 class logits `(b, labels)` of a batch, right-padded with its lengths as the attention's
/// key lengths, and its labels `(b)`.
fn forward(
    net: &BertForSequenceClassification,
    batch: &[&Encoded],
    pad: u32,
    dev: &Device,
    train: bool,
) -> Result<(Tensor, Tensor)> {
    let t = batch.iter().map(|e| e.ids.len()).max().unwrap_or(1);
    let lengths: Vec<usize> = batch.iter().map(|e| e.ids.len()).collect();
    let mut ids = Vec::with_capacity(batch.len() * t);
    for e in batch {
        ids.extend_from_slice(&e.ids);
        ids.extend(std::iter::repeat_n(pad, t - e.ids.len()));
    }
    let ids = Tensor::from_vec(ids, (batch.len(), t), dev)?;
    let labels = Tensor::new(batch.iter().map(|e| e.label).collect::<Vec<u32>>(), dev)?;
    let logits = net
        .forward(BertInput::new(&ids, &lengths), train)?
        .to_dtype(DType::F32)?;
    Ok((logits, labels))
}

/// Loss, accuracy and macro-F1 (the mean over labels of F1, labels absent from both the
/// predictions and the references left out) on `val`, batched by length to pad little.
fn scores(
    net: &BertForSequenceClassification,
    val: &[Encoded],
    batch_size: usize,
    pad: u32,
    n_labels: usize,
    dev: &Device,
) -> Result<Scores> {
    let mut by_len: Vec<&Encoded> = val.iter().collect();
    by_len.sort_by_key(|e| e.ids.len());
    let (mut loss, mut correct) = (0f64, 0usize);
    // Per label: true positives, false positives, false negatives.
    let mut counts = vec![[0usize; 3]; n_labels];
    for chunk in by_len.chunks(batch_size.max(1)) {
        let (logits, labels) = forward(net, chunk, pad, dev, false)?;
        loss += candle_nn::loss::cross_entropy(&logits, &labels)?.to_scalar::<f32>()? as f64
            * chunk.len() as f64;
        let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        for (p, e) in pred.into_iter().zip(chunk) {
            if p == e.label {
                correct += 1;
                counts[p as usize][0] += 1;
            } else {
                counts[p as usize][1] += 1;
                counts[e.label as usize][2] += 1;
            }
        }
    }
    let f1: Vec<f64> = counts
        .iter()
        .filter(|[tp, fp, fne]| tp + fp + fne > 0)
        .map(|[tp, fp, fne]| 2.0 * *tp as f64 / (2 * tp + fp + fne) as f64)
        .collect();
    let n = val.len().max(1) as f64;
    Ok(Scores {
        loss: loss / n,
        accuracy: correct as f64 / n,
        macro_f1: f1.iter().sum::<f64>() / f1.len().max(1) as f64,
    })
}

fn label_entropy(train: &[Encoded], n_labels: usize) -> f64 {
    let mut counts = vec![0usize; n_labels];
    train.iter().for_each(|e| counts[e.label as usize] += 1);
    let n = train.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| -(c as f64 / n) * (c as f64 / n).ln())
        .sum()
}

fn progress_line(s: &Scores, step: u64, best: bool) {
    println!(
        "step {step:>5} | val accuracy {:.4} | macro-F1 {:.4}{}",
        s.accuracy,
        s.macro_f1,
        if best { " | best so far, saved" } else { "" }
    );
}

/// The scores of the best model so far (`OUT/best/best.json`), when resuming.
fn read_best(dir: &Path) -> Option<Scores> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("best.json")).ok()?).ok()?;
    serde_json::from_value(v["scores"].clone()).ok()
}

/// Restores the optimizer and state from checkpoint `dir` after checking it is this run's.
fn resume(
    dir: &Path,
    dev: &Device,
    now: &ClassifySettings,
    opt: &mut AdamW,
    state: &mut TrainState,
) -> Result<()> {
    let ck = checkpoint::load(dir, dev)?;
    let then: ClassifySettings = serde_json::from_value(ck.state.settings.clone()).map_err(|_| {
        anyhow::anyhow!("checkpoint {} is not from a bert-classify run; resume it with the command that wrote it", dir.display())
    })?;
    checkpoint::check_config(dir, &then.config, &now.config, "the same flags")?;
    if then.data_hash != now.data_hash {
        bail!(
            "the data differs from the checkpoint's run ({} + {} examples then, {} + {} now); resume with the same --data, --validation, --max-len and --tokenizer",
            then.train_examples,
            then.val_examples,
            now.train_examples,
            now.val_examples
        )
    }
    checkpoint::check_same(&then.schedule, &now.schedule, &[])?;
    ck.restore(dir, opt, state)?;
    Ok(())
}

fn describe(s: &ClassifySettings, cfg: &BertConfig, out: &Path) {
    println!(
        "bert-classify | attn {} | {:.2}M params ({} layers, width {}) | {} on {} labels [{}]",
        s.attn,
        s.params as f64 / 1e6,
        cfg.num_hidden_layers,
        cfg.hidden_size,
        format!("{:?}", s.schedule.dtype).to_lowercase(),
        s.labels.len(),
        s.labels.join(", ")
    );
    println!(
        "data: {} | {} train, {} validation examples{} | max {} tokens | tokenizer {}",
        s.data.join(", "),
        s.train_examples,
        s.val_examples,
        s.validation
            .as_ref()
            .map_or(String::new(), |v| format!(" (from {v})")),
        s.max_len,
        s.tokenizer
    );
    println!(
        "label entropy {:.3} nats: the loss of a classifier that ignores the text",
        s.unigram_entropy
    );
    println!("{} | out {}", s.schedule.banner(None), out.display());
}
