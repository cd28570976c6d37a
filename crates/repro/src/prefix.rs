//! Shared-prefix decoding (Hydragen, Juravsky et al. 2024; issue 13), scaled to the CPU.
//!
//! Microbenchmark: one decoding step of attention, every sequence one query against a shared
//! prefix plus its own suffix: ours (the prefix stored once, all queries folded into one block,
//! merged with the suffix by log-sum-exp) against the baseline (each sequence its own cache
//! holding a physical copy of the prefix, flash decoding), caches flushed before each repeat.
//! End to end: GPT-2-small-width sampling throughput (random weights, positions raised to fit the
//! prompt) against batch size, the two caches of `flash_ops_models::generate_batch`.

use std::fmt::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use flash_ops_bench::median;
use flash_ops_models::gpt2::decode::{flash_decoding, kv_chunks, shared_prefix_decode};
use flash_ops_models::{AttentionKind, Gpt2, Gpt2Config, KvCache, SharedPrefixCache};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::plan::Mode;
use crate::plot::{e, line_chart_x, Line};

/// Heads of one microbenchmark shape.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Heads {
    pub label: String,
    pub hq: usize,
    pub hk: usize,
    pub d: usize,
}

/// What the section measures in a mode.
#[derive(Clone, Debug)]
pub struct PrefixPlan {
    pub reps: usize,
    pub batches: Vec<usize>,
    pub prefixes: Vec<usize>,
    pub suffixes: Vec<usize>,
    pub heads: Vec<Heads>,
    /// The baseline is skipped where its duplicated caches would pass this.
    pub memory_budget: u64,
    /// Bytes written between repeats: more than the last-level cache, so every repeat reads the
    /// K/V from memory as a decoding step of a large batch does.
    pub flush_bytes: usize,
    pub model: Gpt2Config,
    pub e2e_prompts: Vec<usize>,
    pub e2e_batches: Vec<usize>,
    /// Timed decoding steps per end-to-end cell (after one warm-up step).
    pub e2e_steps: usize,
}

const GB: u64 = 1 << 30;

fn heads() -> Vec<Heads> {
    vec![
        Heads {
            label: "GPT-2 (12 × d64)".into(),
            hq: 12,
            hk: 12,
            d: 64,
        },
        Heads {
            label: "GQA (8 q / 1 kv, d128)".into(),
            hq: 8,
            hk: 1,
            d: 128,
        },
    ]
}

