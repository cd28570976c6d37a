//! Markdown tables from `results.json`, each beside the published numbers.

use std::fmt::Write;

use flash_ops_bench::Variant;

use crate::paper;
use crate::results::{AttnRow, AttnSection, E2eSection, Fa2Section, Results};

/// The plots (file, title) of the sections a results file holds: a run of some sections links
/// only the plots it drew.
fn plots(r: &Results) -> Vec<(&'static str, &'static str)> {
    let mut v = Vec::new();
    if r.attention.is_some() {
        v.push((
            "speedup.png",
            "Attention fwd+bwd speedup over standard attention vs sequence length",
        ));
        v.push((
            "memory.png",
            "Attention fwd+bwd peak memory vs sequence length (log scale)",
        ));
    }
    if r.fa2.is_some() {
        v.push((
            "fa2_fwd_bwd.png",
            "Forward+backward GFLOP/s (FlashAttention-2 Fig. 4 layout)",
        ));
        v.push((
            "fa2_fwd.png",
            "Forward GFLOP/s (FlashAttention-2 Fig. 5 layout)",
        ));
        v.push((
            "fa2_bwd.png",
            "Backward GFLOP/s (FlashAttention-2 Fig. 6 layout)",
        ));
    }
    // One figure per section, present when the section is.
    let single = [
        (r.e2e.is_some(), "e2e.png", "End-to-end training throughput per attention kind"),
        (
            r.prefix.is_some(),
            "prefix.png",
            "Shared-prefix decoding: attention speedup vs prefix length, sampling tokens/s vs batch",
        ),
        (
            r.blocksparse.is_some(),
            "blocksparse.png",
            "Block-sparse attention: fwd+bwd speedup over dense vs 1/density, butterfly vs length",
        ),
        (
            r.context.is_some(),
            "context.png",
            "GPT-2 validation perplexity and time per token vs context length",
        ),
        (r.listops.is_some(), "listops.png", "ListOps validation accuracy vs wall-clock time"),
    ];
    v.extend(single.into_iter().filter(|s| s.0).map(|(_, f, c)| (f, c)));
    v
}

/// A result file's variant key as tables and plots name it.
fn variant_label(key: &str) -> &str {
    Variant::parse(key).map_or(key, |v| v.name())
}

/// The row of `variant` at length `n`, head dim `d`, in one setting.
pub fn find(
    rows: &[AttnRow],
    variant: Variant,
    n: usize,
    d: usize,
    causal: bool,
    dropout: bool,
) -> Option<&AttnRow> {
    rows.iter().find(|r| {
        r.variant == variant.key()
            && r.n == n
            && r.d == d
            && r.causal == causal
            && r.dropout_and_padding == dropout
    })
}

fn opt(x: Option<f64>, prec: usize) -> String {
    x.map_or("–".into(), |v| format!("{v:.prec$}"))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn mb(b: Option<u64>) -> Option<f64> {
    b.map(|b| b as f64 / 1e6)
}

fn settings_label(dropout: bool) -> &'static str {
    if dropout {
        "dropout + mask"
    } else {
        "neither"
    }
}

pub fn device_words(r: &Results) -> String {
    if r.meta.device == "cpu" {
        // Runs from before the gemm path was recorded render as they did.
        let gemm = r
            .meta
            .gemm_path
            .as_ref()
            .map_or(String::new(), |g| format!(", gemm {g}"));
        format!(
            "CPU ({}, {} threads{gemm}), {}",
            r.meta.cpu, r.meta.threads, r.meta.dtype
        )
    } else {
        format!("{} ({}), {}", r.meta.device, r.meta.cpu, r.meta.dtype)
    }
}

/// "CPU f32" / "CUDA bf16": the device and dtype in a plot legend's few words.
pub fn device_short(r: &Results) -> String {
    let dev = if r.meta.device == "cpu" {
        "CPU"
    } else {
        "CUDA"
    };
    format!("{dev} {}", r.meta.dtype)
}

/// What the memory columns count: heap bytes on the CPU, the memory pool on CUDA.
fn memory_words(r: &Results) -> &'static str {
    if r.meta.device == "cpu" {
        "peak extra heap during forward+backward (counting allocator)"
    } else {
        "peak extra device memory during forward+backward (CUDA memory pool high-water mark)"
    }
}

