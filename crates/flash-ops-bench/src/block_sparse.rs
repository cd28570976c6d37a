//! Block-sparse attention (FlashAttention §3.3): forward and forward+backward time of flash V2
//! against the fraction of key blocks visited, beside dense flash V2 and naive attention in the
//! same run, and the least-squares line `time = a + b·density` the paper's IO analysis predicts
//! (Θ(Nd + N²d²M⁻¹·s) for density s). `cargo bench --bench block_sparse` and `repro --only
//! blocksparse` both measure through [`sweep`].

use std::fmt;

use candle_core::{bail, DType, Device, Result};
use flash_ops::BlockMask;
use flash_ops_models::Sparsity;

use crate::{median, time_once, Variant, Workload};

/// The densities of the random-block rows: 1, 1/2, 1/4, 1/8, 1/16 (the sweep).
pub const DENSITIES: [f64; 5] = [1.0, 0.5, 0.25, 0.125, 0.0625];

/// The random-block density of the full-vs-partial pair.
const PAIR_DENSITY: f64 = 0.25;

/// What a row measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Case {
    /// Flash V2 without a block mask.
    Dense,
    /// Standard attention without a block mask.
    Naive,
    /// No attention: Candle's share of a row's time ([`crate::time_once`] with no variant), the same at
    /// every density.
    Autograd,
    /// Flash V2 with whole random blocks at a density.
    Random,
    /// Flash V2 with a named pattern (`Sparsity`) at its own density.
    Pattern,
    /// Flash V2, the full-vs-partial pair's block set as full blocks (no element mask).
    AllFull,
    /// The same block set, every block partial: the element mask of every bit but one (the last
    /// element of each block) set, so the work is that of `AllFull` plus the masking.
    AllPartial,
}

impl Case {
    /// In the order [`sweep`] measures them.
    pub const ALL: [Case; 7] = [
        Case::Dense,
        Case::Autograd,
        Case::Random,
        Case::Pattern,
        Case::AllFull,
        Case::AllPartial,
        Case::Naive,
    ];

    /// The name in result files.
    pub fn key(self) -> &'static str {
        match self {
            Case::Dense => "dense-v2",
            Case::Naive => "naive",
            Case::Autograd => "autograd",
            Case::Random => "random",
            Case::Pattern => "pattern",
            Case::AllFull => "all-full",
            Case::AllPartial => "all-partial",
        }
    }

    pub fn parse(key: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.key() == key)
    }

    /// Whether the row takes part in the fit (the masked flash V2 rows of the sweep).
    pub fn fitted(self) -> bool {
        matches!(self, Case::Random | Case::Pattern)
    }
}

/// What [`sweep`] measures.
#[derive(Clone, Debug)]
pub struct SparsePlan {
    pub lengths: Vec<usize>,
    pub heads: usize,
    pub d: usize,
    /// Block size of the random rows and of the full-vs-partial pair.
    pub block: (usize, usize),
    pub densities: Vec<f64>,
    /// Named patterns, each with its own block size.
    pub patterns: Vec<Sparsity>,
    pub reps: usize,
    /// Naive attention runs up to this length (its N×N matrices: the memory budget).
    pub max_naive_n: usize,
    /// Lengths of the full-vs-partial pair (its all-partial mask is built element by element).
    pub pair_lengths: Vec<usize>,
    pub seed: u64,
}

/// One measured row.
#[derive(Clone, Debug)]
pub struct SparseRow {
    pub n: usize,
    pub case: Case,
    /// The pattern (`Sparsity`'s text) or the random density, as tables print it.
    pub label: String,
    /// Listed blocks / all blocks (1 for the unmasked rows).
    pub density: f64,
    /// (full, partial) listed blocks; (0, 0) without a mask.
    pub blocks: (usize, usize),
    pub fwd_ms: f64,
    pub fwd_bwd_ms: f64,
}

/// The progress line of a row.
impl fmt::Display for SparseRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "N {} {} {}: density {:.4} ({}/{} full/partial blocks), fwd {:.1} ms, fwd+bwd {:.1} ms",
            self.n,
            self.case.key(),
            self.label,
            self.density,
            self.blocks.0,
            self.blocks.1,
            self.fwd_ms,
            self.fwd_bwd_ms
        )
    }
}

/// `time = a + b·density`, least squares.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fit {
    pub a: f64,
    pub b: f64,
}

impl Fit {
    /// The least-squares line through `(density, time)` points; `None` under two distinct
    /// densities.
    pub fn of(points: &[(f64, f64)]) -> Option<Fit> {
        let n = points.len() as f64;
        let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
        let my = points.iter().map(|p| p.1).sum::<f64>() / n;
        let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
        let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
        if points.len() < 2 || sxx <= 1e-12 * n {
            return None;
        }
        let b = sxy / sxx;
        Some(Fit { a: my - b * mx, b })
    }

    pub fn at(&self, density: f64) -> f64 {
        self.a + self.b * density
    }