impl PrefixPlan {
    pub fn new(mode: Mode) -> Self {
        let small = |n_embd, n_layer, n_head, vocab_size| Gpt2Config {
            n_embd,
            n_layer,
            n_head,
            vocab_size,
            ..Gpt2Config::gpt2_small()
        };
        match mode {
            Mode::Quick => PrefixPlan {
                reps: 1,
                batches: vec![2, 8],
                prefixes: vec![64, 512],
                suffixes: vec![0, 16],
                heads: heads(),
                // Small enough that the baseline's duplicated caches "run out" in the quick range.
                memory_budget: 4 << 20,
                flush_bytes: 1 << 20,
                model: small(64, 1, 4, 256),
                e2e_prompts: vec![64, 256],
                e2e_batches: vec![2, 8],
                e2e_steps: 2,
            },
            // The grid; 2 of GPT-2 small's 12 layers end to end so that the 16K prompt's
            // prefill (once per prompt) and the baseline's steps fit ~10 minutes on 2 cores.
            Mode::Full | Mode::Gpu => PrefixPlan {
                reps: 3,
                batches: vec![8, 16, 32, 64, 128],
                prefixes: vec![512, 1024, 2048, 4096, 16384],
                suffixes: vec![0, 64, 256],
                heads: heads(),
                // A third of the 24 GiB machine (the baseline cell holds q, K, V and scratch).
                memory_budget: 8 * GB,
                flush_bytes: 256 << 20,
                model: small(768, 2, 12, 50257),
                e2e_prompts: vec![1024, 4096, 16384],
                e2e_batches: vec![8, 16, 32, 64],
                e2e_steps: 4,
            },
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct MicroRow {
    pub heads: Heads,
    pub batch: usize,
    pub prefix: usize,
    pub suffix: usize,
    /// Median ms of one decoding step of attention.
    pub ours_ms: Option<f64>,
    pub baseline_ms: Option<f64>,
    /// The baseline's per-sequence K/V bytes (ours holds `prefix + batch·suffix` positions).
    pub baseline_bytes: u64,
    /// KV chunks of the baseline's flash decoding.
    pub chunks: usize,
    pub skipped: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct E2eRow {
    pub prompt: usize,
    pub batch: usize,
    /// `shared` (ours) or `duplicated` (the baseline).
    pub cache: String,
    pub tokens_per_s: Option<f64>,
    /// The share of attention in the FLOPs of one decoding step (prefix length `prompt`).
    pub attn_flop_share: f64,
    pub skipped: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct PrefixSection {
    pub reps: usize,
    pub memory_budget_bytes: u64,
    pub flush_bytes: usize,
    pub micro: Vec<MicroRow>,
    /// `n_layer` × `n_embd` (`n_head` heads), vocabulary.
    pub model: String,
    pub e2e_steps: usize,
    /// Prefill seconds per prompt length (once, shared by every batch and both caches).
    pub prefill_s: Prefills,
    pub e2e: Vec<E2eRow>,
}

/// Writes `bytes` through a buffer so that the caches hold none of the next repeat's data.
fn flush(buf: &mut [u8], round: u8) {
    for (i, b) in buf.iter_mut().enumerate().step_by(64) {
        *b = round.wrapping_add(i as u8);
    }
    std::hint::black_box(&buf);
}

fn median_ms(reps: usize, buf: &mut [u8], mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up
    let mut times = Vec::with_capacity(reps);
    for r in 0..reps {
        flush(buf, r as u8);
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(&times).unwrap_or(f64::NAN))
}

fn randn(dims: &[usize]) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, 1.0, dims, &Device::Cpu)?)
}

pub fn measure(plan: &PrefixPlan) -> Result<PrefixSection> {
    let mut buf = vec![0u8; plan.flush_bytes];
    let mut micro = Vec::new();
    for h in &plan.heads {
        for &sp in &plan.prefixes {
            let pk = randn(&[1, sp, h.hk, h.d])?;
            let pv = randn(&[1, sp, h.hk, h.d])?;
            for &s in &plan.suffixes {
                for &b in &plan.batches {
                    let q = randn(&[b, 1, h.hq, h.d])?;
                    let (sk, sv) = (randn(&[b, s, h.hk, h.d])?, randn(&[b, s, h.hk, h.d])?);
                    let suffix = (s > 0).then_some((&sk, &sv));
                    let ours = median_ms(plan.reps, &mut buf, || {
                        shared_prefix_decode(&q, &pk, &pv, suffix)?;
                        Ok(())
                    })?;
                    let bytes = (2 * b * (sp + s) * h.hk * h.d * 4) as u64;
                    let chunks = kv_chunks(b, h.hq, sp + s);
                    let mut row = MicroRow {
                        heads: h.clone(),
                        batch: b,
                        prefix: sp,
                        suffix: s,
                        ours_ms: Some(ours),
                        baseline_ms: None,
                        baseline_bytes: bytes,
                        chunks,
                        skipped: None,
                    };
                    if bytes > plan.memory_budget {
                        row.skipped = Some(format!(
                            "baseline: per-sequence caches of {} exceed the {} budget",
                            crate::measure::bytes(bytes as f64),
                            crate::measure::bytes(plan.memory_budget as f64)
                        ));
                    } else {
                        // The prefix physically duplicated into every sequence's cache.
                        let k = Tensor::cat(&[&pk.repeat((b, 1, 1, 1))?, &sk], 1)?;
                        let v = Tensor::cat(&[&pv.repeat((b, 1, 1, 1))?, &sv], 1)?;
                        row.baseline_ms = Some(median_ms(plan.reps, &mut buf, || {
                            flash_decoding(&q, &k, &v, chunks)?;
                            Ok(())
                        })?);
                    }
                    println!(
                        "  {} b{b} prefix {sp} suffix {s}: ours {ours:.2} ms, baseline {}",
                        h.label,
                        row.baseline_ms
                            .map_or_else(|| "skipped".into(), |t| format!("{t:.2} ms"))
                    );
                    micro.push(row);
                }
            }
        }
    }
    let (prefill_s, e2e) = end_to_end(plan)?;
    let m = &plan.model;
    Ok(PrefixSection {
        reps: plan.reps,
        memory_budget_bytes: plan.memory_budget,
        flush_bytes: plan.flush_bytes,
        micro,
        model: format!(
            "{} layers × {} ({} heads), vocabulary {}",
            m.n_layer, m.n_embd, m.n_head, m.vocab_size
        ),
        e2e_steps: plan.e2e_steps,
        prefill_s,
        e2e,
    })
}

/// FLOPs of one decoding step per token: attention over `keys` positions in every layer, the
/// projections (qkv, out, MLP: 12·n_embd² multiply-adds per layer) and the LM head.
fn attn_share(m: &Gpt2Config, keys: usize) -> f64 {
    let (c, l) = (m.n_embd as f64, m.n_layer as f64);
    let attn = l * 4.0 * keys as f64 * c;
    let dense = l * 24.0 * c * c + 2.0 * c * m.vocab_size as f64;
    attn / (attn + dense)
}

/// Prefill seconds per prompt length.
type Prefills = Vec<(usize, f64)>;

fn end_to_end(plan: &PrefixPlan) -> Result<(Prefills, Vec<E2eRow>)> {
    let max_prompt = plan.e2e_prompts.iter().copied().max().unwrap_or(0);
    let cfg = Gpt2Config {
        n_positions: max_prompt + plan.e2e_steps + 2,
        ..plan.model.clone()
    };
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = Gpt2::new(&cfg, vb, AttentionKind::FlashV2)?;
    let vocab = cfg.vocab_size as u32;
    let ids = |b: usize, t: usize, seed: usize| -> Result<Tensor> {
        let v: Vec<u32> = (0..b * t)
            .map(|i| ((i * 7919 + seed * 104_729) as u32) % vocab)
            .collect();
        Ok(Tensor::from_vec(v, (b, t), &Device::Cpu)?)
    };
    let (mut prefill_s, mut rows) = (Vec::new(), Vec::new());
    let steps = plan.e2e_steps;
    for &p in &plan.e2e_prompts {
        let mut prefix = KvCache::default();
        let t = Instant::now();
        model.prefill(&ids(1, p, 0)?, &mut prefix)?;
        prefill_s.push((p, t.elapsed().as_secs_f64()));
        println!(
            "  prompt {p}: prefilled in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        for &b in &plan.e2e_batches {
            let share = attn_share(&cfg, p + steps / 2);
            let run = |step: &mut dyn FnMut(&Tensor) -> candle_core::Result<Tensor>| {
                step(&ids(b, 1, 1)?)?; // warm-up
                let t = Instant::now();
                for i in 0..steps {
                    step(&ids(b, 1, 2 + i)?)?;
                }
                Ok::<f64, anyhow::Error>((b * steps) as f64 / t.elapsed().as_secs_f64())
            };
            let mut shared = SharedPrefixCache::from_prefix(prefix.clone())?;
            let ours = run(&mut |x| model.forward_with_shared_cache(x, &mut shared))?;
            drop(shared);
            rows.push(E2eRow {
                prompt: p,
                batch: b,
                cache: "shared".into(),
                tokens_per_s: Some(ours),
                attn_flop_share: share,
                skipped: None,
            });
            let bytes = (2 * b * (p + steps + 1) * cfg.n_embd * cfg.n_layer * 4) as u64;
            let baseline = if bytes > plan.memory_budget {
                Err(format!(
                    "per-sequence caches of {} exceed the {} budget",
                    crate::measure::bytes(bytes as f64),
                    crate::measure::bytes(plan.memory_budget as f64)
                ))
            } else {
                let mut dup = prefix.repeat(b, steps + 1)?.with_flash_decoding(true);
                Ok(run(&mut |x| model.forward_with_cache(x, &mut dup))?)
            };
            println!(
                "  prompt {p} batch {b}: shared {ours:.1} tokens/s, duplicated {}",
                match &baseline {
                    Ok(t) => format!("{t:.1} tokens/s"),
                    Err(why) => format!("skipped ({why})"),
                }
            );
            rows.push(E2eRow {
                prompt: p,
                batch: b,
                cache: "duplicated".into(),
                tokens_per_s: baseline.as_ref().ok().copied(),
                attn_flop_share: share,
                skipped: baseline.err(),
            });
        }
    }
    Ok((prefill_s, rows))
}

fn k(n: usize) -> String {
    if n >= 1024 && n.is_multiple_of(1024) {
        format!("{}K", n / 1024)
    } else {
        n.to_string()
    }
}

fn opt(x: Option<f64>, prec: usize) -> String {
    x.map_or("–".into(), |v| format!("{v:.prec$}"))
}

fn speedup(r: &MicroRow) -> Option<f64> {
    Some(r.baseline_ms? / r.ours_ms?)
}

/// The markdown of the section, beside the paper's claims.
pub fn table(s: &PrefixSection) -> String {
    let mut o = String::new();
    writeln!(
        o,
        "## Shared-prefix decoding (Hydragen, Juravsky et al. 2024)\n\n\
         One decoding step of attention, f32: **ours** (prefix stored once, the batch's queries \
         folded into one block, merged with each suffix by log-sum-exp) vs the **baseline** \
         (every sequence's own cache holding a copy of the prefix, flash decoding). Median of {} \
         repeats after a warm-up, {} written between repeats to flush the caches; the baseline is \
         skipped where its caches pass {}. Paper (A100, CodeLlama-13b): attention speedups grow \
         with batch and prefix; ≥ 8× is this issue's target at batch 64, 4K prefix (MHA).\n",
        s.reps,
        crate::measure::bytes(s.flush_bytes as f64),
        crate::measure::bytes(s.memory_budget_bytes as f64),
    )
    .ok();
    let mut shapes: Vec<&Heads> = Vec::new();
    for r in &s.micro {
        if !shapes.contains(&&r.heads) {
            shapes.push(&r.heads);
        }
    }
    let uniq = |f: fn(&MicroRow) -> usize| {
        let mut v: Vec<usize> = s.micro.iter().map(f).collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let (batches, prefixes, suffixes) = (uniq(|r| r.batch), uniq(|r| r.prefix), uniq(|r| r.suffix));
    for h in &shapes {
        for &suf in &suffixes {
            writeln!(
                o,
                "**{}, suffix {suf}**: speedup (baseline ms / ours ms), ours ms in brackets\n",
                h.label
            )
            .ok();
            let head: Vec<String> = batches.iter().map(|b| format!("batch {b}")).collect();
            writeln!(o, "| prefix | {} |", head.join(" | ")).ok();
            writeln!(o, "|---|{}", "---|".repeat(batches.len())).ok();
            for &p in &prefixes {
                let cells: Vec<String> = batches
                    .iter()
                    .map(|&b| {
                        let r = s.micro.iter().find(|r| {
                            &r.heads == *h && r.batch == b && r.prefix == p && r.suffix == suf
                        });
                        match r {
                            Some(r) if r.skipped.is_some() => {
                                format!("baseline OOM ({})", opt(r.ours_ms, 2))
                            }
                            Some(r) => format!("{}× ({})", opt(speedup(r), 1), opt(r.ours_ms, 2)),
                            None => "–".into(),
                        }
                    })
                    .collect();
                writeln!(o, "| {} | {} |", k(p), cells.join(" | ")).ok();
            }
            writeln!(o).ok();
        }
    }
    writeln!(
        o,
        "### End to end: sampling throughput\n\nGPT-2, {} (random weights, \
         positions raised to fit), f32: decoding tokens/s over {} steps after a warm-up, the \
         prompt prefilled once per length ({}). `attn share`: attention's share of one step's \
         FLOPs. Paper: throughput falls < 15% from a 1K to a 16K prefix at large batch where the \
         baselines lose > 90%; this issue's target: ≥ 3× the baseline at batch 32, 4K prompt.\n",
        s.model,
        s.e2e_steps,
        s.prefill_s
            .iter()
            .map(|(p, t)| format!("{}: {t:.1} s", k(*p)))
            .collect::<Vec<_>>()
            .join(", ")
    )
    .ok();
    writeln!(
        o,
        "| prompt | batch | ours tokens/s | baseline tokens/s | speedup | attn share |"
    )
    .ok();
    writeln!(o, "|---|---|---|---|---|---|").ok();
    let e2e = |p: usize, b: usize, cache: &str| {
        s.e2e
            .iter()
            .find(|r| r.prompt == p && r.batch == b && r.cache == cache)
    };
    let mut prompts: Vec<usize> = s.e2e.iter().map(|r| r.prompt).collect();
    prompts.dedup();
    let mut e2e_batches: Vec<usize> = s.e2e.iter().map(|r| r.batch).collect();
    e2e_batches.sort_unstable();
    e2e_batches.dedup();
    for &p in &prompts {
        for &b in &e2e_batches {
            let (Some(a), Some(z)) = (e2e(p, b, "shared"), e2e(p, b, "duplicated")) else {
                continue;
            };
            let ratio = match (a.tokens_per_s, z.tokens_per_s) {
                (Some(x), Some(y)) => format!("{:.1}×", x / y),
                _ => "baseline OOM".into(),
            };
            writeln!(
                o,
                "| {} | {b} | {} | {} | {ratio} | {:.0}% |",
                k(p),
                opt(a.tokens_per_s, 1),
                z.skipped
                    .as_ref()
                    .map_or_else(|| opt(z.tokens_per_s, 1), |_| "skipped (memory)".into()),
                100.0 * a.attn_flop_share
            )
            .ok();
        }
    }
    // The paper's long-prefix claim: throughput kept from the shortest to the longest prompt.
    if let (Some(&p0), Some(&p1)) = (prompts.first(), prompts.last()) {
        let paper = [
            ("shared", "paper: < 15% for Hydragen at large batch"),
            ("duplicated", "paper: > 90% for the baselines"),
        ];
        for (cache, claim) in paper {
            let drops: Vec<String> = e2e_batches
                .iter()
                .filter_map(|&b| {
                    let a = e2e(p0, b, cache)?.tokens_per_s?;
                    let z = e2e(p1, b, cache)?.tokens_per_s?;
                    Some(format!("batch {b}: {:.0}%", 100.0 * (1.0 - z / a)))
                })
                .collect();
            if !drops.is_empty() && p1 > p0 {
                writeln!(
                    o,
                    "\nThroughput drop from a {} to a {} prompt, {cache}: {} ({claim}).",
                    k(p0),
                    k(p1),
                    drops.join(", "),
                )
                .ok();
            }
        }
        let share = |p| e2e(p, e2e_batches[0], "shared").map_or(0.0, |r| r.attn_flop_share);
        writeln!(
            o,
            "\nAttention's share of a step's FLOPs grows from {:.0}% to {:.0}% over that range \
             (attention's FLOPs per token grow as prefix × width, the rest as width², so a wider \
             model such as the paper's spends a smaller share), which bounds how flat ours can \
             stay here.",
            100.0 * share(p0),
            100.0 * share(p1),
        )
        .ok();
    }
    o
}

/// `prefix.png`: attention speedup vs prefix length (one line per batch, MHA, the largest suffix)
/// and end-to-end tokens/s vs batch per prompt length.
pub fn plot(s: &PrefixSection, out: &Path) -> Result<()> {
    let root = BitMapBackend::new(out, (1120, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let panels = root.split_evenly((1, 2));
    let Some(first) = s.micro.first() else {
        return Ok(());
    };
    let suffix = s.micro.iter().map(|r| r.suffix).max().unwrap_or(0);
    let mut batches: Vec<usize> = s.micro.iter().map(|r| r.batch).collect();
    batches.sort_unstable();
    batches.dedup();
    let palette = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    let lines: Vec<Line> = batches
        .iter()
        .enumerate()
        .map(|(i, &b)| Line {
            label: format!("batch {b}"),
            colour: palette[i % palette.len()],
            points: s
                .micro
                .iter()
                .filter(|r| r.heads == first.heads && r.batch == b && r.suffix == suffix)
                .filter_map(|r| Some((r.prefix as f64, speedup(r)?)))
                .collect(),
            paper: false,
        })
        .collect();
    let title = format!("{}, suffix {suffix}: attention speedup", first.heads.label);
    line_chart_x(
        &panels[0],
        &title,
        "prefix length",
        "speedup (×)",
        &lines,
        false,
        Some("1× (duplicated caches, flash decoding)"),
    )?;
    let mut prompts: Vec<usize> = s.e2e.iter().map(|r| r.prompt).collect();
    prompts.dedup();
    let mut lines = Vec::new();
    for (i, &p) in prompts.iter().enumerate() {
        for (cache, paper) in [("shared", false), ("duplicated", true)] {
            lines.push(Line {
                label: format!("{} prompt, {cache}", k(p)),
                colour: palette[i % palette.len()],
                points: s
                    .e2e
                    .iter()
                    .filter(|r| r.prompt == p && r.cache == cache)
                    .filter_map(|r| Some((r.batch as f64, r.tokens_per_s?)))
                    .collect(),
                paper,
            });
        }
    }
    line_chart_x(
        &panels[1],
        "sampling tokens/s (thin: duplicated caches)",
        "batch",
        "tokens/s",
        &lines,
        true,
        None,
    )?;
    root.present().map_err(e)?;
    Ok(())
}