fn quick_warning(r: &Results) -> &'static str {
    if r.meta.mode == "quick" {
        "\n> **Quick mode**: tiny smoke-test sizes, not a reproduction; do not read anything into these numbers.\n"
    } else {
        ""
    }
}

/// Table 1 (speedup) and its per-cell detail.
pub fn table1(r: &Results, s: &AttnSection) -> String {
    let mut o = String::new();
    let reps = s.rows.first().map_or(0, |x| x.reps);
    writeln!(o, "## Table 1 — attention speedup over standard attention (FlashAttention 2022, §4.3 / Appendix E protocol)\n").ok();
    writeln!(
        o,
        "Ours: {}, batch {}, {} heads, d {}, dropout p={} with key-padding mask (batch element i keeps N − i·N/(4·batch) keys) or neither; median of {reps} after a warm-up. \
Standard attention = Candle naive attention (matmul → softmax → matmul, autograd backward). \
Paper: A100-40GB, fp16, batch 16, 8 heads, d 64, FlashAttention vs PyTorch attention. \
Scale-down: {}× fewer sequences×heads (batch·heads {} vs 128).",
        device_words(r),
        s.setup.batch,
        s.setup.heads,
        s.setup.d,
        s.setup.dropout,
        (16 * 8) as f64 / (s.setup.batch * s.setup.heads) as f64,
        s.setup.batch * s.setup.heads
    )
    .ok();
    writeln!(
        o,
        "\nForward+backward speedup over standard attention (× faster):\n"
    )
    .ok();
    let mut head = "| setting | implementation |".to_string();
    let mut sep = "|---|---|".to_string();
    for n in &s.setup.lengths {
        write!(head, " {n} |").ok();
        sep.push_str("---|");
    }
    writeln!(o, "{head}\n{sep}").ok();
    for dropout in [true, false] {
        for v in [Variant::V2, Variant::V1] {
            write!(o, "| {} | ours: {} |", settings_label(dropout), v.name()).ok();
            for &n in &s.setup.lengths {
                let f = find(&s.rows, v, n, s.setup.d, false, dropout).and_then(|x| x.fwd_bwd_ms);
                let b = find(&s.rows, Variant::Naive, n, s.setup.d, false, dropout)
                    .and_then(|x| x.fwd_bwd_ms);
                write!(o, " {} |", opt(ratio(b, f), 2)).ok();
            }
            writeln!(o).ok();
        }
        let paper = if dropout {
            paper::FA1_SPEEDUP_DROPOUT_MASK
        } else {
            paper::FA1_SPEEDUP_PLAIN
        };
        write!(
            o,
            "| {} | paper: FlashAttention, A100 |",
            settings_label(dropout)
        )
        .ok();
        for n in &s.setup.lengths {
            let p = paper::FA1_LENGTHS
                .iter()
                .position(|l| l == n)
                .map(|i| paper[i]);
            write!(o, " {} |", opt(p, 2)).ok();
        }
        writeln!(o).ok();
    }
    writeln!(o, "\nPer cell (ms; speedup = naive time / this time):\n").ok();
    writeln!(o, "| seq | setting | implementation | fwd ms | bwd ms | fwd+bwd ms | fwd speedup | bwd speedup | fwd+bwd speedup |").ok();
    writeln!(o, "|---|---|---|---|---|---|---|---|---|").ok();
    for dropout in [false, true] {
        for &n in &s.setup.lengths {
            let base = find(&s.rows, Variant::Naive, n, s.setup.d, false, dropout);
            for row in s
                .rows
                .iter()
                .filter(|x| x.n == n && x.dropout_and_padding == dropout && x.d == s.setup.d)
            {
                if let Some(why) = &row.skipped {
                    writeln!(
                        o,
                        "| {n} | {} | {} | {why} | | | | | |",
                        settings_label(dropout),
                        variant_label(&row.variant)
                    )
                    .ok();
                    continue;
                }
                writeln!(
                    o,
                    "| {n} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    settings_label(dropout),
                    variant_label(&row.variant),
                    opt(row.fwd_ms, 2),
                    opt(row.bwd_ms(), 2),
                    opt(row.fwd_bwd_ms, 2),
                    opt(ratio(base.and_then(|b| b.fwd_ms), row.fwd_ms), 2),
                    opt(ratio(base.and_then(|b| b.bwd_ms()), row.bwd_ms()), 2),
                    opt(ratio(base.and_then(|b| b.fwd_bwd_ms), row.fwd_bwd_ms), 2),
                )
                .ok();
            }
        }
    }
    o
}

