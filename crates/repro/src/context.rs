//! Perplexity against context length (FlashAttention 2022, §4.2 and Table 4; issue 14): GPT-2
//! trained from scratch with flash V2 on the same data and the same number of tokens at each
//! context, every model scored on the same held-out tokens at its own context; time per token
//! and peak memory of each run; naive attention's time per token at each context from a few
//! `train bench` steps, until its memory passes the budget. The runs are `train gpt2` itself
//! (its trainer, recipe and evaluation), one process each, so peak RSS is the run's own.
//!
//! Held-out tokens: `train`'s validation split (every 10th 8192-token block of the stream, the
//! same blocks at every context up to 8191), scored as its first `val_tokens + 1` tokens cut
//! into non-overlapping windows of `context + 1`: every context predicts the same `val_tokens`
//! targets, token `j` seeing the `j mod context` before it. `val_tokens` is a multiple of every
//! context.

use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::plan::Mode;
use crate::plot::{e, line_chart_x, Line};

/// What the section measures in a mode.
#[derive(Clone, Debug)]
pub struct ContextPlan {
    pub contexts: Vec<usize>,
    /// Seeds at the shortest and the longest context (the first seed elsewhere).
    pub seeds: Vec<u64>,
    pub settings: ContextSettings,
    /// `train bench` timed and warm-up steps per context.
    pub bench_steps: usize,
    pub bench_warmup: usize,
    /// `--data` for `train` (default: its embedded corpus).
    pub data: Vec<PathBuf>,
    /// Extra flags for every `train` call (device, dtype).
    pub device: Vec<String>,
}

/// What every run of the section shares: planned in [`ContextPlan`], recorded as it was in
/// [`ContextSection`] (the keys of `results.json`).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct ContextSettings {
    /// Training tokens of every run.
    pub tokens: u64,
    /// Tokens per optimizer step (batch = this / context).
    pub tokens_per_step: usize,
    pub val_tokens: usize,
    /// The model's size flags for `train gpt2` and `train bench`.
    pub size: Vec<String>,
    /// A byte-level BPE of this vocabulary trained on the data first (`train tokenizer`) and
    /// used by every run; `None`: GPT-2's 50,257-token BPE. A small vocabulary keeps the LM head
    /// from dominating a small model's step, so the budget buys enough tokens for the models to
    /// get past unigram statistics, where context can matter at all.
    #[serde(default)]
    pub tokenizer_vocab: Option<usize>,
    /// The sizing arithmetic, printed in the caption.
    pub sizing: String,
    /// Naive attention is not timed at a context whose predicted peak RSS passes this.
    #[serde(rename = "memory_budget_bytes")]
    pub memory_budget: u64,
}

const GB: u64 = 1 << 30;

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

