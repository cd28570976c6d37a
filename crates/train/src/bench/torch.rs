//! `train bench --torch PYTHON`: our GPT-2 training step against PyTorch eager's
//! (`scripts/torch_train_baseline.py`: the same architecture, initialisation rule, data, AdamW,
//! clipping and schedule) in one run. The script runs as a child that takes one step per request,
//! so the two alternate step by step and machine noise hits both alike; each side measures its
//! own step: wall time, CPU time split into user and system (`getrusage` of its own process
//! around the step) and peak RSS (`VmHWM`, reset before the step).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use candle_nn::VarMap;
use flash_ops_bench::{cpu_model, gemm_path, median};
use flash_ops_models::AttentionKind;
use serde_json::{json, Value};

use super::{flops_per_token, peak_flops, peak_rss, reset_peak_rss, train_step, BenchArgs};
use super::{ADAMW, GRAD_CLIP, SCHEDULE};
use crate::batching::causal_batch;
use crate::model::{self, ModelKind, Net, Preset, SizeOverrides};
use crate::optim::{self, AdamW};

/// The model shapes of the comparison (issue 11's rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Case {
    /// The tiny preset (4 layers, 4 heads, width 128), seq 128 × batch 8.
    Tiny,
    /// GPT-2 small's width (768, 12 heads) with 2 layers, seq 1024 × batch 1.
    Gpt2SmallWidth,
}

impl Case {
    /// Preset, layer override, sequence length, batch.
    fn shape(self) -> (Preset, Option<usize>, usize, usize) {
        match self {
            Case::Tiny => (Preset::Tiny, None, 128, 8),
            Case::Gpt2SmallWidth => (Preset::Gpt2Small, Some(2), 1024, 1),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Case::Tiny => "tiny",
            Case::Gpt2SmallWidth => "gpt2-small-width",
        }
    }
}

/// CPU seconds of this process so far: (user, system).
fn cpu_times() -> (f64, f64) {
    // SAFETY: getrusage only writes the struct it is given.
    let r = unsafe {
        let mut r: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut r);
        r
    };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    (s(r.ru_utime), s(r.ru_stime))
}

/// One measured step of either side.
#[derive(Debug, Clone, Copy)]
struct Sample {
    step_s: f64,
    user_s: f64,
    sys_s: f64,
    peak_rss: Option<u64>,
    loss: f64,
}

/// Our step, measured like the script measures its own.
fn our_step(net: &Net, opt: &mut AdamW, batch: &model::Batch, step: u64) -> Result<Sample> {
    let measure_mem = reset_peak_rss();
    let (u0, s0) = cpu_times();
    let t0 = Instant::now();
    let loss = train_step(net, opt, batch, step)?;
    let step_s = t0.elapsed().as_secs_f64();
    let (u1, s1) = cpu_times();
    Ok(Sample {
        step_s,
        user_s: u1 - u0,
        sys_s: s1 - s0,
        peak_rss: if measure_mem { peak_rss() } else { None },
        loss,
    })
}

/// The PyTorch side: the script in `--serve` mode.
struct Baseline {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    ready: Value,
}