/// The memory table: standard vs flash, up to where standard passes the budget.
pub fn memory(r: &Results, s: &AttnSection) -> String {
    let mut o = String::new();
    writeln!(
        o,
        "## Memory footprint (FlashAttention 2022, Appendix E, Table 21 protocol)\n"
    )
    .ok();
    writeln!(
        o,
        "Ours: {}, {}, batch {}, {} heads, d {}, no dropout or mask. \
Standard attention is not run where its predicted peak passes the memory budget of {} (our \"out of memory\"; predicted from its measured bytes per score element at the largest length it ran); flash runs on (V2 only past the table's lengths, to save time). \
Paper: A100-40GB, fp16, batch 16, 8 heads, d 64, with dropout and masking; {}",
        memory_words(r),
        device_words(r),
        s.setup.batch,
        s.setup.heads,
        s.setup.d,
        crate::measure::bytes(s.memory_budget_bytes as f64),
        paper::FA1_MEMORY_NOTE
    )
    .ok();
    writeln!(o, "\n| seq | standard MB | flash V1 MB | flash V2 MB | standard / flash V2 | paper PyTorch / FlashAttention MB | paper ratio |").ok();
    writeln!(o, "|---|---|---|---|---|---|---|").ok();
    let lengths = s.setup.memory_table_lengths();
    for n in lengths {
        let m = |v: Variant| find(&s.rows, v, n, s.setup.d, false, false);
        let naive = m(Variant::Naive);
        let naive_cell = match naive {
            Some(x) if x.skipped.is_some() => "OOM (over budget)".to_string(),
            Some(x) => opt(mb(x.fwd_bwd_mem_bytes), 1),
            None => "–".into(),
        };
        let v1 = m(Variant::V1).and_then(|x| mb(x.fwd_bwd_mem_bytes));
        let v2 = m(Variant::V2).and_then(|x| mb(x.fwd_bwd_mem_bytes));
        let p = paper::FA1_LENGTHS
            .iter()
            .position(|l| *l == n)
            .map(|i| paper::FA1_MEMORY_MB[i]);
        writeln!(
            o,
            "| {n} | {naive_cell} | {} | {} | {} | {} | {} |",
            opt(v1, 1),
            opt(v2, 1),
            opt(ratio(naive.and_then(|x| mb(x.fwd_bwd_mem_bytes)), v2), 1),
            p.map_or("–".into(), |(a, b)| format!("{a:.0} / {b:.0}")),
            opt(p.map(|(a, b)| a / b), 1),
        )
        .ok();
    }
    o
}