impl ContextPlan {
    pub fn new(mode: Mode) -> Self {
        let full = ContextPlan {
            contexts: vec![128, 256, 512, 1024, 2048],
            seeds: vec![1337, 1338],
            settings: ContextSettings {
                tokens: 786_432,
                tokens_per_step: 4096,
                val_tokens: 16_384,
                size: strings(&["--preset", "tiny"]),
                tokenizer_vocab: Some(2048),
                // Calibrated on the 2-core machine while a build ran (2026-12-01): `train gpt2
                // --preset tiny --tokenizer <2048-token BPE>` 4132 tokens/s at 128 and 1619 at 2K;
                // at 128, 409,600 tokens took val loss to 5.81 against a unigram entropy of 6.30.
                // GPT-2's 50K BPE at this size spent 48 steps above the unigram entropy (6.98 vs 6.76).
                sizing: "GPT-2 tiny (4 layers, width 128, 4 heads) with a 2048-token BPE trained on the data \
                         (1.07M parameters at context 128, 0.26M of them the token embedding; the position \
                         table grows with the context), 786,432 tokens (192 steps of 4096) per run. Seven runs (two seeds at 128 and 2048) train for 786,432 × (2/4132 + 1/4000 + \
                         1/3600 + 1/3000 + 2/1619) s ≈ 34 min at speeds calibrated with the machine loaded (128 \
                         and 2K measured, the others interpolated); setup and two validations add ≤ 20 s a run, \
                         the bench steps ≈ 3 min: ≈ 40 min in all, < 60."
                    .into(),
                memory_budget: 12 * GB,
            },
            bench_steps: 2,
            bench_warmup: 1,
            data: Vec::new(),
            device: Vec::new(),
        };
        match mode {
            Mode::Full => full,
            Mode::Quick => ContextPlan {
                contexts: vec![32, 64],
                settings: ContextSettings {
                    tokens: 2048,
                    tokens_per_step: 512,
                    val_tokens: 512,
                    size: strings(&["--preset", "tiny", "--n-layer", "1"]),
                    tokenizer_vocab: Some(512),
                    sizing:
                        "Quick: 1-layer tiny GPT-2, 4 steps of 512 tokens per run; a smoke test."
                            .into(),
                    // Small, so that naive is skipped inside the quick range and CI exercises it.
                    memory_budget: 0,
                },
                bench_steps: 1,
                bench_warmup: 0,
                ..full
            },
            // FlashAttention's Table 4 shape: GPT-2 small at 1K–4K.
            Mode::Gpu => ContextPlan {
                contexts: vec![1024, 2048, 4096],
                settings: ContextSettings {
                    tokens: 50_000_000,
                    tokens_per_step: 131_072,
                    val_tokens: 1_048_576,
                    size: strings(&["--preset", "gpt2-small"]),
                    tokenizer_vocab: None,
                    sizing:
                        "GPU: GPT-2 small, 50M tokens per run (paper: 400K steps × 512K tokens)."
                            .into(),
                    memory_budget: 60 * GB,
                },
                bench_steps: 5,
                bench_warmup: 2,
                device: strings(&["--device", "cuda", "--dtype", "bf16"]),
                ..full
            },
        }
    }

    /// `--data FILE…` for every `train` call of the section, empty for the embedded corpus.
    fn data_args(&self) -> Vec<String> {
        if self.data.is_empty() {
            return Vec::new();
        }
        let files = self.data.iter().map(|p| p.display().to_string());
        std::iter::once("--data".to_string()).chain(files).collect()
    }

    /// `(context, seed)` of every training run, shortest context first.
    pub fn runs(&self) -> Vec<(usize, u64)> {
        let (lo, hi) = (
            self.contexts.iter().min().copied(),
            self.contexts.iter().max().copied(),
        );
        let mut v = Vec::new();
        for &c in &self.contexts {
            let n = if Some(c) == lo || Some(c) == hi {
                self.seeds.len()
            } else {
                1
            };
            v.extend(self.seeds.iter().take(n).map(|&s| (c, s)));
        }
        v
    }
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct ContextSection {
    #[serde(flatten)]
    pub settings: ContextSettings,
    pub runs: Vec<ContextRun>,
    /// `train bench` rows (flash V2 and naive) per context.
    pub bench: Vec<BenchRow>,
}

/// One training run.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct ContextRun {
    pub context: usize,
    pub seed: u64,
    pub batch: usize,
    pub steps: Option<u64>,
    pub tokens: Option<u64>,
    pub params: Option<u64>,
    /// Validation loss (nats/token) before training and at the end.
    pub untrained_loss: Option<f64>,
    pub val_loss: Option<f64>,
    /// The unigram entropy of the training tokens (nats/token, `train`'s run.json): the loss of
    /// a model that ignores context; a context effect needs `val_loss` well below it.
    #[serde(default)]
    pub unigram_loss: Option<f64>,
    /// Seconds inside the optimizer steps (validation and checkpoints excluded).
    pub train_s: Option<f64>,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// How one `train` process went.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Outcome {
    /// The whole process.
    pub wall_s: f64,
    pub peak_rss_bytes: Option<u64>,
    /// Why it failed, or why its folder could not be read.
    pub error: Option<String>,
}

