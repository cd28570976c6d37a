//! Presets → hyper-parameters: each preset's training recipe, and the numbers a run uses once the
//! command line has overridden it.

use anyhow::{bail, Result};

use crate::model::{ModelKind, Preset};
use crate::optim::{self, AdamWConfig};
use crate::TrainArgs;

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
        let r = recipe(kind, a.size.preset);
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