/// Table 2: GFLOP/s fwd, bwd, fwd+bwd per head dim and causality.
pub fn table2(r: &Results, s: &Fa2Section) -> String {
    let mut o = String::new();
    let reps = s.rows.first().map_or(0, |x| x.reps);
    writeln!(
        o,
        "## Table 2 — FlashAttention-2 Fig. 4–6 protocol: attention GFLOP/s\n"
    )
    .ok();
    writeln!(
        o,
        "Ours: {}, batch×seq = {} tokens, hidden {} (heads = hidden/d), median of {reps}. \
FLOPs: forward 4·seq²·d·heads per sequence (halved for causal), backward 2.5× forward, forward+backward 3.5×; naive is credited with the same FLOPs. \
Paper: A100-80GB SXM4, fp16, 16384 tokens, hidden 2048, TFLOP/s (1 TFLOP/s = 1000 GFLOP/s). \
Scale-down: {:.0}× fewer FLOPs per length. This run's {} matmul ceiling: {:.1} GFLOP/s.",
        device_words(r),
        s.setup.tokens,
        s.setup.hidden,
        (16384.0 * 2048.0) / (s.setup.tokens as f64 * s.setup.hidden as f64),
        r.meta.dtype,
        r.meta.gemm_gflops
    )
    .ok();
    let has_nn = s.rows.iter().any(|x| x.variant == Variant::CandleNn.key());
    let has_torch = s.rows.iter().any(|x| x.variant == Variant::TorchSdpa.key());
    if let Some(t) = &s.torch {
        writeln!(
            o,
            "\nPyTorch SDPA column: {t}, the same shapes, protocol and device."
        )
        .ok();
    }
    for &d in &s.setup.head_dims {
        for causal in [false, true] {
            writeln!(
                o,
                "\n### d {d}, {}, {} head(s)\n",
                if causal { "causal" } else { "non-causal" },
                (s.setup.hidden / d).max(1)
            )
            .ok();
            write!(o, "| seq | batch | naive fwd / bwd / fwd+bwd | flash V1 fwd / bwd / fwd+bwd | flash V2 fwd / bwd / fwd+bwd |").ok();
            if has_nn {
                write!(o, " candle-nn fwd |").ok();
            }
            if has_torch {
                write!(o, " PyTorch SDPA fwd / bwd / fwd+bwd |").ok();
            }
            writeln!(
                o,
                " V2/V1 fwd+bwd | paper A100 fwd+bwd TFLOP/s: PyTorch / FA1 / FA2 |"
            )
            .ok();
            writeln!(
                o,
                "|---|---|---|---|---|{}{}---|---|",
                if has_nn { "---|" } else { "" },
                if has_torch { "---|" } else { "" }
            )
            .ok();
            let paper = paper::fa2_paper(d, causal);
            for &n in &s.setup.lengths {
                let cell = |v: Variant| -> String {
                    match find(&s.rows, v, n, d, causal, false) {
                        Some(x) if x.skipped.is_some() => "OOM (over budget)".into(),
                        Some(x) => format!(
                            "{} / {} / {}",
                            opt(x.gflops_fwd(), 1),
                            opt(x.gflops_bwd(), 1),
                            opt(x.gflops_fwd_bwd(), 1)
                        ),
                        None => "–".into(),
                    }
                };
                let batch = find(&s.rows, Variant::V2, n, d, causal, false).map_or(0, |x| x.batch);
                write!(
                    o,
                    "| {n} | {batch} | {} | {} | {} |",
                    cell(Variant::Naive),
                    cell(Variant::V1),
                    cell(Variant::V2)
                )
                .ok();
                if has_nn {
                    let g = find(&s.rows, Variant::CandleNn, n, d, causal, false)
                        .and_then(|x| x.gflops_fwd());
                    write!(o, " {} |", opt(g, 1)).ok();
                }
                if has_torch {
                    write!(o, " {} |", cell(Variant::TorchSdpa)).ok();
                }
                let v1 = find(&s.rows, Variant::V1, n, d, causal, false)
                    .and_then(|x| x.gflops_fwd_bwd());
                let v2 = find(&s.rows, Variant::V2, n, d, causal, false)
                    .and_then(|x| x.gflops_fwd_bwd());
                let p = match (paper, paper::FA2_LENGTHS.iter().position(|l| *l == n)) {
                    (Some(t), Some(i)) => (0..3)
                        .map(|k| match t[k][i] {
                            None => "OOM".to_string(),
                            Some(v) => {
                                let approx =
                                    paper::FA2_READ_FROM_FIGURE.contains(&(d, causal, k, i));
                                format!("{}{v:.0}", if approx { "~" } else { "" })
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(" / "),
                    _ => "–".into(),
                };
                writeln!(o, " {} | {p} |", opt(ratio(v2, v1), 2)).ok();
            }
        }
    }
    o
}

/// Table 3: `train bench` reports.
pub fn table3(r: &Results, s: &E2eSection) -> String {
    let mut o = String::new();
    writeln!(o, "## Table 3 — end-to-end training throughput (FlashAttention Tables 2/4, FlashAttention-2 Table 1 ideas)\n").ok();
    writeln!(
        o,
        "Ours: `train bench` on {}: one training step (forward, backward, AdamW) of our GPT-2 / BERT with each attention kind, same weights and batches, kinds timed in interleaved rounds; median step time. \
Peak RSS is the whole process' (model, optimiser, activations).\n\n{}\n",
        device_words(r),
        paper::MFU_FORMULA
    )
    .ok();
    for run in &s.runs {
        writeln!(o, "### {}\n", run.label).ok();
        let Some(rep) = &run.report else {
            writeln!(
                o,
                "Not measured: {}\n",
                run.error.as_deref().unwrap_or("unknown error")
            )
            .ok();
            continue;
        };
        writeln!(
            o,
            "{:.2}M params, {} tokens per step, {} timed + {} warm-up steps per cell, MFU peak {:.1} GFLOP/s ({}). `train bench {}`\n",
            rep["params"].as_f64().unwrap_or(0.0) / 1e6,
            rep["tokens_per_step"],
            rep["steps"],
            rep["warmup"],
            rep["peak_flops"].as_f64().unwrap_or(0.0) / 1e9,
            rep["peak_source"].as_str().unwrap_or("?"),
            run.args.join(" ")
        )
        .ok();
        writeln!(
            o,
            "| seq | batch | attention | step s | tokens/s | vs naive | peak RSS MiB | MFU |"
        )
        .ok();
        writeln!(o, "|---|---|---|---|---|---|---|---|").ok();
        for row in rep["rows"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                row["seq_len"],
                row["batch"],
                row["attn"].as_str().unwrap_or("?"),
                opt(row["step_s_median"].as_f64(), 3),
                opt(row["tokens_per_s"].as_f64(), 0),
                row["speedup_vs_naive"]
                    .as_f64()
                    .map_or("–".into(), |x| format!("{x:.2}×")),
                opt(row["peak_rss_bytes"].as_f64().map(|b| b / 1048576.0), 0),
                row["mfu"]
                    .as_f64()
                    .map_or("–".into(), |x| format!("{:.1}%", 100.0 * x)),
            )
            .ok();
        }
        writeln!(o).ok();
    }
    writeln!(o, "{}", paper::E2E_REFERENCE).ok();
    o
}

/// The honest sentence: what differs from the papers.
pub fn differences(r: &Results) -> String {
    let hw = if r.meta.device == "cpu" {
        format!(
            "Our numbers come from a {}-thread CPU ({}) in f32, the papers' from A100/H100 GPUs in fp16/bf16",
            r.meta.threads, r.meta.cpu
        )
    } else {
        format!("Our numbers come from {} ({})", r.meta.device, r.meta.dtype)
    };
    format!(
        "{hw}; shapes are scaled down as each caption says, the \"standard attention\" baseline is Candle's naive attention rather than PyTorch's, \
and \"out of memory\" means over a fixed budget rather than a real allocation failure. Compare shapes of curves and ratios (speedup, memory ratio, V2 vs V1), not absolute numbers."
    )
}

pub fn document(r: &Results) -> String {
    let mut o = String::new();
    writeln!(
        o,
        "# Reproduction of the FlashAttention papers' tables — {} ({}, {})\n",
        r.meta.machine, r.meta.date, r.meta.mode
    )
    .ok();
    o.push_str(quick_warning(r));
    writeln!(
        o,
        "\nMachine: {}; {} matmul ceiling {:.1} GFLOP/s measured at the start of the run. Commit {}. Command: `{}`. Wall-clock: {}.\n",
        device_words(r),
        r.meta.dtype,
        r.meta.gemm_gflops,
        r.meta.git_commit.as_deref().unwrap_or("unknown"),
        r.meta.command.join(" "),
        r.meta
            .seconds
            .iter()
            .map(|(k, v)| format!("{k} {v:.0} s"))
            .collect::<Vec<_>>()
            .join(", ")
    )
    .ok();
    writeln!(o, "{}\n", differences(r)).ok();
    for (file, title) in plots(r) {
        writeln!(o, "![{title}]({file})").ok();
    }
    writeln!(o).ok();
    if let Some(s) = &r.attention {
        writeln!(o, "{}\n{}", table1(r, s), memory(r, s)).ok();
    }
    if let Some(s) = &r.fa2 {
        writeln!(o, "{}", table2(r, s)).ok();
    }
    if let Some(s) = &r.e2e {
        writeln!(o, "{}", table3(r, s)).ok();
    }
    if let Some(s) = &r.prefix {
        writeln!(o, "{}", crate::prefix::table(s)).ok();
    }
    if let Some(s) = &r.blocksparse {
        writeln!(o, "{}", crate::blocksparse::table(s)).ok();
    }
    if let Some(s) = &r.context {
        writeln!(o, "{}", crate::context::table(s)).ok();
    }
    if let Some(s) = &r.listops {
        writeln!(o, "{}", crate::listops::table(s)).ok();
    }
    o
}