impl Baseline {
    fn spawn(python: &str, script: &Path, args: &[String]) -> Result<Self> {
        let mut child = Command::new(python)
            .arg(script)
            .args(args)
            .arg("--serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("--torch: cannot run `{python}`; give a Python with torch installed (pip install torch)"))?;
        let stdin = child.stdin.take().context("torch baseline stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("torch baseline stdout")?);
        let mut b = Self {
            child,
            stdin,
            stdout,
            ready: Value::Null,
        };
        b.ready = b.read_line().with_context(|| {
            format!(
                "--torch: {python} {} did not start; check `{python} -c 'import torch'`",
                script.display()
            )
        })?;
        Ok(b)
    }

    fn read_line(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("the PyTorch baseline exited (its error is above)")
        }
        serde_json::from_str(&line)
            .with_context(|| format!("the PyTorch baseline printed {line:?}, not a JSON line"))
    }

    fn step(&mut self) -> Result<Sample> {
        writeln!(self.stdin, "step")?;
        self.stdin.flush()?;
        let r = self.read_line()?;
        let f = |k: &str| {
            r[k].as_f64()
                .with_context(|| format!("PyTorch baseline step without `{k}`: {r}"))
        };
        Ok(Sample {
            step_s: f("step_s")?,
            user_s: f("user_s")?,
            sys_s: f("sys_s")?,
            peak_rss: r["peak_rss_bytes"].as_u64(),
            loss: f("loss")?,
        })
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit").and_then(|_| self.stdin.flush());
        let _ = self.child.wait();
    }
}

/// The script: `--torch-script`, else the checkout's (the current folder's, else this
/// source tree's).
fn script_path(a: &BenchArgs) -> Result<PathBuf> {
    if let Some(p) = &a.torch_script {
        if !p.is_file() {
            bail!("--torch-script {} does not exist", p.display())
        }
        return Ok(p.clone());
    }
    let rel = Path::new("scripts/torch_train_baseline.py");
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel);
    [rel.to_path_buf(), src]
        .into_iter()
        .find(|p| p.is_file())
        .context("scripts/torch_train_baseline.py not found; run from the repository root or pass --torch-script")
}

/// A measured side's row.
fn row(
    case: Case,
    who: &str,
    samples: &[Sample],
    tokens: usize,
    flops_tok: f64,
    peak: f64,
) -> Result<Value> {
    let times: Vec<f64> = samples.iter().map(|s| s.step_s).collect();
    let med = median(&times).context("no timed steps")?;
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    let (user, sys, wall) = samples.iter().fold((0.0, 0.0, 0.0), |(u, s, w), x| {
        (u + x.user_s, s + x.sys_s, w + x.step_s)
    });
    let tps = tokens as f64 / med;
    Ok(json!({
        "case": case.name(), "impl": who, "tokens_per_step": tokens,
        "step_s_median": med, "step_s_min": min, "step_s_all": times,
        "tokens_per_s": tps,
        "user_s_per_step": user / samples.len() as f64,
        "sys_s_per_step": sys / samples.len() as f64,
        "sys_share_of_cpu": sys / (user + sys).max(f64::MIN_POSITIVE),
        "cpu_s_per_wall_s": (user + sys) / wall,
        "peak_rss_bytes": samples.iter().filter_map(|s| s.peak_rss).max(),
        "flops_per_token": flops_tok,
        "mfu": tps * flops_tok / peak,
        "losses": samples.iter().map(|s| s.loss).collect::<Vec<_>>(),
    }))
}