    /// `(time − fit) / fit` at `density`.
    pub fn deviation(&self, density: f64, time: f64) -> f64 {
        (time - self.at(density)) / self.at(density)
    }
}

/// The fits (forward, forward+backward) of the fitted rows at length `n`.
pub fn fits(rows: &[SparseRow], n: usize) -> (Option<Fit>, Option<Fit>) {
    let at_n = || rows.iter().filter(|r| r.n == n && r.case.fitted());
    let fwd: Vec<_> = at_n().map(|r| (r.density, r.fwd_ms)).collect();
    let both: Vec<_> = at_n().map(|r| (r.density, r.fwd_bwd_ms)).collect();
    (Fit::of(&fwd), Fit::of(&both))
}

/// A row's time against proportionality at its length: `time / (density × dense time) − 1`,
/// forward (`fwd`) or forward+backward; with `op`, the [`Case::Autograd`] row's time taken off
/// both first (the attention op's own time). `None` without the rows it needs.
pub fn off_proportional(rows: &[SparseRow], r: &SparseRow, fwd: bool, op: bool) -> Option<f64> {
    let time = |r: &SparseRow| if fwd { r.fwd_ms } else { r.fwd_bwd_ms };
    let at = |c: Case| rows.iter().find(|x| x.n == r.n && x.case == c).map(time);
    let base = if op { at(Case::Autograd)? } else { 0.0 };
    Some((time(r) - base) / (r.density * (at(Case::Dense)? - base)) - 1.0)
}

/// The all-partial twin of `mask`: the same blocks, each with every bit set but its last.
fn all_partial(mask: &BlockMask) -> Result<BlockMask> {
    let (bq, bk) = mask.block_size();
    BlockMask::from_predicate(
        mask.q_len(),
        mask.k_len(),
        (bq, bk),
        mask.batch(),
        mask.heads(),
        |b, h, i, j| mask.visible(b, h, i, j) && !(i % bq == bq - 1 && j % bk == bk - 1),
    )
}

