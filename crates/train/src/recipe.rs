//! Presets → hyper-parameters: each preset's training recipe, and the numbers a run uses once the
//! command line has overridden it.

use anyhow::{bail, Result};

use crate::model::{ModelKind, Preset};
use crate::optim::{self, AdamWConfig};
use crate::{DTypeArg, TrainArgs};

/// Training defaults of a preset.
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

/// The optimisation settings a run records (`run.json` and every checkpoint).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Schedule {
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
}

impl Schedule {
    pub fn of(hp: &Hyper, a: &TrainArgs) -> Self {
        Self {
            batch_size: hp.batch_size,
            grad_accum: hp.grad_accum,
            steps: hp.steps,
            lr: hp.lr,
            warmup_steps: hp.warmup,
            min_lr_ratio: hp.min_lr_ratio,
            adamw: hp.adamw,
            grad_clip: a.grad_clip,
            dtype: a.dtype,
            seed: a.seed,
        }
    }

    /// The banner's recipe line; a step is `batch x seq x accum` tokens, or `batch x accum`
    /// examples without `seq_len`.
    pub fn banner(&self, seq_len: Option<usize>) -> String {
        let (per_step, seq, unit) = match seq_len {
            Some(t) => (
                self.batch_size * self.grad_accum * t,
                format!(" x seq {t}"),
                "tokens",
            ),
            None => (self.batch_size * self.grad_accum, String::new(), "examples"),
        };
        format!(
            "{} steps x {per_step} {unit} (batch {}{seq} x accum {}) | lr {:.1e}, warmup {}, cosine to {:.1e} | AdamW b=({}, {}) wd {} | clip {}",
            self.steps,
            self.batch_size,
            self.grad_accum,
            self.lr,
            self.warmup_steps,
            self.lr * self.min_lr_ratio,
            self.adamw.beta1,
            self.adamw.beta2,
            self.adamw.weight_decay,
            self.grad_clip,
        )
    }
}

/// The hyper-parameters of a run.
#[derive(Debug, Clone)]
pub struct Hyper {
    pub seq_len: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub steps: u64,
    /// Peak learning rate.
    pub lr: f64,
    pub warmup: u64,
    pub min_lr_ratio: f64,
    pub adamw: AdamWConfig,
    /// Validation every N steps (0 = only at the end).
    pub val_every: u64,
    /// Checkpoint every N steps (0 = only at the end).
    pub ckpt_every: u64,
}

impl Hyper {
    /// The preset's recipe with the command line's overrides, for a model of `positions`
    /// learned positions.
    pub fn resolve(kind: ModelKind, a: &TrainArgs, positions: usize) -> Result<Self> {
        Self::from_recipe(recipe(kind, a.size.preset), a, positions)
    }

    /// `train bert-classify` on `examples` training examples: BERT's fine-tuning recipe (Devlin
    /// et al. 2019, §4 and A.3: batch 32, lr 5e-5, 3 epochs, 10% warmup) for a pretrained
    /// start, the preset's pretraining learning rate from scratch; validation and a checkpoint
    /// twice per epoch.
    pub fn resolve_classify(
        a: &TrainArgs,
        positions: usize,
        examples: usize,
        pretrained: bool,
    ) -> Result<Self> {
        let base = recipe(ModelKind::Bert, a.size.preset);
        let per_step = a.batch_size.unwrap_or(32) * a.grad_accum.unwrap_or(1);
        let epoch = examples.div_ceil(per_step.max(1)).max(1) as u64;
        let twice = epoch.div_ceil(2);
        let r = Recipe {
            seq_len: 128,
            batch: 32,
            accum: 1,
            steps: 3 * epoch,
            lr: if pretrained { 5e-5 } else { base.lr },
            warmup: u64::MAX,
            val_every: twice,
            ckpt_every: twice,
            weight_decay: 0.01,
            beta2: 0.999,
        };
        Self::from_recipe(r, a, positions)
    }