impl ContextRun {
    pub fn ppl(&self) -> Option<f64> {
        self.val_loss.map(f64::exp)
    }
    pub fn us_per_token(&self) -> Option<f64> {
        Some(self.train_s? / self.tokens? as f64 * 1e6)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct BenchRow {
    pub context: usize,
    /// `flash2` or `naive`.
    pub attn: String,
    pub us_per_token: Option<f64>,
    pub peak_rss_bytes: Option<u64>,
    pub skipped: Option<String>,
}

/// Runs `bin args`, its output to `log`; `(success or the failure, peak RSS of the child)`.
pub fn run_logged(bin: &Path, args: &[String], log: &Path) -> Result<(Result<()>, Option<u64>)> {
    let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let child = Command::new(bin)
        .args(args)
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let (failure, rss) = wait_with_peak(child)?;
    let status = if let Some(how) = failure {
        // `train`'s one-line `error: …` (clap's comes before its usage lines), else the last line.
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines = || text.lines().rev().filter(|l| !l.trim().is_empty());
        let line = lines()
            .find(|l| l.starts_with("error"))
            .or_else(|| lines().next())
            .unwrap_or("");
        Err(anyhow::anyhow!(
            "{} {how} ({}): {line}",
            bin.display(),
            log.display()
        ))
    } else {
        Ok(())
    };
    Ok((status, rss))
}

/// Waits for `child` and reads its own peak resident set from `wait4` (Linux reports KiB,
/// macOS bytes); how it failed (`None`: exit status 0).
#[cfg(unix)]
fn wait_with_peak(child: std::process::Child) -> Result<(Option<String>, Option<u64>)> {
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: `rusage` is plain data that wait4 fills; the pid is our own un-reaped child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if r != pid {
        bail!(
            "waiting for child {pid}: {}",
            std::io::Error::last_os_error()
        )
    }
    let unit = if cfg!(target_os = "macos") { 1 } else { 1024 };
    let failure = if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        // What a run that passes the machine's memory gets from the kernel's OOM killer.
        let oom = if sig == libc::SIGKILL {
            " (SIGKILL: out of memory?)"
        } else {
            ""
        };
        Some(format!("was killed by signal {sig}{oom}"))
    } else {
        match libc::WEXITSTATUS(status) {
            0 => None,
            code => Some(format!("failed (exit status {code})")),
        }
    };
    Ok((failure, Some(usage.ru_maxrss as u64 * unit)))
}

#[cfg(not(unix))]
fn wait_with_peak(mut child: std::process::Child) -> Result<(Option<String>, Option<u64>)> {
    let st = child.wait()?;
    Ok(((!st.success()).then(|| format!("failed ({st})")), None))
}

/// The records of a run folder's `metrics.jsonl`.
pub fn metrics(run: &Path) -> Result<Vec<serde_json::Value>> {
    let p = run.join("metrics.jsonl");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("parsing {}", p.display())))
        .collect()
}

/// Removes a finished run's weights (`checkpoints/`, `best/`): a results folder keeps its
/// logs, metrics and settings, not tens of MB of checkpoints per run.
pub fn drop_weights(run: &Path) {
    for d in ["checkpoints", "best"] {
        std::fs::remove_dir_all(run.join(d)).ok();
    }
}

/// Seconds inside the optimizer steps: the sum of the `train` records' `step_s`.
pub fn step_seconds(records: &[serde_json::Value]) -> f64 {
    records
        .iter()
        .filter(|r| r["kind"] == "train")
        .filter_map(|r| r["step_s"].as_f64())
        .sum()
}

/// `[k1, v1, k2, v2, …]`.
/// A `train` command line: `head` (the subcommand and its fixed words), each of `groups` (size,
/// device and other flag lists) in order, then `pairs` as `--flag value`.
pub fn train_args(head: &[&str], groups: &[&[String]], pairs: &[(&str, String)]) -> Vec<String> {
    let mut args = strings(head);
    args.extend(groups.iter().flat_map(|g| g.iter().cloned()));
    args.extend(pairs.iter().flat_map(|(k, v)| [k.to_string(), v.clone()]));
    args
}

