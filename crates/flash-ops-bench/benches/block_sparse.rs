//! Block-sparse attention benchmark on CPU (FlashAttention §3.3): flash V2 forward and
//! forward+backward time against the fraction of key blocks visited — random blocks at densities
//! 1 … 1/16 and each named pattern at its own density — beside dense flash V2, naive attention
//! and Candle's autograd share (the step around an op that does no attention) in the same run;
//! the least-squares fit `time = a + b·density` per length with each row's deviation from it and
//! from proportionality (with and without the autograd share); and a full-vs-partial pair (one
//! block set, once all full, once all partial) for the cost of the element mask. f32, batch 1, 12 heads, d 64, non-causal.
//!
//! `cargo bench -p flash-ops-bench --bench block_sparse -- [--n 1024,2048] [--patterns
//!   butterfly,local:512,local-global:256,128] [--densities 1,0.5] [--reps 3] [--heads 12]
//!   [--d 64] [--block 128,128] [--max-naive-n 4096] [--pair-n 1024] [--json FILE]`
//!
//! In `--patterns`, a value that starts with a digit continues the pattern before it
//! (`local-global:W,G`).

use candle_core::{bail, Result};
use flash_ops_bench::args::{arg_list, num, nums};
use flash_ops_bench::block_sparse::{
    fits, off_proportional, sweep, Case, SparsePlan, SparseRow, DENSITIES,
};
use flash_ops_bench::{cpu_model, gemm_path, kernel_path, PeakAlloc};
use flash_ops_models::Sparsity;

#[global_allocator]
static GLOBAL: PeakAlloc = PeakAlloc;

const DEFAULT_PATTERNS: &str = "butterfly,local:512,strided:256,local-global:256,128";

/// Comma-separated patterns; a piece starting with a digit belongs to the one before.
fn patterns(list: &[String]) -> Result<Vec<Sparsity>> {
    let mut joined: Vec<String> = Vec::new();
    for piece in list {
        match joined.last_mut() {
            Some(last) if piece.starts_with(|c: char| c.is_ascii_digit()) => {
                last.push(',');
                last.push_str(piece);
            }
            _ => joined.push(piece.clone()),
        }
    }
    joined
        .iter()
        .map(|p| match p.parse() {
            Ok(s) => Ok(s),
            Err(e) => bail!("`--patterns`: {e}"),
        })
        .collect()
}

fn densities(args: &[String]) -> Result<Vec<f64>> {
    match arg_list(args, "--densities")? {
        None => Ok(DENSITIES.to_vec()),
        Some(v) => v
            .iter()
            .map(|x| match x.parse::<f64>() {
                Ok(s) if s > 0.0 && s <= 1.0 => Ok(s),
                _ => bail!("`--densities` takes numbers in (0, 1], got `{x}`"),
            })
            .collect(),
    }
}

fn main() -> Result<()> {
    flash_ops_bench::reuse_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let lengths = nums(&args, "--n", &[1024, 2048, 4096, 8192, 16384])?;
    let block = match nums(&args, "--block", &[128, 128])?.as_slice() {
        [b] => (*b, *b),
        [bq, bk] => (*bq, *bk),
        _ => bail!("`--block` takes BQ,BK"),
    };
    let default_patterns: Vec<String> = DEFAULT_PATTERNS.split(',').map(String::from).collect();
    let plan = SparsePlan {
        pair_lengths: nums(&args, "--pair-n", &lengths[..1.min(lengths.len())])?,
        lengths,
        heads: num(&args, "--heads", 12)?,
        d: num(&args, "--d", 64)?,
        block,
        densities: densities(&args)?,
        patterns: patterns(&arg_list(&args, "--patterns")?.unwrap_or(default_patterns))?,
        reps: num(&args, "--reps", 3)?,
        max_naive_n: num(&args, "--max-naive-n", 4096)?,
        seed: 0,
    };
    let threads = rayon::current_num_threads();
    println!(
        "# flash-ops CPU block-sparse attention: f32, batch 1, {} heads, d {}, non-causal, blocks {}x{}, {threads} threads, median of {}\n",
        plan.heads, plan.d, block.0, block.1, plan.reps
    );
    println!(
        "CPU: {}; gemm micro-kernels: {}; flash-ops kernels: {}\n",
        cpu_model(),
        gemm_path(),
        kernel_path()
    );
    let rows = sweep(&plan, |r| println!("- {r}"))?;
    report(&plan, &rows);
    if let Some(path) = arg_list(&args, "--json")?.map(|v| v.join(",")) {
        // Relative to the package folder, where `cargo bench` runs the harness.
        if let Err(e) = std::fs::write(&path, json(&plan, &rows)) {
            bail!("`--json`: cannot write {path}: {e}")
        }
        println!("\nwrote {path}");
    }
    Ok(())
}