pub fn run(a: &BenchArgs, python: &str) -> Result<()> {
    if a.model != super::BenchModel::Gpt2
        || a.device != crate::DeviceArg::Cpu
        || a.dtype != crate::DTypeArg::F32
    {
        bail!("--torch compares the GPT-2 training step on the CPU in f32; drop --model/--device/--dtype")
    }
    if a.cases.is_empty() {
        bail!("--torch needs at least one --cases value (tiny, gpt2-small-width)")
    }
    let attn = if a.attn.is_empty() {
        vec![AttentionKind::FlashV2]
    } else {
        a.attn.clone()
    };
    let script = script_path(a)?;
    let dev = candle_core::Device::Cpu;
    let threads = rayon::current_num_threads();
    let tok = crate::tokenizer::gpt2()?;
    let vocab = crate::tokenizer::vocab_size(&tok);
    let tokens = crate::tokenizer::encode_text(&tok, crate::data::DEFAULT_CORPUS)?;
    // Both sides read the same token stream from the start: the same batches step by step.
    let token_file =
        std::env::temp_dir().join(format!("train-bench-tokens-{}.u32", std::process::id()));
    let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    std::fs::write(&token_file, bytes)
        .with_context(|| format!("writing {}", token_file.display()))?;
    let (peak, peak_src) = peak_flops(a, &dev, DType::F32)?;
    println!(
        "bench --torch: ours ({}) vs PyTorch eager ({}), {} timed + {} warm-up steps per case, interleaved; {threads} threads each; MFU peak {:.1} GFLOP/s ({peak_src})",
        attn.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(", "),
        script.display(),
        a.steps,
        a.warmup,
        peak / 1e9
    );
    println!("CPU: {}; gemm micro-kernels: {}", cpu_model(), gemm_path());
    let mut rows = Vec::new();
    let result = (|| -> Result<()> {
        for &case in &a.cases {
            rows.extend(run_case(
                a,
                case,
                &attn,
                &tokens,
                vocab,
                (python, &script, &token_file),
                threads,
                peak,
            )?);
        }
        Ok(())
    })();
    std::fs::remove_file(&token_file).ok();
    result?;
    print_table(&rows);
    let report = json!({
        "kind": "train bench --torch", "cpu": cpu_model(), "gemm_path": gemm_path(), "threads": threads,
        "steps": a.steps, "warmup": a.warmup, "peak_flops": peak, "peak_source": peak_src,
        "mfu_formula": "6*params + 12*layers*hidden*seq FLOPs per token",
        "step": format!("forward, backward, global-norm clip {GRAD_CLIP}, AdamW {ADAMW:?}, lr warmup+cosine {SCHEDULE:?}"),
        "sys_share": "system CPU time / (user + system) of each process over its timed steps (getrusage around each step)",
        "peak_memory": "each process' VmHWM after resetting it to the current RSS before the step (Linux): includes what the allocator retains",
        "noise": "both sides alternate step by step in one run: compare the ratios, not the absolute figures across runs",
        "rows": rows,
    });
    super::write_report(&a.out, &report)
}