/// Runs `train args --out out --overwrite` (its output in `out.log`), then `read` on the
/// folder's metrics records; the weights are removed afterwards.
pub fn train_into(
    bin: &Path,
    mut args: Vec<String>,
    out: &Path,
    read: impl FnOnce(&[serde_json::Value]) -> Result<()>,
) -> Outcome {
    args.extend([
        "--out".into(),
        out.display().to_string(),
        "--overwrite".into(),
    ]);
    let t = Instant::now();
    let log = out.with_extension("log");
    let ran = out
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .map_err(anyhow::Error::from)
        .and_then(|_| run_logged(bin, &args, &log));
    let mut o = Outcome {
        wall_s: t.elapsed().as_secs_f64(),
        ..Outcome::default()
    };
    let done = ran.and_then(|(status, rss)| {
        o.peak_rss_bytes = rss;
        status?;
        read(&metrics(out)?)
    });
    drop_weights(out);
    if let Err(e) = done {
        println!("  failed: {e:#}");
        o.error = Some(format!("{e:#}"));
    }
    o
}

fn train_run(plan: &ContextPlan, bin: &Path, dir: &Path, context: usize, seed: u64) -> ContextRun {
    let batch = (plan.settings.tokens_per_step / context).max(1);
    let out = dir.join(format!("ctx{context}-seed{seed}"));
    let groups = [&plan.settings.size[..], &plan.device[..], &plan.data_args()];
    let args = train_args(
        &["gpt2", "--attn", "flash2"],
        &groups,
        &[
            ("--n-positions", context.to_string()),
            ("--seq-len", context.to_string()),
            ("--batch-size", batch.to_string()),
            ("--tokens", plan.settings.tokens.to_string()),
            ("--val-tokens", plan.settings.val_tokens.to_string()),
            ("--val-every", "0".into()),
            ("--ckpt-every", "0".into()),
            ("--keep-checkpoints", "1".into()),
            ("--log-every", "10".into()),
            ("--seed", seed.to_string()),
        ],
    );
    println!(
        "context {context}, seed {seed}: {} {}",
        bin.display(),
        args.join(" ")
    );
    let mut run = ContextRun {
        context,
        seed,
        batch,
        ..ContextRun::default()
    };
    run.outcome = train_into(bin, args, &out, |recs| {
        let vals: Vec<&serde_json::Value> = recs.iter().filter(|r| r["kind"] == "val").collect();
        let last = recs.iter().rev().find(|r| r["kind"] == "train");
        run.untrained_loss = vals.first().and_then(|v| v["loss"].as_f64());
        run.val_loss = vals.last().and_then(|v| v["loss"].as_f64());
        run.steps = last.and_then(|r| r["step"].as_u64());
        run.tokens = last.and_then(|r| r["tokens"].as_u64());
        run.train_s = Some(step_seconds(recs));
        let settings: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("run.json"))?)?;
        run.params = settings["params"].as_u64();
        run.unigram_loss = settings["unigram_entropy"].as_f64();
        Ok(())
    });
    if run.outcome.error.is_none() {
        println!(
            "  val loss {:.4} (ppl {:.1}), {:.0} µs/token, peak RSS {}",
            run.val_loss.unwrap_or(f64::NAN),
            run.ppl().unwrap_or(f64::NAN),
            run.us_per_token().unwrap_or(f64::NAN),
            crate::measure::bytes(run.outcome.peak_rss_bytes.unwrap_or(0) as f64)
        );
    }
    run
}