/// Measures every row of `plan` (flash V2 with and without masks, naive, the pair), f32 on the
/// CPU, calling `on_row` as each is done.
///
/// Interleaved: per length, `reps` rounds, each timing every case once (the first round after
/// each case's warm-up), and a row is the per-pass median over the rounds. This machine's speed
/// drifts by ±15% over minutes; timed one case after another, that drift lands between a masked
/// row and the dense row it is compared with (8K, 1/16: +14% … +32% off proportional over five
/// runs, results/blocksparse-8k-repeats-2026-12-02.txt and runs c, d), in rounds on every case.
pub fn sweep(plan: &SparsePlan, mut on_row: impl FnMut(&SparseRow)) -> Result<Vec<SparseRow>> {
    if plan.densities.iter().any(|&s| !(s > 0.0 && s <= 1.0)) {
        bail!(
            "block-sparse sweep: densities must be in (0, 1], got {:?}",
            plan.densities
        )
    }
    if plan.reps == 0 {
        bail!("block-sparse sweep: `reps` must be at least 1, got 0")
    }
    let (dev, dtype) = (Device::Cpu, DType::F32);
    // One timing of (fwd, fwd+bwd) in ms; the first round warms each case up.
    let time = |n: usize, case: Case, mask: &Option<BlockMask>, warm_up: bool| {
        let w = Workload::new(1, plan.heads, n, plan.d, false);
        let mut opts = w.options();
        if let Some(m) = mask {
            opts = opts.block_mask(m.clone());
        }
        let v = match case {
            Case::Autograd => None,
            Case::Naive => Some(Variant::Naive),
            _ => Some(Variant::V2),
        };
        time_once(v, &w, &opts, warm_up, (&dev, dtype))
    };
    let mut rows = Vec::new();
    let mut measure = |n: usize, cases: &[(Case, String, Option<BlockMask>)]| -> Result<()> {
        let mut times = vec![Vec::new(); cases.len()];
        for round in 0..plan.reps {
            for ((case, _, mask), t) in cases.iter().zip(&mut times) {
                t.push(time(n, *case, mask, round == 0)?);
            }
        }
        for ((case, label, mask), t) in cases.iter().zip(times) {
            let (fwd, both): (Vec<f64>, Vec<f64>) = t.into_iter().unzip();
            let (density, blocks) = match mask {
                Some(m) => (m.density(), m.counts()),
                None => (1.0, (0, 0)),
            };
            let row = SparseRow {
                n,
                case: *case,
                label: label.clone(),
                density,
                blocks,
                fwd_ms: median(&fwd).unwrap_or(f64::NAN),
                fwd_bwd_ms: median(&both).unwrap_or(f64::NAN),
            };
            on_row(&row);
            rows.push(row);
        }
        Ok(())
    };
    for &n in &plan.lengths {
        let mut cases = vec![
            (Case::Dense, "dense".to_string(), None),
            (Case::Autograd, "pass-through".to_string(), None),
        ];
        for &s in &plan.densities {
            let m = BlockMask::random(n, n, plan.block, plan.heads, s, plan.seed)?;
            cases.push((Case::Random, format!("random {s}"), Some(m)));
        }
        for p in &plan.patterns {
            if let Some(m) = p.mask(n, plan.heads, false)? {
                cases.push((Case::Pattern, p.to_string(), Some(m)));
            }
        }
        if plan.pair_lengths.contains(&n) {
            let full = BlockMask::random(n, n, plan.block, plan.heads, PAIR_DENSITY, plan.seed)?;
            let partial = all_partial(&full)?;
            let label = format!("random {PAIR_DENSITY}");
            cases.push((Case::AllFull, label.clone(), Some(full)));
            cases.push((Case::AllPartial, label, Some(partial)));
        }
        measure(n, &cases)?;
    }
    // Naive last, after every flash row: its N×N temporaries leave the heap holding GBs that
    // later allocations fault back in (naive first: a 1K–4K sweep spent 150 s of its 296 in the
    // kernel and `random 1` ran at 0.77× dense at 4K; naive last: 1.06×, results/).
    for &n in plan.lengths.iter().filter(|&&n| n <= plan.max_naive_n) {
        measure(n, &[(Case::Naive, "dense".to_string(), None)])?;
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_recovers_a_line_and_its_deviations() {
        let pts = [(1.0, 12.0), (0.5, 7.0), (0.25, 4.5), (0.0625, 2.625)];
        let f = Fit::of(&pts).unwrap();
        assert!(
            (f.a - 2.0).abs() < 1e-12 && (f.b - 10.0).abs() < 1e-12,
            "{f:?}"
        );
        assert!((f.deviation(0.5, 7.7) - 0.1).abs() < 1e-12);
        assert_eq!(Fit::of(&[(0.5, 1.0), (0.5, 2.0)]), None);
        assert_eq!(Fit::of(&[(0.5, 1.0)]), None);
    }

    /// Against proportionality: raw, and with the autograd row's time taken off both sides.
    #[test]
    fn off_proportional_takes_the_autograd_share_off_both_sides() {
        let row = |case, density, fwd_ms, fwd_bwd_ms| SparseRow {
            n: 8,
            case,
            label: String::new(),
            density,
            blocks: (0, 0),
            fwd_ms,
            fwd_bwd_ms,
        };
        let rows = [
            row(Case::Dense, 1.0, 100.0, 410.0),
            row(Case::Autograd, 1.0, 2.0, 10.0),
            row(Case::Random, 0.25, 30.0, 110.0),
        ];
        let r = &rows[2];
        let close = |x: Option<f64>, want: f64| (x.unwrap() - want).abs() < 1e-12;
        assert!(close(off_proportional(&rows, r, true, false), 0.2));
        assert!(close(
            off_proportional(&rows, r, false, false),
            110.0 / 102.5 - 1.0
        ));
        assert!(close(off_proportional(&rows, r, false, true), 0.0));
        // No autograd row (older result files): only the raw figure.
        assert_eq!(off_proportional(&rows[..1], &rows[0], false, true), None);
        assert!(close(
            off_proportional(&rows[..1], &rows[0], false, false),
            0.0
        ));
    }

    #[test]
    fn case_keys_round_trip() {
        for c in Case::ALL {
            assert_eq!(Case::parse(c.key()), Some(c));
        }
    }

    /// Every case on a tiny problem: the pair has the same blocks, one all full, one all
    /// partial; densities are the masks'.
    #[test]
    fn sweep_measures_every_case_on_a_tiny_problem() -> Result<()> {
        let plan = SparsePlan {
            lengths: vec![64],
            heads: 2,
            d: 16,
            block: (16, 16),
            densities: vec![1.0, 0.25],
            patterns: vec!["butterfly@16x16".parse().unwrap()],
            reps: 2,
            max_naive_n: 64,
            pair_lengths: vec![64],
            seed: 1,
        };
        let zero = SparsePlan {
            reps: 0,
            ..plan.clone()
        };
        let err = sweep(&zero, |_| {}).unwrap_err().to_string();
        assert!(err.contains("`reps`"), "{err}");
        // Two rounds, one row per case: the rounds are reduced, not listed.
        let rows = sweep(&plan, |_| {})?;
        let mut keys: Vec<_> = rows.iter().map(|r| r.case).collect();
        keys.dedup();
        assert_eq!(keys, Case::ALL);
        let pair = |c: Case| rows.iter().find(|r| r.case == c).unwrap();
        let (full, partial) = (pair(Case::AllFull), pair(Case::AllPartial));
        assert_eq!(full.density, partial.density);
        assert_eq!(full.blocks, (partial.blocks.1, 0));
        assert_eq!(partial.blocks.0, 0);
        assert_eq!(pair(Case::Random).density, 1.0);
        assert!(rows.iter().all(|r| r.fwd_ms > 0.0 && r.fwd_bwd_ms > 0.0));
        Ok(())
    }
}
