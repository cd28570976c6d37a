//! `repro`: reproduces the FlashAttention papers' tables (issue 7) and Hydragen's shared-prefix
//! decoding benchmark (issue 13, `--only prefix`); perplexity against context length and Long
//! Range Arena ListOps (issue 14, `--only context,listops`).
//!
//! `repro run [--quick | --gpu] [--out DIR]` measures, writes `results.json` after every section,
//! then renders `tables.md` and the PNG figures from that JSON; `repro render DIR` re-renders a
//! results folder without measuring.

mod blocksparse;
mod context;
mod listops;
mod measure;
mod paper;
mod plan;
mod plot;
mod prefix;
mod render;
mod results;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand};
use flash_ops_bench::{cpu_model, gemm_ceiling, gemm_ceiling_n, gemm_path, Variant};

use measure::Target;
use plan::{Mode, Plan};
use results::{Fa2Section, Meta, Results};

// Peak-memory columns need the counting allocator of flash-ops-bench.
#[global_allocator]
static ALLOC: flash_ops_bench::PeakAlloc = flash_ops_bench::PeakAlloc;

#[derive(Parser, Debug)]
#[command(
    name = "repro",
    about = "Reproduce the FlashAttention papers' tables and plots"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Measure every table, write results.json, then render tables.md and the PNGs.
    Run(Box<RunArgs>),
    /// Re-render tables.md and the PNGs of a results folder from its results.json.
    Render { dir: PathBuf },
    /// Print what a mode would measure, without measuring.
    Plan {
        #[arg(long, value_enum, default_value = "full")]
        mode: Mode,
    },
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Tiny sizes (~1–2 minutes): CI and tests. Not a reproduction.
    #[arg(long, conflicts_with = "gpu")]
    quick: bool,
    /// The papers' sizes (CUDA backend).
    #[arg(long)]
    gpu: bool,
    /// Output folder (default: results/<machine>-<date>[-quick|-gpu]).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Machine name for the default folder (default: from the CPU model and thread count).
    #[arg(long)]
    machine: Option<String>,
    /// Sections to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "attention,fa2,e2e,prefix,blocksparse,context,listops"
    )]
    only: Vec<String>,
    /// The `train` binary for the end-to-end table (default: next to this binary).
    #[arg(long)]
    train_bin: Option<PathBuf>,
    /// Also time candle-nn's CPU flash_attn (forward only) in Table 2; slow.
    #[arg(long)]
    candle_nn: bool,
    /// Python with torch: adds PyTorch's scaled_dot_product_attention (same device) to Table 2
    /// (scripts/repro_torch_sdpa.py).
    #[arg(long)]
    torch: Option<PathBuf>,
    /// Override the memory budget past which standard attention counts as out of memory (GB).
    #[arg(long)]
    memory_budget_gb: Option<f64>,
    /// Override the timed repeats per cell.
    #[arg(long)]
    reps: Option<usize>,
    /// Shared-prefix section: override the batch sizes (microbenchmark and end to end).
    #[arg(long, value_delimiter = ',')]
    prefix_batches: Vec<usize>,
    /// Shared-prefix section: override the prefix lengths of the microbenchmark.
    #[arg(long, value_delimiter = ',')]
    prefix_lengths: Vec<usize>,
    /// Shared-prefix section: override the prompt lengths of the end-to-end table.
    #[arg(long, value_delimiter = ',')]
    prefix_prompts: Vec<usize>,
    /// Context section: `--data` for `train gpt2` (default: its embedded corpus).
    #[arg(long, num_args = 1..)]
    context_data: Vec<PathBuf>,
    /// ListOps section: add a block-sparse flash V2 run per length with `train --sparsity P`.
    #[arg(long, value_delimiter = ',')]
    listops_sparsity: Vec<String>,
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Run(a) => run(*a),
        Cmd::Render { dir } => {
            let r = results::read(&dir)?;
            render_dir(&r, &dir)
        }
        Cmd::Plan { mode } => {
            let p = Plan::new(mode);
            println!("{p:#?}");
            let (t1, t2) = p.attention_flops();
            println!(
                "attention FLOPs executed (paper count, warm-ups and repeats included): Table 1 + memory {:.2} TFLOP, Table 2 {:.2} TFLOP",
                t1 / 1e12,
                t2 / 1e12
            );
            Ok(())
        }
    }
}

/// "Intel(R) Xeon(R) Processor" → "intel-xeon": a folder-friendly machine name.
fn slug(cpu: &str) -> String {
    let cleaned = cpu
        .split('@')
        .next()
        .unwrap_or("")
        .replace("(R)", " ")
        .replace("(TM)", " ")
        .to_lowercase();
    let words: Vec<String> = cleaned
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty() && !matches!(*w, "processor" | "cpu" | "core"))
        .map(str::to_string)
        .collect();
    words.join("-")
}