    fn from_recipe(r: Recipe, a: &TrainArgs, positions: usize) -> Result<Self> {
        let seq_len = a.seq_len.unwrap_or(r.seq_len.min(positions));
        if seq_len > positions {
            bail!(
                "--seq-len {seq_len} exceeds the model's {positions} positions; lower --seq-len or raise --n-positions"
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
        Ok(Self {
            seq_len,
            batch_size,
            grad_accum,
            steps,
            lr: a.lr.unwrap_or(r.lr),
            warmup: a.warmup_steps.unwrap_or(r.warmup.min(steps / 10).max(1)),
            min_lr_ratio: a.min_lr_ratio,
            adamw: AdamWConfig {
                beta1: a.beta1.unwrap_or(0.9),
                beta2: a.beta2.unwrap_or(r.beta2),
                eps: a.eps,
                weight_decay: a.weight_decay.unwrap_or(r.weight_decay),
            },
            val_every: a.val_every.unwrap_or(r.val_every),
            ckpt_every: a.ckpt_every.unwrap_or(r.ckpt_every),
        })
    }

    pub fn tokens_per_step(&self) -> u64 {
        (self.batch_size * self.grad_accum * self.seq_len) as u64
    }

    /// The learning rate of step `step` (from 0): warmup, then cosine decay.
    pub fn lr_at(&self, step: u64) -> f64 {
        optim::lr_at(step, self.lr, self.warmup, self.steps, self.min_lr_ratio)
    }

    /// Whether the end of `step` (from 1) validates / checkpoints on the schedule.
    pub fn validates_at(&self, step: u64) -> bool {
        self.val_every > 0 && step.is_multiple_of(self.val_every)
    }

    pub fn checkpoints_at(&self, step: u64) -> bool {
        self.ckpt_every > 0 && step.is_multiple_of(self.ckpt_every)
    }
}

/// `value` of `flag` is finite and in `[lo, hi)` (`[lo, hi]` with `hi_inclusive`).
pub fn check_range(
    flag: &str,
    value: Option<f64>,
    lo: f64,
    hi: f64,
    hi_inclusive: bool,
) -> Result<()> {
    let Some(v) = value else { return Ok(()) };
    let ok = v.is_finite() && v >= lo && (v < hi || hi_inclusive && v <= hi);
    if !ok {
        let close = if hi_inclusive { ']' } else { ')' };
        bail!("{flag} {v} is out of range; pass a number in [{lo}, {hi}{close}")
    }
    Ok(())
}

/// `value` of `flag` is a positive finite number.
fn check_positive(flag: &str, value: Option<f64>, example: &str) -> Result<()> {
    match value {
        Some(v) if !(v.is_finite() && v > 0.0) => {
            bail!("{flag} {v} must be a positive finite number (e.g. {flag} {example})")
        }
        _ => Ok(()),
    }
}

/// Every numeric option of a training command, before any work starts (a negative or NaN
/// learning rate would otherwise train, or fail steps later).
pub fn check_numbers(a: &TrainArgs) -> Result<()> {
    check_positive("--lr", a.lr, "1e-4")?;
    check_positive("--eps", Some(a.eps), "1e-8")?;
    check_positive("--time-limit", a.time_limit, "600")?;
    check_range("--dropout", a.dropout.map(f64::from), 0.0, 1.0, false)?;
    check_range("--min-lr-ratio", Some(a.min_lr_ratio), 0.0, 1.0, true)?;
    check_range("--beta1", a.beta1, 0.0, 1.0, false)?;
    check_range("--beta2", a.beta2, 0.0, 1.0, false)?;
    for (flag, v) in [
        ("--weight-decay", a.weight_decay),
        ("--grad-clip", Some(a.grad_clip)),
    ] {
        if v.is_some_and(|v| !(v.is_finite() && v >= 0.0)) {
            bail!(
                "{flag} {} must be a finite number >= 0",
                v.unwrap_or_default()
            )
        }
    }
    for (flag, v) in [
        ("--n-layer", a.size.n_layer),
        ("--n-head", a.size.n_head),
        ("--n-embd", a.size.n_embd),
        ("--n-positions", a.n_positions),
        ("--vocab-size", a.vocab_size),
        ("--seq-len", a.seq_len),
        ("--batch-size", a.batch_size),
        ("--grad-accum", a.grad_accum),
    ] {
        if v == Some(0) {
            bail!("{flag} 0 is not allowed; pass at least 1")
        }
    }
    Ok(())
}