/// The fit per length, each fitted row's deviation and speedup over dense, and the pair.
fn report(plan: &SparsePlan, rows: &[SparseRow]) {
    println!("\n## Fit time = a + b·density (masked flash V2 rows), per length");
    for &n in &plan.lengths {
        let (fwd, both) = fits(rows, n);
        let at = |c: Case| rows.iter().find(|r| r.n == n && r.case == c);
        let dense = at(Case::Dense);
        for (pass, fit, is_fwd) in [("fwd", fwd, true), ("fwd+bwd", both, false)] {
            let time = |r: &SparseRow| if is_fwd { r.fwd_ms } else { r.fwd_bwd_ms };
            let pct = |x: Option<f64>| x.map_or("–".into(), |x| format!("{:+.1}%", 100.0 * x));
            let Some(f) = fit else { continue };
            let parts: Vec<String> = rows
                .iter()
                .filter(|r| r.n == n && r.case.fitted())
                .map(|r| {
                    format!(
                        "{} (s {:.3}): {:+.1}% off the fit, {:.2}× dense, {} vs proportional \
                         ({} without Candle's autograd share)",
                        r.label,
                        r.density,
                        100.0 * f.deviation(r.density, time(r)),
                        dense.map_or(f64::NAN, |d| time(d) / time(r)),
                        pct(off_proportional(rows, r, is_fwd, false)),
                        pct(off_proportional(rows, r, is_fwd, true)),
                    )
                })
                .collect();
            println!(
                "- N={n} {pass}: a = {:.2} ms, b = {:.2} ms (a/(a+b) = {:.1}%); {}",
                f.a,
                f.b,
                100.0 * f.a / (f.a + f.b),
                parts.join("; ")
            );
        }
        if let (Some(full), Some(partial)) = (at(Case::AllFull), at(Case::AllPartial)) {
            println!(
                "- N={n} same blocks (density {:.3}), all partial / all full: fwd {:.2}×, fwd+bwd {:.2}×",
                full.density,
                partial.fwd_ms / full.fwd_ms,
                partial.fwd_bwd_ms / full.fwd_bwd_ms
            );
        }
        if let (Some(d), Some(nv)) = (dense, at(Case::Naive)) {
            println!(
                "- N={n} dense flash V2 vs naive: fwd {:.2}×, fwd+bwd {:.2}× faster",
                nv.fwd_ms / d.fwd_ms,
                nv.fwd_bwd_ms / d.fwd_bwd_ms
            );
        }
    }
}

fn num_json(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.4}")
    } else {
        "null".into()
    }
}

/// The result file `repro` reads back (`repro` measures the same sweep itself).
fn json(plan: &SparsePlan, rows: &[SparseRow]) -> String {
    let items: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{{\"n\":{},\"heads\":{},\"d\":{},\"case\":\"{}\",\"label\":\"{}\",\"density\":{},\"full_blocks\":{},\"partial_blocks\":{},\"fwd_ms\":{},\"fwd_bwd_ms\":{}}}",
                r.n,
                plan.heads,
                plan.d,
                r.case.key(),
                r.label,
                num_json(r.density),
                r.blocks.0,
                r.blocks.1,
                num_json(r.fwd_ms),
                num_json(r.fwd_bwd_ms)
            )
        })
        .collect();
    format!("[\n{}\n]\n", items.join(",\n"))
}
