//! Block-sparse FlashAttention (FlashAttention 2022, §3.3; issue 12), on the CPU in f32 in every
//! mode: flash V2 forward and forward+backward time against the fraction of key blocks visited
//! (random blocks 1 … 1/16 and the named patterns), beside dense flash V2 and naive attention in
//! the same run, the fit `time = a + b·density`, and the full-vs-partial pair; measured by
//! `flash_ops_bench::block_sparse::sweep`, the same sweep as `cargo bench --bench block_sparse`.

use std::fmt::Write;
use std::path::Path;

use anyhow::Result;
use flash_ops_bench::block_sparse::{
    fits, off_proportional, sweep, Case, SparsePlan, SparseRow, DENSITIES,
};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::plan::Mode;
use crate::plot::{e, line_chart_x, Line};

/// FlashAttention (2022) §4 / Fig. 2 right: block-sparse (butterfly) over dense FlashAttention,
/// fwd+bwd, A100 (`shared/paper-numbers.md`). A reference, not our measurement.
pub const FA1_BLOCK_SPARSE_SPEEDUP: [(usize, f64); 3] = [(1024, 2.6), (2048, 4.5), (4096, 9.4)];

/// What the section measures in a mode.
fn plan(mode: Mode, reps: Option<usize>) -> SparsePlan {
    let patterns = |list: &[&str]| {
        list.iter()
            .map(|p| p.parse().expect("a valid pattern"))
            .collect()
    };
    let p = match mode {
        Mode::Quick => SparsePlan {
            lengths: vec![256],
            heads: 2,
            d: 64,
            block: (32, 32),
            densities: DENSITIES.to_vec(),
            patterns: patterns(&["butterfly@32x32", "local:64@32x32"]),
            reps: 1,
            max_naive_n: 256,
            pair_lengths: vec![256],
            seed: 0,
        },
        // The grid (B1 H12 d64, 128×128 blocks, N 1K–16K): at 16K dense V2 fwd+bwd
        // is ~33 s on 2 cores and each length runs ~5× that per repeat, so ~12 min at 2 reps.
        Mode::Full | Mode::Gpu => SparsePlan {
            lengths: vec![1024, 2048, 4096, 8192, 16384],
            heads: 12,
            d: 64,
            block: (128, 128),
            densities: DENSITIES.to_vec(),
            patterns: patterns(&[
                "butterfly",
                "local:512",
                "strided:256",
                "local-global:256,128",
            ]),
            reps: 3,
            max_naive_n: 4096,
            pair_lengths: vec![2048],
            seed: 0,
        },
    };
    SparsePlan {
        reps: reps.map_or(p.reps, |r| r.max(1)),
        ..p
    }
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Row {
    pub n: usize,
    /// `flash_ops_bench::block_sparse::Case` key.
    pub case: String,
    pub label: String,
    pub density: f64,
    pub full_blocks: usize,
    pub partial_blocks: usize,
    pub fwd_ms: f64,
    pub fwd_bwd_ms: f64,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct BlockSparseSection {
    pub heads: usize,
    pub d: usize,
    pub block: (usize, usize),
    pub reps: usize,
    pub rows: Vec<Row>,
}

pub fn measure(mode: Mode, reps: Option<usize>) -> Result<BlockSparseSection> {
    let p = plan(mode, reps);
    let rows = sweep(&p, |r| println!("  {r}"))?;
    Ok(BlockSparseSection {
        heads: p.heads,
        d: p.d,
        block: p.block,
        reps: p.reps,
        rows: rows
            .into_iter()
            .map(|r| Row {
                n: r.n,
                case: r.case.key().into(),
                label: r.label,
                density: r.density,
                full_blocks: r.blocks.0,
                partial_blocks: r.blocks.1,
                fwd_ms: r.fwd_ms,
                fwd_bwd_ms: r.fwd_bwd_ms,
            })
            .collect(),
    })
}

/// A row back in the sweep's form.
fn sweep_row(r: &Row, case: Case) -> SparseRow {
    SparseRow {
        n: r.n,
        case,
        label: r.label.clone(),
        density: r.density,
        blocks: (r.full_blocks, r.partial_blocks),
        fwd_ms: r.fwd_ms,
        fwd_bwd_ms: r.fwd_bwd_ms,
    }
}

/// The rows back in the sweep's form (for its fit).
fn sweep_rows(s: &BlockSparseSection) -> Vec<SparseRow> {
    s.rows
        .iter()
        .filter_map(|r| Some(sweep_row(r, Case::parse(&r.case)?)))
        .collect()
}

fn lengths(s: &BlockSparseSection) -> Vec<usize> {
    // Sorted: the sweep measures naive last, after every length's flash rows.
    let mut v: Vec<usize> = s.rows.iter().map(|r| r.n).collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn find(s: &BlockSparseSection, n: usize, case: Case) -> impl Iterator<Item = &Row> {
    s.rows
        .iter()
        .filter(move |r| r.n == n && r.case == case.key())
}

/// The markdown of the section, beside the paper's claim.
pub fn table(s: &BlockSparseSection) -> String {
    let mut o = String::new();
    let (bq, bk) = s.block;
    writeln!(
        o,
        "## Block-sparse attention (FlashAttention §3.3)\n\n\
         Flash V2 with a block mask, f32, batch 1, {} heads, d {}, non-causal, median of {} \
         repeats: random whole blocks ({bq}×{bk}) at each density and the named patterns at \
         their own, against dense flash V2 and naive attention in the same run. `fit`: least \
         squares `time = a + b·density` over the masked rows of that length; `off fit`: the \
         row's deviation from it. `autograd`: the same step with an op that does no attention \
         (output a copy of q, gradients handed on): Candle's share of every row (the loss, the \
         output's gradient, the inputs' gradient sums), which does not shrink with the density. \
         `vs proportional`: the row's time over density × dense time, − 1, forward, \
         forward+backward, and forward+backward with the autograd row's time taken off both \
         (the op's own kernels). Paper (A100, butterfly, fwd+bwd): block-sparse over dense \
         FlashAttention {}; the IO analysis predicts time about linear in the density. Target \
         (issue 12): proportional within 15% down to 1/16.\n",
        s.heads,
        s.d,
        s.reps,
        FA1_BLOCK_SPARSE_SPEEDUP
            .iter()
            .map(|(n, x)| format!("{x}× at {}K", n / 1024))
            .collect::<Vec<_>>()
            .join(", ")
    )
    .ok();
    writeln!(
        o,
        "| N | rows | density | full/partial | fwd ms | fwd+bwd ms | fwd+bwd vs dense | off fit (fwd / fwd+bwd) | vs proportional (fwd / fwd+bwd / op fwd+bwd) |"
    )
    .ok();
    writeln!(o, "|---|---|---|---|---|---|---|---|---|").ok();
    let rows = sweep_rows(s);
    for n in lengths(s) {
        let (fwd, both) = fits(&rows, n);
        let dense = find(s, n, Case::Dense).next().map(|r| r.fwd_bwd_ms);
        for r in s.rows.iter().filter(|r| r.n == n) {
            let case = Case::parse(&r.case);
            let fitted = case.is_some_and(|c| c.fitted());
            let off = match (fwd, both) {
                (Some(f), Some(b)) if fitted => format!(
                    "{:+.0}% / {:+.0}%",
                    100.0 * f.deviation(r.density, r.fwd_ms),
                    100.0 * b.deviation(r.density, r.fwd_bwd_ms)
                ),
                _ => "–".into(),
            };
            let masked = matches!(
                case,
                Some(Case::Random | Case::Pattern | Case::AllFull | Case::AllPartial)
            );
            let prop = match case {
                Some(c) if masked => {
                    let r = sweep_row(r, c);
                    let pct = |fwd, op| {
                        off_proportional(&rows, &r, fwd, op)
                            .map_or("–".into(), |x| format!("{:+.0}%", 100.0 * x))
                    };
                    format!(
                        "{} / {} / {}",
                        pct(true, false),
                        pct(false, false),
                        pct(false, true)
                    )
                }
                _ => "–".into(),
            };
            let what = match case {
                Some(Case::Random | Case::Pattern) => r.label.clone(),
                Some(Case::Dense | Case::Naive | Case::Autograd) => r.case.clone(),
                _ => format!("{} ({})", r.case, r.label),
            };
            let vs_dense = match dense {
                Some(d) if case != Some(Case::Autograd) => format!("{:.2}×", d / r.fwd_bwd_ms),
                _ => "–".into(),
            };
            writeln!(
                o,
                "| {n} | {what} | {:.3} | {}/{} | {:.1} | {:.1} | {vs_dense} | {off} | {prop} |",
                r.density, r.full_blocks, r.partial_blocks, r.fwd_ms, r.fwd_bwd_ms,
            )
            .ok();
        }
        for (pass, f) in [("fwd", fwd), ("fwd+bwd", both)] {
            if let Some(f) = f {
                writeln!(
                    o,
                    "| {n} | fit {pass} | a = {:.1} ms | b = {:.1} ms | a/(a+b) = {:.0}% | | | | |",
                    f.a,
                    f.b,
                    100.0 * f.a / (f.a + f.b)
                )
                .ok();
            }
        }
    }
    for n in lengths(s) {
        if let (Some(full), Some(partial)) = (
            find(s, n, Case::AllFull).next(),
            find(s, n, Case::AllPartial).next(),
        ) {
            writeln!(
                o,
                "\nFull vs partial blocks at N={n} (the same {} blocks, density {:.3}): all \
                 partial takes {:.2}× the time of all full forward, {:.2}× forward+backward.",
                full.full_blocks,
                full.density,
                partial.fwd_ms / full.fwd_ms,
                partial.fwd_bwd_ms / full.fwd_bwd_ms
            )
            .ok();
        }
    }
    o
}

/// `blocksparse.png`: fwd+bwd speedup over dense flash V2 against 1/density (random blocks, one
/// line per length; the ideal `speedup = 1/density` thin), and the butterfly pattern's speedup
/// against length beside the paper's.
pub fn plot(s: &BlockSparseSection, out: &Path) -> Result<()> {
    if s.rows.is_empty() {
        return Ok(());
    }
    let root = BitMapBackend::new(out, (1120, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let panels = root.split_evenly((1, 2));
    let palette = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    let speedup = |n: usize, r: &Row| {
        let dense = find(s, n, Case::Dense).next()?;
        Some(dense.fwd_bwd_ms / r.fwd_bwd_ms)
    };
    let mut lines: Vec<Line> = lengths(s)
        .into_iter()
        .enumerate()
        .map(|(i, n)| Line {
            label: format!("N = {n}"),
            colour: palette[i % palette.len()],
            points: find(s, n, Case::Random)
                .filter_map(|r| Some((1.0 / r.density, speedup(n, r)?)))
                .collect(),
            paper: false,
        })
        .collect();
    lines.push(Line {
        label: "ideal: 1 / density".into(),
        colour: BLACK,
        points: DENSITIES.iter().map(|d| (1.0 / d, 1.0 / d)).collect(),
        paper: true,
    });
    line_chart_x(
        &panels[0],
        "fwd+bwd speedup over dense flash V2, random blocks",
        "1 / density",
        "speedup (×)",
        &lines,
        true,
        None,
    )?;
    let butterfly: Vec<(f64, f64)> = lengths(s)
        .into_iter()
        .flat_map(|n| {
            find(s, n, Case::Pattern)
                .filter(|r| r.label.starts_with("butterfly"))
                .filter_map(move |r| Some((n as f64, speedup(n, r)?)))
                .collect::<Vec<_>>()
        })
        .collect();
    let lines = [
        Line {
            label: "ours (butterfly, CPU f32)".into(),
            colour: BLUE,
            points: butterfly,
            paper: false,
        },
        Line {
            label: "paper (butterfly, A100)".into(),
            colour: RED,
            points: FA1_BLOCK_SPARSE_SPEEDUP
                .iter()
                .map(|&(n, x)| (n as f64, x))
                .collect(),
            paper: true,
        },
    ];
    line_chart_x(
        &panels[1],
        "butterfly: fwd+bwd speedup over dense",
        "sequence length",
        "speedup (×)",
        &lines,
        false,
        Some("1× (dense)"),
    )?;
    root.present().map_err(e)?;
    Ok(())
}