/// `train bench` at each context: flash V2 always, naive until its predicted peak RSS (the last
/// measured one scaled by the context: at fixed tokens per step the N×N scores grow as N)
/// passes the budget.
fn bench(plan: &ContextPlan, bin: &Path, dir: &Path) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    let mut last_naive: Option<(usize, u64)> = None;
    let mut contexts = plan.contexts.clone();
    contexts.sort_unstable();
    for c in contexts {
        let predicted = last_naive.map(|(n, rss)| rss * c as u64 / n as u64);
        let over = predicted.is_some_and(|p| p > plan.settings.memory_budget);
        let attn = if over { "flash2" } else { "flash2,naive" };
        let out = dir.join(format!("bench-{c}.json"));
        let groups = [&plan.settings.size[..], &plan.device[..]];
        let args = train_args(
            &["bench", "--model", "gpt2"],
            &groups,
            &[
                ("--seq-lens", c.to_string()),
                ("--attn", attn.into()),
                (
                    "--tokens-per-step",
                    plan.settings.tokens_per_step.to_string(),
                ),
                ("--steps", plan.bench_steps.to_string()),
                ("--warmup", plan.bench_warmup.to_string()),
                ("--out", out.display().to_string()),
            ],
        );
        println!("context {c}: {} {}", bin.display(), args.join(" "));
        let (status, _) = run_logged(bin, &args, &dir.join(format!("bench-{c}.log")))?;
        let report: Option<serde_json::Value> = match status {
            Ok(()) => Some(serde_json::from_str(&std::fs::read_to_string(&out)?)?),
            Err(e) => {
                println!("  failed: {e:#}");
                None
            }
        };
        std::fs::remove_file(&out).ok();
        for kind in ["flash2", "naive"] {
            let row = report.as_ref().and_then(|r| {
                r["rows"]
                    .as_array()?
                    .iter()
                    .find(|x| x["attn"] == kind)
                    .cloned()
            });
            let skipped = match (&row, kind) {
                (Some(_), _) => None,
                (None, "naive") if over => Some(format!(
                    "predicted {} > budget {}",
                    crate::measure::bytes(predicted.unwrap_or(0) as f64),
                    crate::measure::bytes(plan.settings.memory_budget as f64)
                )),
                (None, _) => Some("train bench failed (see the log)".into()),
            };
            let rss = row.as_ref().and_then(|x| x["peak_rss_bytes"].as_u64());
            if kind == "naive" {
                if let Some(r) = rss {
                    last_naive = Some((c, r));
                }
            }
            rows.push(BenchRow {
                context: c,
                attn: kind.into(),
                us_per_token: row
                    .as_ref()
                    .and_then(|x| x["tokens_per_s"].as_f64())
                    .map(|t| 1e6 / t),
                peak_rss_bytes: rss,
                skipped,
            });
        }
    }
    Ok(rows)
}

pub fn measure(plan: &ContextPlan, bin: &Path, dir: &Path) -> Result<ContextSection> {
    for &c in &plan.contexts {
        if !plan.settings.val_tokens.is_multiple_of(c) {
            bail!(
                "val_tokens {} is not a multiple of context {c}: the contexts would score different tokens",
                plan.settings.val_tokens
            )
        }
    }
    let dir = dir.join("context");
    // With a trained tokenizer, every run (training and bench) gets `--tokenizer`.
    let mut with_tok = plan.clone();
    if let Some(v) = plan.settings.tokenizer_vocab {
        with_tok
            .settings
            .size
            .extend(["--tokenizer".into(), train_tokenizer(plan, bin, &dir, v)?]);
    }
    let runs = with_tok
        .runs()
        .into_iter()
        .map(|(c, s)| train_run(&with_tok, bin, &dir, c, s))
        .collect();
    let bench = bench(&with_tok, bin, &dir)?;
    Ok(ContextSection {
        settings: plan.settings.clone(),
        runs,
        bench,
    })
}

