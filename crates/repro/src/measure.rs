//! Runs the attention tables through `flash_ops_bench` (timing and peak-memory measurement live
//! there, shared with `cargo bench`) and the end-to-end table through `train bench`.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use flash_ops_bench::{measure, Variant, Workload};

use crate::plan::{E2eSpec, Plan};
use crate::results::{AttnRow, AttnSection, E2eRun, E2eSection, Fa2Section};

/// Predicts naive attention's peak memory from the largest naive run so far in the same setting:
/// naive holds a few (batch, heads, N, N) f32 matrices, so its peak is a multiple of one of them,
/// and the largest run has the least O(N) overhead in that multiple. Before any naive run, a
/// conservative 8 score matrices (scores, probabilities, masks and their gradients).
struct NaiveMemory {
    bytes_per_score: f64,
    learned_at: f64,
}

impl NaiveMemory {
    fn new() -> Self {
        Self {
            bytes_per_score: 8.0 * 4.0,
            learned_at: 0.0,
        }
    }
    fn scores(w: &Workload) -> f64 {
        (w.batch * w.heads * w.n * w.n) as f64
    }
    fn predict(&self, w: &Workload) -> f64 {
        self.bytes_per_score * Self::scores(w)
    }
    fn learn(&mut self, w: &Workload, peak: u64) {
        let scores = Self::scores(w);
        let ratio = peak as f64 / scores;
        if ratio.is_finite() && ratio > 0.0 && scores >= self.learned_at {
            self.bytes_per_score = ratio;
            self.learned_at = scores;
        }
    }
}

/// Where the attention tables run: the CPU in f32, or a GPU in the papers' half precision.
pub struct Target {
    pub device: Device,
    pub dtype: DType,
}

/// Bytes in MB below a GB, else GB.
pub fn bytes(b: f64) -> String {
    if b < 1e9 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.2} GB", b / 1e9)
    }
}

fn empty_row(v: Variant, w: &Workload, reps: usize, skipped: Option<String>) -> AttnRow {
    AttnRow {
        variant: v.key().into(),
        batch: w.batch,
        heads: w.heads,
        n: w.n,
        d: w.d,
        causal: w.causal,
        dropout_and_padding: w.dropout_and_padding.is_some(),
        fwd_ms: None,
        fwd_bwd_ms: None,
        fwd_mem_bytes: None,
        fwd_bwd_mem_bytes: None,
        fwd_flops: w.fwd_flops(),
        reps,
        skipped,
    }
}

/// Measures one cell, or records why it was skipped (naive past the memory budget).
fn cell(
    v: Variant,
    w: &Workload,
    reps: usize,
    budget: u64,
    naive: &mut NaiveMemory,
    target: &Target,
) -> Result<AttnRow> {
    if v == Variant::Naive {
        let predicted = naive.predict(w);
        if predicted > budget as f64 {
            let why = format!(
                "over the memory budget: predicted {} > {}",
                bytes(predicted),
                bytes(budget as f64)
            );
            println!("  {:>6} {:<12} skipped ({why})", w.n, v.name());
            return Ok(empty_row(v, w, reps, Some(why)));
        }
    }
    let t = Instant::now();
    let r = match measure(v, w, reps, &target.device, target.dtype) {
        Ok(r) => r,
        // Standard attention running out of (device) memory before the budget predicted it is
        // the papers' "OOM" cell, not a failed reproduction.
        Err(e) if v == Variant::Naive => {
            let why = format!("failed: {e}");
            println!("  {:>6} {:<12} {why}", w.n, v.name());
            return Ok(empty_row(v, w, reps, Some(why)));
        }
        Err(e) => return Err(e).with_context(|| format!("{} at {w:?}", v.name())),
    };
    if v == Variant::Naive {
        if let Some(m) = r.fwd_bwd_mem {
            naive.learn(w, m as u64);
        }
    }
    let mut row = empty_row(v, w, reps, None);
    row.fwd_ms = Some(r.fwd_ms);
    row.fwd_bwd_ms = r.fwd_bwd_ms;
    row.fwd_mem_bytes = r.fwd_mem.map(|m| m as u64);
    row.fwd_bwd_mem_bytes = r.fwd_bwd_mem.map(|m| m as u64);
    println!(
        "  {:>6} {:<12} fwd {:>9.2} ms  fwd+bwd {:>9} ms  peak {:>8} MB  ({:.0} s)",
        w.n,
        v.name(),
        r.fwd_ms,
        r.fwd_bwd_ms.map_or("-".into(), |t| format!("{t:.2}")),
        r.fwd_bwd_mem
            .or(r.fwd_mem)
            .map_or("-".into(), |m| format!("{:.1}", m as f64 / 1e6)),
        t.elapsed().as_secs_f64()
    );
    Ok(row)
}

