//! What every training loop (`train gpt2`/`bert`, `train bert-classify`) does around its
//! forward and backward: the micro-batch backward into the summed gradients, the optimizer step
//! with clipping, the f16 loss-scale back-off and the bookkeeping, and the end of a step:
//! validation and checkpoint on their schedules and before stopping, Ctrl-C and `--time-limit`.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Result;
use candle_core::Tensor;

use crate::checkpoint::TrainState;
use crate::data::DataPos;
use crate::optim::{AdamW, Grads};
use crate::progress::{Progress, StepReport};
use crate::recipe::Hyper;
use crate::trainer::{back_off_loss_scale, clip_scale, Interrupted};
use crate::TrainArgs;

/// Training seconds: this session's plus those of the sessions before a resume.
pub struct Clock {
    start: Instant,
    before: f64,
}

impl Clock {
    pub fn start(state: &TrainState) -> Self {
        Self {
            start: Instant::now(),
            before: state.elapsed_s,
        }
    }

    fn now(&self) -> f64 {
        self.before + self.start.elapsed().as_secs_f64()
    }
}

/// Runs Candle's own parallel elementwise ops on the calling thread, unless `CANDLE_NUM_THREADS`
/// is set. Candle 0.11 gives them a pool of its own (threads − 1 workers besides rayon's), whose
/// caller spin-waits for its workers: on 2 cores, next to rayon's 2 threads (GEMMs, the fused
/// ops, attention), the workers were often descheduled and that spin took ~11% of a tiny step's
/// CPU time (`perf`, `BarrierGuard::drop`) for ~1% of work. The step's large elementwise passes
/// are the fused ones, parallel on rayon. Call first in `main`, before any thread starts.
pub fn candle_elementwise_on_caller() {
    const VAR: &str = "CANDLE_NUM_THREADS";
    if std::env::var_os(VAR).is_none() {
        std::env::set_var(VAR, "1");
    }
}

/// Adds one micro-batch's backward to `grads` (the loss times `loss_scale / grad_accum`,
/// divided back by `loss_scale`); returns the loss.
pub fn backward_into(
    opt: &AdamW,
    grads: &mut Grads,
    loss: &Tensor,
    state: &TrainState,
    grad_accum: usize,
) -> Result<f64> {
    let scaled = loss.affine(state.loss_scale / grad_accum as f64, 0.0)?;
    opt.accumulate(grads, &scaled.backward()?, state.loss_scale)?;
    Ok(loss.to_scalar::<f32>()? as f64)
}

/// One step's forward and backward, done.
pub struct Done {
    pub loss: f64,
    pub grads: Grads,
    /// Tokens the step trained on.
    pub tokens: u64,
    /// The data position after it, and the epochs done.
    pub pos: DataPos,
    pub epochs: f64,
    pub started: Instant,
}

/// Applies a step's gradients (clipped) at the scheduled learning rate, advances `state` and
/// reports it. `Ok(false)`: the loss or the gradient norm was not finite and, under f16, the
/// loss scale was halved: redo the step from `state.data_pos`.
pub fn apply(
    opt: &mut AdamW,
    d: &Done,
    hp: &Hyper,
    a: &TrainArgs,
    state: &mut TrainState,
    clock: &Clock,
    progress: &mut Progress,
) -> Result<bool> {
    let norm = AdamW::grad_norm(&d.grads)?;
    if !d.loss.is_finite() || !norm.is_finite() {
        back_off_loss_scale(state, a.dtype, (d.loss, norm), hp.lr, progress)?;
        return Ok(false);
    }
    let lr = hp.lr_at(state.step);
    opt.step(&d.grads, lr, clip_scale(norm, a.grad_clip))?;
    state.step += 1;
    state.tokens_seen += d.tokens;
    state.data_pos = d.pos;
    state.elapsed_s = clock.now();
    let report = StepReport {
        loss: d.loss,
        lr,
        grad_norm: norm,
        secs: d.started.elapsed().as_secs_f64(),
        epochs: d.epochs,
    };
    progress.step(&report, state)?;
    Ok(true)
}

/// What the end of a step does.
pub struct StepEnd {
    pub validate: bool,
    pub checkpoint: bool,
    interrupted: bool,
    time_up: bool,
}

impl StepEnd {
    /// Validation and checkpoint on their schedules, and both before the run stops (its last
    /// step, `--time-limit`, Ctrl-C).
    pub fn at(hp: &Hyper, state: &TrainState, time_limit: Option<f64>, stop: &AtomicBool) -> Self {
        let time_up = time_limit.is_some_and(|t| state.elapsed_s >= t);
        let interrupted = stop.load(Ordering::SeqCst);
        let last = state.step == hp.steps || time_up || interrupted;
        Self {
            validate: hp.validates_at(state.step) || last,
            checkpoint: hp.checkpoints_at(state.step) || last,
            interrupted,
            time_up,
        }
    }

    /// After the step's checkpoint (`saved`): Ctrl-C ends the run with [`Interrupted`];
    /// `Ok(true)` when `--time-limit` stops it.
    pub fn stops(
        &self,
        saved: Option<&Path>,
        state: &TrainState,
        time_limit: Option<f64>,
        progress: &Progress,
    ) -> Result<bool> {
        if let (true, Some(dir)) = (self.interrupted, saved) {
            progress.clear();
            return Err(Interrupted(format!(
                "interrupted at step {}: checkpoint saved to {}; continue with the same command plus --resume",
                state.step,
                dir.display()
            ))
            .into());
        }
        if self.time_up {
            progress.say(format!(
                "--time-limit {}s reached at step {}; checkpoint saved, continue with --resume",
                time_limit.unwrap_or_default(),
                state.step
            ));
        }
        Ok(self.time_up)
    }
}