/// `train tokenizer --vocab-size vocab` on the section's data, into `dir`; the file's path.
fn train_tokenizer(plan: &ContextPlan, bin: &Path, dir: &Path, vocab: usize) -> Result<String> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("tokenizer.json").display().to_string();
    let args = train_args(
        &["tokenizer", "--kind", "bpe"],
        &[&plan.data_args()],
        &[("--vocab-size", vocab.to_string()), ("--out", path.clone())],
    );
    println!("context tokenizer: {} {}", bin.display(), args.join(" "));
    let (done, _) = run_logged(bin, &args, &dir.join("tokenizer.log"))?;
    done.context("training the section's tokenizer")?;
    Ok(path)
}

fn mean_sd(xs: &[f64]) -> Option<(f64, Option<f64>)> {
    if xs.is_empty() {
        return None;
    }
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    let sd = (xs.len() > 1)
        .then(|| (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt());
    Some((m, sd))
}

fn contexts(s: &ContextSection) -> Vec<usize> {
    let mut v: Vec<usize> = s.runs.iter().map(|r| r.context).collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn ppls(s: &ContextSection, c: usize) -> Vec<f64> {
    s.runs
        .iter()
        .filter(|r| r.context == c)
        .filter_map(ContextRun::ppl)
        .collect()
}

fn bench_us(s: &ContextSection, c: usize, attn: &str) -> Option<f64> {
    s.bench
        .iter()
        .find(|b| b.context == c && b.attn == attn)?
        .us_per_token
}

pub fn table(s: &ContextSection) -> String {
    let mut o = String::new();
    writeln!(
        o,
        "## Perplexity vs context length (FlashAttention 2022, Table 4)\n\n\
         GPT-2 from scratch with flash V2 (`train gpt2 {}`, {}), {} training tokens per run at every \
         context ({} tokens per step: batch = {} / context). Validation perplexity on the same {} \
         held-out tokens (the validation split cut into non-overlapping windows of the context; \
         token j sees j mod context tokens before it); unigram ppl: exp of the training tokens' \
         unigram entropy, what a model that ignores context reaches. Time per token: the optimizer steps of the \
         run (validation excluded), and `train bench` steps with flash V2 and naive attention at \
         the same tokens per step; naive is skipped where its predicted peak RSS passes {}. \
         Sizing: {}\n\n\
         Paper (GPT-2 small on OpenWebText, 8×A100, 400K steps): 1K ppl 18.2 (2.7 days), 2K 17.6 \
         (3.0 days), 4K 17.5 (3.6 days): 0.7 better from 1K to 4K.\n",
        s.settings.size.join(" "),
        match s.settings.tokenizer_vocab {
            Some(v) => format!("a {v}-token byte-level BPE trained on the data by `train tokenizer`"),
            None => "GPT-2's BPE".into(),
        },
        s.settings.tokens,
        s.settings.tokens_per_step,
        s.settings.tokens_per_step,
        s.settings.val_tokens,
        crate::measure::bytes(s.settings.memory_budget as f64),
        s.settings.sizing
    )
    .ok();
    writeln!(
        o,
        "| context | runs (seeds) | val ppl | unigram ppl | untrained ppl | train µs/token | peak RSS | bench flash2 µs/token | bench naive µs/token | naive / flash2 |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    .ok();
    for c in contexts(s) {
        let rs: Vec<&ContextRun> = s.runs.iter().filter(|r| r.context == c).collect();
        let seeds: Vec<String> = rs.iter().map(|r| r.seed.to_string()).collect();
        let ppl = match mean_sd(&ppls(s, c)) {
            Some((m, Some(sd))) => format!("{m:.1} ± {sd:.1}"),
            Some((m, None)) => format!("{m:.1}"),
            None => "failed".into(),
        };
        let all = |f: &dyn Fn(&ContextRun) -> Option<f64>| -> Vec<f64> {
            rs.iter().filter_map(|r| f(r)).collect()
        };
        let avg = |xs: Vec<f64>, prec: usize| {
            mean_sd(&xs).map_or("-".into(), |(m, _)| format!("{m:.prec$}"))
        };
        let untrained = avg(all(&|r| r.untrained_loss.map(f64::exp)), 0);
        let unigram = avg(all(&|r| r.unigram_loss.map(f64::exp)), 1);
        let us = avg(all(&ContextRun::us_per_token), 0);
        let rss = avg(all(&|r| r.outcome.peak_rss_bytes.map(|b| b as f64)), 0);
        let rss = rss.parse::<f64>().map_or("-".into(), crate::measure::bytes);
        let (f, n) = (bench_us(s, c, "flash2"), bench_us(s, c, "naive"));
        let naive = match (
            n,
            s.bench.iter().find(|b| b.context == c && b.attn == "naive"),
        ) {
            (Some(x), _) => format!("{x:.0}"),
            (None, Some(b)) => b.skipped.clone().unwrap_or("-".into()),
            _ => "-".into(),
        };
        let ratio = match (n, f) {
            (Some(n), Some(f)) => format!("{:.2}×", n / f),
            _ => "-".into(),
        };
        writeln!(
            o,
            "| {c} | {} ({}) | {ppl} | {unigram} | {untrained} | {us} | {rss} | {} | {naive} | {ratio} |",
            rs.len(),
            seeds.join(", "),
            f.map_or("-".into(), |x| format!("{x:.0}")),
        )
        .ok();
    }
    for r in s.runs.iter().filter(|r| r.outcome.error.is_some()) {
        writeln!(
            o,
            "\nRun at context {} seed {} failed: {}",
            r.context,
            r.seed,
            r.outcome.error.as_deref().unwrap_or("")
        )
        .ok();
    }
    let cs = contexts(s);
    if let (Some(&lo), Some(&hi)) = (cs.first(), cs.last()) {
        if let (Some((a, _)), Some((b, _))) = (mean_sd(&ppls(s, lo)), mean_sd(&ppls(s, hi))) {
            writeln!(
                o,
                "\nFrom context {lo} to {hi}: perplexity {a:.1} → {b:.1} ({:+.1}; the paper's 1K → 4K: −0.7). \
                 The ± is the sample standard deviation over the seeds.",
                b - a
            )
            .ok();
        }
    }
    o
}

pub fn plot(s: &ContextSection, out: &Path) -> Result<()> {
    let root = BitMapBackend::new(out, (1120, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let panels = root.split_evenly((1, 2));
    let cs = contexts(s);
    let ppl = Line {
        label: "ours (mean over seeds)".into(),
        colour: BLUE,
        points: cs
            .iter()
            .filter_map(|&c| Some((c as f64, mean_sd(&ppls(s, c))?.0)))
            .collect(),
        paper: false,
    };
    let paper = Line {
        label: "paper (GPT-2 small, OpenWebText)".into(),
        colour: BLACK,
        points: vec![(1024.0, 18.2), (2048.0, 17.6), (4096.0, 17.5)],
        paper: true,
    };
    line_chart_x(
        &panels[0],
        "Validation perplexity vs context (same tokens)",
        "context",
        "perplexity (log)",
        &[ppl, paper],
        true,
        None,
    )?;
    let per = |attn: &'static str, colour: RGBColor| Line {
        label: format!("train bench {attn}"),
        colour,
        points: cs
            .iter()
            .filter_map(|&c| Some((c as f64, bench_us(s, c, attn)?)))
            .collect(),
        paper: false,
    };
    let runs = Line {
        label: "training runs (flash2)".into(),
        colour: GREEN,
        points: cs
            .iter()
            .filter_map(|&c| {
                let xs: Vec<f64> = s
                    .runs
                    .iter()
                    .filter(|r| r.context == c)
                    .filter_map(ContextRun::us_per_token)
                    .collect();
                Some((c as f64, mean_sd(&xs)?.0))
            })
            .collect(),
        paper: false,
    };
    line_chart_x(
        &panels[1],
        "Training time per token vs context",
        "context",
        "µs per token (log)",
        &[per("flash2", BLUE), per("naive", RED), runs],
        true,
        None,
    )?;
    root.present().map_err(e)?;
    Ok(())
}