/// Table 1 and the memory table: FlashAttention (2022) §4.3 / Appendix E.
pub fn attention(plan: &Plan, variants: &[Variant], target: &Target) -> Result<AttnSection> {
    let mut rows = Vec::new();
    let mut plain_naive = NaiveMemory::new();
    for dropout in [None, Some(plan.t1.dropout)] {
        let mut other = NaiveMemory::new();
        let naive = if dropout.is_none() {
            &mut plain_naive
        } else {
            &mut other
        };
        println!(
            "Table 1 ({}):",
            if dropout.is_some() {
                "dropout + key-padding mask"
            } else {
                "no dropout, no mask"
            }
        );
        for &n in &plan.t1.lengths {
            for &v in variants {
                let mut w = Workload::new(plan.t1.batch, plan.t1.heads, n, plan.t1.d, false);
                w.dropout_and_padding = dropout;
                rows.push(cell(v, &w, plan.reps, plan.memory_budget, naive, target)?);
            }
        }
    }
    // Past naive's budget: flash alone, for the memory column (one repeat: these are the slowest).
    // V1 is left out there: its memory is linear like V2's, and these cells are the slowest of
    // the table (one forward+backward at 8K costs more than all lengths up to 2K together).
    println!("Memory table, past standard attention's budget (flash V2 only):");
    for &n in &plan.t1.memory_lengths {
        for &v in variants.iter().filter(|v| **v != Variant::V1) {
            let w = Workload::new(plan.t1.batch, plan.t1.heads, n, plan.t1.d, false);
            let v_reps = if v == Variant::Naive { plan.reps } else { 1 };
            rows.push(cell(
                v,
                &w,
                v_reps,
                plan.memory_budget,
                &mut plain_naive,
                target,
            )?);
        }
    }
    Ok(AttnSection {
        setup: plan.t1.clone(),
        memory_budget_bytes: plan.memory_budget,
        rows,
    })
}

/// Table 2: FlashAttention-2 Fig. 4–6 (fixed batch×seq and hidden size).
pub fn fa2(plan: &Plan, variants: &[Variant], target: &Target) -> Result<Fa2Section> {
    let mut rows = Vec::new();
    for &d in &plan.t2.head_dims {
        for causal in [false, true] {
            let mut naive = NaiveMemory::new();
            println!("Table 2 (d {d}, causal {causal}):");
            for &n in &plan.t2.lengths {
                let batch = (plan.t2.tokens / n).max(1);
                let heads = (plan.t2.hidden / d).max(1);
                let w = Workload::new(batch, heads, n, d, causal);
                for &v in variants {
                    rows.push(cell(
                        v,
                        &w,
                        plan.reps,
                        plan.memory_budget,
                        &mut naive,
                        target,
                    )?);
                }
            }
        }
    }
    Ok(Fa2Section {
        setup: plan.t2.clone(),
        memory_budget_bytes: plan.memory_budget,
        rows,
        torch: None,
    })
}

/// Table 3: runs `train bench` once per spec; a failed run is recorded, not fatal.
pub fn e2e(specs: &[E2eSpec], train_bin: &Path, dir: &Path) -> Result<E2eSection> {
    let mut runs = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        let out = dir.join(format!("e2e-{i}.json"));
        let mut args = vec!["bench".to_string()];
        args.extend(s.args.iter().cloned());
        println!(
            "Table 3: {} — {} {}",
            s.label,
            train_bin.display(),
            args.join(" ")
        );
        let status = Command::new(train_bin)
            .args(&args)
            .arg("--out")
            .arg(&out)
            .status()
            .with_context(|| format!("starting {}", train_bin.display()));
        let (report, error) = match status {
            Ok(st) if st.success() => {
                let text = std::fs::read_to_string(&out)?;
                // The report lives in results.json; the separate file was only the hand-over.
                std::fs::remove_file(&out).ok();
                (Some(serde_json::from_str(&text)?), None)
            }
            Ok(st) => (None, Some(format!("train bench exited with {st}"))),
            Err(e) => (None, Some(format!("{e:#}"))),
        };
        if let Some(e) = &error {
            println!("  failed: {e}");
        }
        runs.push(E2eRun {
            label: s.label.into(),
            args: s.args.clone(),
            report,
            error,
        });
    }
    Ok(E2eSection { runs })
}

/// PyTorch's CPU `scaled_dot_product_attention` on the workloads of the flash V2 rows, through
/// `scripts/repro_torch_sdpa.py` (the FlashAttention-2 figures' PyTorch column, where torch is
/// installed). Memory is not measured there.
pub fn torch_sdpa(
    python: &Path,
    script: &Path,
    rows: &[AttnRow],
    target: &Target,
) -> Result<(Vec<AttnRow>, String)> {
    let device = if target.device.is_cuda() {
        "cuda"
    } else {
        "cpu"
    };
    let dtype = target.dtype.as_str();
    use std::io::Write;
    let base: Vec<&AttnRow> = rows
        .iter()
        .filter(|r| r.variant == Variant::V2.key())
        .collect();
    let input: Vec<serde_json::Value> = base
        .iter()
        .map(|r| {
            serde_json::json!({"batch": r.batch, "heads": r.heads, "n": r.n, "d": r.d,
                "causal": r.causal, "reps": r.reps, "device": device, "dtype": dtype})
        })
        .collect();
    let mut child = Command::new(python)
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {} {}", python.display(), script.display()))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(serde_json::to_string(&input)?.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        anyhow::bail!("{} failed ({})", script.display(), out.status)
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let times = v["rows"]
        .as_array()
        .context("no rows from the torch script")?;
    let version = format!(
        "torch {} ({device}, {dtype}, {})",
        v["torch"].as_str().unwrap_or("?"),
        v["backend"].as_str().unwrap_or("?")
    );
    let rows = base
        .iter()
        .zip(times)
        .map(|(r, t)| {
            let mut x = (*r).clone();
            x.variant = Variant::TorchSdpa.key().into();
            x.fwd_ms = t["fwd_ms"].as_f64();
            x.fwd_bwd_ms = t["fwd_bwd_ms"].as_f64();
            x.fwd_mem_bytes = None;
            x.fwd_bwd_mem_bytes = None;
            x
        })
        .collect();
    Ok((rows, version))
}