/// Today's date (UTC) as YYYY-MM-DD, from days since the epoch (Howard Hinnant's algorithm).
fn today() -> String {
    let days = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86400) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

fn git_commit() -> Option<String> {
    let o = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn train_binary(given: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p);
    }
    let me = std::env::current_exe()?;
    let sibling = me
        .parent()
        .map(|d| d.join(format!("train{}", std::env::consts::EXE_SUFFIX)));
    match sibling {
        Some(p) if p.exists() => Ok(p),
        _ => bail!(
            "no `train` binary next to {} (build it with `cargo build --release -p train`, or pass --train-bin)",
            me.display()
        ),
    }
}

fn run(a: RunArgs) -> Result<()> {
    // Every timed loop in this process reuses freed memory, as `train` (and its sections) do.
    flash_ops_bench::reuse_freed_memory();
    let mode = if a.quick {
        Mode::Quick
    } else if a.gpu {
        Mode::Gpu
    } else {
        Mode::Full
    };
    let mut plan = Plan::new(mode);
    if let Some(gb) = a.memory_budget_gb {
        plan.memory_budget = (gb * 1e9) as u64;
    }
    if let Some(r) = a.reps {
        plan.reps = r.max(1);
    }
    for s in &a.only {
        if !matches!(
            s.as_str(),
            "attention" | "fa2" | "e2e" | "prefix" | "blocksparse" | "context" | "listops"
        ) {
            bail!(
                "--only takes attention, fa2, e2e, prefix, blocksparse, context, listops; got {s}"
            )
        }
    }
    let wants = |s: &str| a.only.iter().any(|x| x == s);
    // The papers time half precision on the GPU; the CPU kernels' fast path is f32.
    let target = if mode == Mode::Gpu {
        let device = Device::new_cuda(0)
            .context("--gpu needs a CUDA device and a build with `--features cuda`")?;
        Target {
            device,
            dtype: DType::BF16,
        }
    } else {
        Target {
            device: Device::Cpu,
            dtype: DType::F32,
        }
    };
    let cpu = cpu_model();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let machine = a
        .machine
        .clone()
        .unwrap_or_else(|| format!("cpu-{threads}t-{}", slug(&cpu)));
    let date = today();
    let suffix = match mode {
        Mode::Full => "",
        Mode::Quick => "-quick",
        Mode::Gpu => "-gpu",
    };
    let dir = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("results/{machine}-{date}{suffix}")));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    println!("repro {} → {}", mode.name(), dir.display());
    let gemm_path = gemm_path();
    println!("CPU: {cpu}, {threads} threads; gemm micro-kernels: {gemm_path}");
    let t0 = Instant::now();
    let gemm = gemm_ceiling(
        if mode == Mode::Quick { 1 } else { 3 },
        &target.device,
        target.dtype,
    )?;
    println!(
        "{} GEMM ceiling (matmul {}³): {gemm:.1} GFLOP/s",
        target.dtype.as_str(),
        gemm_ceiling_n(&target.device)
    );
    let mut r = Results {
        meta: Meta {
            mode: mode.name().into(),
            machine,
            date,
            device: if mode == Mode::Gpu {
                gpu_name().map_or("cuda".into(), |g| format!("cuda: {g}"))
            } else {
                "cpu".into()
            },
            cpu,
            gemm_path: Some(gemm_path.into()),
            threads,
            dtype: target.dtype.as_str().into(),
            gemm_gflops: gemm,
            git_commit: git_commit(),
            command: std::env::args().collect(),
            seconds: BTreeMap::new(),
        },
        attention: None,
        fa2: None,
        e2e: None,
        prefix: None,
        blocksparse: None,
        context: None,
        listops: None,
    };
    let variants = [Variant::V1, Variant::V2, Variant::Naive];
    if wants("attention") {
        let measure = || measure::attention(&plan, &variants, &target);
        section(&mut r, &dir, "attention", measure, |r| &mut r.attention)?;
    }
    if wants("fa2") {
        let mut v = variants.to_vec();
        if a.candle_nn {
            v.push(Variant::CandleNn);
        }
        let measure = || fa2(&plan, &v, a.torch.as_deref(), &target);
        section(&mut r, &dir, "fa2", measure, |r| &mut r.fa2)?;
    }
    if wants("e2e") {
        let bin = train_binary(a.train_bin.clone())?;
        let measure = || measure::e2e(&plan.e2e, &bin, &dir);
        section(&mut r, &dir, "e2e", measure, |r| &mut r.e2e)?;
    }
    if wants("prefix") {
        // CPU, f32 in every mode: the section's protocol is scaled to the CPU.
        let mut p = prefix::PrefixPlan::new(mode);
        if let Some(r) = a.reps {
            p.reps = r.max(1);
        }
        for (given, slot) in [
            (&a.prefix_batches, &mut p.batches),
            (&a.prefix_lengths, &mut p.prefixes),
            (&a.prefix_prompts, &mut p.e2e_prompts),
        ] {
            if !given.is_empty() {
                *slot = given.clone();
            }
        }
        if !a.prefix_batches.is_empty() {
            p.e2e_batches = a.prefix_batches.clone();
        }
        section(
            &mut r,
            &dir,
            "prefix",
            || prefix::measure(&p),
            |r| &mut r.prefix,
        )?;
    }
    if wants("blocksparse") {
        let measure = || blocksparse::measure(mode, a.reps);
        section(&mut r, &dir, "blocksparse", measure, |r| &mut r.blocksparse)?;
    }
    if wants("context") {
        let bin = train_binary(a.train_bin.clone())?;
        let mut p = context::ContextPlan::new(mode);
        p.data = a.context_data.clone();
        let measure = || context::measure(&p, &bin, &dir);
        section(&mut r, &dir, "context", measure, |r| &mut r.context)?;
    }
    if wants("listops") {
        let bin = train_binary(a.train_bin.clone())?;
        let mut p = listops::ListopsPlan::new(mode);
        p.sparsity = a.listops_sparsity.clone();
        let measure = || listops::measure(&p, &bin, &dir);
        section(&mut r, &dir, "listops", measure, |r| &mut r.listops)?;
    }
    r.meta
        .seconds
        .insert("total".into(), t0.elapsed().as_secs_f64());
    results::write(&dir, &r)?;
    render_dir(&r, &dir)?;
    let failed = r
        .e2e
        .iter()
        .flat_map(|s| &s.runs)
        .filter(|x| x.error.is_some())
        .count()
        + r.context
            .iter()
            .flat_map(|s| &s.runs)
            .filter(|x| x.outcome.error.is_some())
            .count()
        + r.listops
            .iter()
            .flat_map(|s| &s.runs)
            .filter(|x| x.outcome.error.is_some())
            .count();
    if failed > 0 {
        bail!("{failed} training run(s) failed; the other tables were written (see tables.md)")
    }
    Ok(())
}

