//! What a training run reports as it goes: the progress bar, the console lines and the records of
//! `OUT/metrics.jsonl`.

use std::path::Path;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::checkpoint::TrainState;
use crate::metrics::Metrics;

/// One optimizer step, as reported.
pub struct StepReport {
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Wall time of the step, seconds.
    pub secs: f64,
    pub epochs: f64,
}

pub struct Progress {
    pb: ProgressBar,
    metrics: Metrics,
    steps: u64,
    tokens_per_step: u64,
    log_every: u64,
    /// The unigram entropy the validation loss is compared with.
    entropy: f64,
    tok_s_ema: Option<f64>,
    first_val: Option<f64>,
    last_val: Option<f64>,
}

fn fmt_secs(s: f64) -> String {
    if s < 90.0 {
        format!("{s:.0}s")
    } else {
        format!("{}m{:02}s", (s / 60.0) as u64, (s as u64) % 60)
    }
}

impl Progress {
    pub fn new(
        metrics: Metrics,
        state: &TrainState,
        steps: u64,
        tokens_per_step: u64,
        log_every: u64,
        entropy: f64,
    ) -> Self {
        let pb = ProgressBar::new(steps);
        pb.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30.cyan/blue}] {pos}/{len} {msg} ETA {eta}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        pb.set_position(state.step);
        Self {
            pb,
            metrics,
            steps,
            tokens_per_step,
            log_every,
            entropy,
            tok_s_ema: None,
            first_val: None,
            last_val: None,
        }
    }

    /// A console line that does not tear the progress bar.
    pub fn say(&self, s: String) {
        self.pb.suspend(|| println!("{s}"))
    }

    /// The validation loss before the first step.
    pub fn untrained(&mut self, v: f64) -> Result<()> {
        self.first_val = Some(v);
        self.say(format!(
            "step {:>5} | val loss {v:.4} | ppl {:.1} (untrained)",
            0,
            v.exp()
        ));
        self.metrics.append(&json!({"kind": "val", "step": 0, "loss": v, "ppl": v.exp(), "tokens": 0, "elapsed_s": 0.0}))
    }

    pub fn step(&mut self, s: &StepReport, state: &TrainState) -> Result<()> {
        let StepReport {
            loss,
            lr,
            grad_norm,
            secs,
            epochs,
        } = *s;
        let tok_s = self.tokens_per_step as f64 / secs;
        let ema = self.tok_s_ema.map_or(tok_s, |e| 0.8 * e + 0.2 * tok_s);
        self.tok_s_ema = Some(ema);
        self.pb.set_position(state.step);
        self.pb.set_message(format!(
            "loss {loss:.4} | {ema:.0} tok/s | lr {lr:.2e}{}",
            self.last_val
                .map_or(String::new(), |v| format!(" | val {v:.3}"))
        ));
        self.metrics.append(&json!({
            "kind": "train", "step": state.step, "loss": loss, "lr": lr,
            "grad_norm": grad_norm, "tokens": state.tokens_seen, "tokens_per_s": tok_s,
            "step_s": secs, "elapsed_s": state.elapsed_s, "epoch": epochs,
        }))?;
        if self.pb.is_hidden()
            && (state.step.is_multiple_of(self.log_every.max(1)) || state.step == 1)
        {
            println!(
                "step {:>5}/{} | loss {loss:.4} | {tok_s:.0} tok/s | lr {lr:.2e} | norm {grad_norm:.2} | {}",
                state.step,
                self.steps,
                fmt_secs(state.elapsed_s)
            );
        }
        Ok(())
    }

    /// The validation loss `v` at the end of a step whose training loss was `train_loss`.
    pub fn val(&mut self, v: f64, train_loss: f64, state: &TrainState) -> Result<()> {
        self.last_val = Some(v);
        self.say(format!(
            "step {:>5} | val loss {v:.4} | ppl {:.1} | train loss {train_loss:.4} | {:.0} tok/s | {} elapsed{}",
            state.step,
            v.exp(),
            self.tok_s_ema.unwrap_or_default(),
            fmt_secs(state.elapsed_s),
            if v < self.entropy { " | below unigram entropy" } else { "" }
        ));
        self.metrics.append(&json!({
            "kind": "val", "step": state.step, "loss": v, "ppl": v.exp(),
            "tokens": state.tokens_seen, "elapsed_s": state.elapsed_s,
        }))
    }

    /// Clears the progress bar (before an early return).
    pub fn clear(&self) {
        self.pb.finish_and_clear();
    }

    /// The closing summary and the loss curve `OUT/loss.png`.
    pub fn finish(&self, state: &TrainState, out: &Path) {
        self.clear();
        let entropy = self.entropy;
        if let Some(v) = self.last_val {
            println!(
                "done: step {} | {} tokens | {} | val loss {v:.4} (ppl {:.1}){} | unigram entropy {entropy:.3} | val loss {} the unigram entropy",
                state.step,
                state.tokens_seen,
                fmt_secs(state.elapsed_s),
                v.exp(),
                self.first_val
                    .map_or(String::new(), |f| format!(", from {f:.3} untrained")),
                if v < entropy { "is below" } else { "is NOT below" }
            );
        } else {
            println!("nothing to do: the run is already at step {}", self.steps);
        }
        let png = out.join("loss.png");
        match crate::plot::render_runs(std::slice::from_ref(&out.to_path_buf()), &png) {
            Ok(()) => println!(
                "metrics: {} | curve: {} | sample: train sample --checkpoint {}",
                Metrics::path(out).display(),
                png.display(),
                out.display()
            ),
            Err(e) => println!("(could not render loss.png: {e})"),
        }
    }
}