#[allow(clippy::too_many_arguments)]
fn run_case(
    a: &BenchArgs,
    case: Case,
    attn: &[AttentionKind],
    tokens: &[u32],
    vocab: usize,
    (python, script, token_file): (&str, &Path, &Path),
    threads: usize,
    peak: f64,
) -> Result<Vec<Value>> {
    let (preset, n_layer, seq, batch) = case.shape();
    let config = model::model_config(
        ModelKind::Gpt2,
        preset,
        vocab,
        &SizeOverrides {
            n_layer,
            dropout: Some(0.0),
            ..SizeOverrides::default()
        },
    )?;
    let dims = model::dims(&config)?;
    let heads = config["n_head"].as_u64().context("n_head")?;
    let varmap = VarMap::new();
    let mut net = Net::build(
        &config,
        &varmap,
        DType::F32,
        &candle_core::Device::Cpu,
        attn[0],
    )?;
    optim::init_params(&varmap, 1337, dims.layers, true)?;
    let mut opt = AdamW::new(&varmap, ADAMW)?;
    let params = opt.num_params();
    let (lr, warmup, total, min_ratio) = SCHEDULE;
    let args: Vec<String> = [
        ("--n-layer", dims.layers.to_string()),
        ("--n-head", heads.to_string()),
        ("--n-embd", dims.hidden.to_string()),
        ("--vocab", dims.vocab.to_string()),
        ("--n-positions", dims.positions.to_string()),
        ("--seq", seq.to_string()),
        ("--batch", batch.to_string()),
        ("--threads", threads.to_string()),
        ("--lr", lr.to_string()),
        ("--warmup-steps", warmup.to_string()),
        ("--total-steps", total.to_string()),
        ("--min-lr-ratio", min_ratio.to_string()),
        ("--beta1", ADAMW.beta1.to_string()),
        ("--beta2", ADAMW.beta2.to_string()),
        ("--eps", ADAMW.eps.to_string()),
        ("--weight-decay", ADAMW.weight_decay.to_string()),
        ("--grad-clip", GRAD_CLIP.to_string()),
        ("--tokens", token_file.display().to_string()),
    ]
    .into_iter()
    .flat_map(|(k, v)| [k.to_string(), v])
    .collect();
    let mut torch = Baseline::spawn(python, script, &args)?;
    if torch.ready["params"].as_u64() != Some(params as u64) {
        bail!(
            "the PyTorch baseline has {} parameters, ours {params}: the two models differ",
            torch.ready["params"]
        )
    }
    println!(
        "{}: {:.2}M params ({} layers, {heads} heads, width {}), seq {seq} x batch {batch}; torch {}",
        case.name(),
        params as f64 / 1e6,
        dims.layers,
        dims.hidden,
        torch.ready["torch"].as_str().unwrap_or("?")
    );
    let need = batch * (seq + 1);
    let mut cursor = 0usize;
    let mut next_batch = || {
        if cursor + need > tokens.len() {
            cursor = 0;
        }
        let windows: Vec<&[u32]> = tokens[cursor..cursor + need].chunks(seq + 1).collect();
        cursor += need;
        causal_batch(&windows, &candle_core::Device::Cpu)
    };
    let mut ours: Vec<Vec<Sample>> = vec![Vec::new(); attn.len()];
    let mut theirs = Vec::new();
    for round in 0..a.warmup + a.steps {
        // Each side takes its own step `round` on batch `round`; the kinds share our weights.
        let b = next_batch()?;
        for (ki, &k) in attn.iter().enumerate() {
            net.set_attention(k);
            let s = our_step(&net, &mut opt, &b, round as u64)?;
            if round >= a.warmup {
                ours[ki].push(s);
            }
        }
        let s = torch.step()?;
        if round >= a.warmup {
            theirs.push(s);
        }
    }
    drop(torch);
    let tokens_step = batch * seq;
    let flops_tok = flops_per_token(params, &dims, seq);
    let torch_row = row(case, "pytorch", &theirs, tokens_step, flops_tok, peak)?;
    let torch_tps = torch_row["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
    let mut out = Vec::new();
    for (ki, k) in attn.iter().enumerate() {
        let mut r = row(
            case,
            &format!("ours-{k}"),
            &ours[ki],
            tokens_step,
            flops_tok,
            peak,
        )?;
        r["speedup_vs_torch"] = json!(r["tokens_per_s"].as_f64().unwrap_or(f64::NAN) / torch_tps);
        out.push(r);
    }
    out.push(torch_row);
    for r in &mut out {
        r["params"] = json!(params);
        r["config"] = config.clone();
    }
    Ok(out)
}

fn print_table(rows: &[Value]) {
    println!();
    println!(
        "{:>17} {:>13} {:>9} {:>10} {:>10} {:>8} {:>7} {:>10} {:>6} {:>9}",
        "case",
        "impl",
        "tok/s",
        "step med",
        "step min",
        "sys s",
        "sys %",
        "peak RSS",
        "MFU",
        "vs torch"
    );
    for r in rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:>17} {:>13} {:>9.0} {:>10.3} {:>10.3} {:>8.3} {:>6.1}% {:>10} {:>5.1}% {:>9}",
            r["case"].as_str().unwrap_or(""),
            r["impl"].as_str().unwrap_or(""),
            f("tokens_per_s"),
            f("step_s_median"),
            f("step_s_min"),
            f("sys_s_per_step"),
            100.0 * f("sys_share_of_cpu"),
            r["peak_rss_bytes"]
                .as_u64()
                .map_or("-".into(), |b| format!("{:.0} MiB", b as f64 / 1048576.0)),
            100.0 * f("mfu"),
            r["speedup_vs_torch"]
                .as_f64()
                .map_or("-".into(), |x| format!("{x:.2}x")),
        );
    }
}