/// Measures one section into `r`, records its wall time, and writes results.json at once so a
/// later section's failure keeps it.
fn section<T>(
    r: &mut Results,
    dir: &Path,
    name: &str,
    measure: impl FnOnce() -> Result<T>,
    slot: impl FnOnce(&mut Results) -> &mut Option<T>,
) -> Result<()> {
    let t = Instant::now();
    let s = measure()?;
    *slot(r) = Some(s);
    r.meta
        .seconds
        .insert(name.into(), t.elapsed().as_secs_f64());
    results::write(dir, r)
}

/// Table 2, with PyTorch's SDPA beside it when `torch` (a Python with torch) is given.
fn fa2(
    plan: &Plan,
    variants: &[Variant],
    torch: Option<&Path>,
    target: &Target,
) -> Result<Fa2Section> {
    let mut section = measure::fa2(plan, variants, target)?;
    let Some(py) = torch else {
        return Ok(section);
    };
    // From the work tree we run in (a binary carried to a GPU machine lives elsewhere than where
    // it was built), else from the source tree it was built from.
    let script = [
        PathBuf::from("scripts/repro_torch_sdpa.py"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/repro_torch_sdpa.py"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .context("scripts/repro_torch_sdpa.py not found (run from the repository root)")?;
    println!("Table 2: PyTorch SDPA through {}", script.display());
    // PyTorch is a comparison column: without it the table still stands.
    match measure::torch_sdpa(py, &script, &section.rows, target) {
        Ok((rows, version)) => {
            section.rows.extend(rows);
            section.torch = Some(version);
        }
        Err(e) => println!("  PyTorch SDPA column left out: {e:#}"),
    }
    Ok(section)
}

/// The GPU's name from `nvidia-smi`, where it is installed.
fn gpu_name() -> Option<String> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name", "--format=csv,noheader", "--id=0"])
        .output()
        .ok()?;
    let name = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !name.is_empty()).then_some(name)
}

fn render_dir(r: &Results, dir: &Path) -> Result<()> {
    let md = render::document(r);
    std::fs::write(dir.join("tables.md"), &md)?;
    let pngs = plot::all(r, dir)?;
    println!("\n{md}");
    println!(
        "wrote {}/{{{}, tables.md, {}}}",
        dir.display(),
        results::FILE,
        pngs.join(", ")
    );
    Ok(())
}
