//! Attention benchmark on CPU: forward, backward and forward+backward time, achieved GFLOP/s (and
//! their fraction of the run's GEMM ceiling) and peak extra heap memory for flash V1, flash V2,
//! Candle naive attention (matmul → softmax → matmul, Candle autograd for backward) and
//! candle-nn's CPU `attention::flash_attn` (forward only, f32). Batch 1, 12 heads by default, f32
//! (`--dtype f32,bf16` adds bf16 rows). `--decode` adds decoding steps (flash V2 forward, one
//! query row, B1, 32 query heads, d 128, k/v heads from `--decode-kv-heads`) timed against the
//! bytes of K and V at the memory read bandwidth measured in the same run.
//!
//! `cargo bench -p flash-ops-bench -- [--n 512,1024] [--d 64,128] [--causal no|yes|both]
//!   [--dtype f32,bf16] [--variants v1,v2,naive,candle-nn] [--reps 3] [--heads 12]
//!   [--max-naive-n 4096] [--decode 1024,4096] [--decode-kv-heads 32,8] [--json FILE]
//!   [--linear-memory-n 16384]`
//!
//! `--profile-fwd-bwd N,D,STEPS` runs only flash V2 forward+backward (f32, `--heads`, not
//! causal) STEPS times and prints the time per step: what `perf record`/`perf stat` attribute to
//! V2 alone, without the ceiling and the other rows.
//!
//! `--json` writes `{"machine": {..}, "rows": [..], "decode": [..]}`: what
//! `scripts/crosscheck_torch.py --bench` reads to put PyTorch's times beside these.

use std::time::Instant;

use candle_core::{bail, DType, Device, Result, Tensor, Var};
use flash_ops_bench::args::{arg_list, num, nums};
use flash_ops_bench::{
    clock_ghz, cpu_model, fma_peak_gflops, gemm_ceiling, gemm_ceiling_n, gemm_path, kernel_path,
    measure, measure_decode, read_bandwidth, DecodeWorkload, PeakAlloc, Row, Variant, Workload,
    BWD_PER_FWD_FLOPS,
};

#[global_allocator]
static GLOBAL: PeakAlloc = PeakAlloc;

fn mb(b: usize) -> String {
    format!("{:.0} MB", b as f64 / 1e6)
}

fn main() -> Result<()> {
    flash_ops_bench::reuse_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    if let Some(p) = arg_list(&args, "--profile-fwd-bwd")? {
        let p: Vec<usize> = p.iter().filter_map(|x| x.parse().ok()).collect();
        let [n, d, steps] = p[..] else {
            bail!("`--profile-fwd-bwd` takes three numbers N,D,STEPS")
        };
        return profile_fwd_bwd(
            Workload::new(1, num(&args, "--heads", 12)?, n, d, false),
            steps,
        );
    }
    let ns = nums(&args, "--n", &[512, 1024, 2048, 4096, 8192])?;
    let ds = nums(&args, "--d", &[64, 128])?;
    let reps = num(&args, "--reps", 3)?;
    let h = num(&args, "--heads", 12)?;
    let max_naive = num(&args, "--max-naive-n", 4096)?;
    let causals: Vec<bool> = match arg_list(&args, "--causal")?.as_deref() {
        None => vec![false, true],
        Some([c]) if c == "both" => vec![false, true],
        Some([c]) if c == "yes" => vec![true],
        Some([c]) if c == "no" => vec![false],
        Some(c) => bail!("`--causal` takes no, yes or both, got `{}`", c.join(",")),
    };
    let variants: Vec<Variant> = match arg_list(&args, "--variants")? {
        None => vec![Variant::V2, Variant::V1, Variant::Naive, Variant::CandleNn],
        Some(v) => v
            .iter()
            .map(|s| match Variant::parse(s) {
                Some(v) if v != Variant::TorchSdpa => Ok(v),
                _ => bail!("`--variants` takes v1, v2, naive, candle-nn; got `{s}`"),
            })
            .collect::<Result<_>>()?,
    };
    let dtypes: Vec<DType> = match arg_list(&args, "--dtype")? {
        None => vec![DType::F32],
        Some(v) => v
            .iter()
            .map(|s| match s.as_str() {
                "f32" => Ok(DType::F32),
                "bf16" => Ok(DType::BF16),
                "f16" => Ok(DType::F16),
                _ => bail!("`--dtype` takes f32, bf16, f16; got `{s}`"),
            })
            .collect::<Result<_>>()?,
    };
    let decode_sk = nums(&args, "--decode", &[])?;
    let decode_hk = nums(&args, "--decode-kv-heads", &[32, 8])?;
    let threads = rayon::current_num_threads();
    println!(
        "# flash-ops CPU attention benchmark: batch 1, {h} heads, {threads} threads, median of {reps}\n"
    );
    println!(
        "CPU: {}; gemm micro-kernels: {}; flash-ops kernels: {}\n",
        cpu_model(),
        gemm_path(),
        kernel_path()
    );
    let ceiling = gemm_ceiling(reps, &Device::Cpu, DType::F32)?;
    println!(
        "fp32 GEMM ceiling in this run (candle matmul {}³): {ceiling:.1} GFLOP/s\n",
        gemm_ceiling_n(&Device::Cpu),
    );
    let (ghz, fma) = (clock_ghz(200), fma_peak_gflops(200));
    let opt = |x: Option<f64>| x.map_or("–".into(), |x| format!("{x:.2}"));
    println!(
        "measured (best of 200 short runs): clock {} GHz, one core's f32 FMA peak {} GFLOP/s (× {threads} threads: {})\n",
        opt(ghz),
        opt(fma),
        opt(fma.map(|g| g * threads as f64)),
    );
    println!("| dtype | N | d | causal | variant | fwd ms | fwd GFLOP/s | bwd ms | bwd GFLOP/s | fwd+bwd ms | fwd+bwd GFLOP/s | fwd, fwd+bwd % of ceiling | peak mem fwd | peak mem fwd+bwd |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for &dtype in &dtypes {
        for &d in &ds {
            for &causal in &causals {
                for &n in &ns {
                    for &v in &variants {
                        let f32_only = v == Variant::CandleNn && dtype != DType::F32;
                        if f32_only
                            || matches!(v, Variant::Naive | Variant::CandleNn) && n > max_naive
                        {
                            continue;
                        }
                        let w = Workload::new(1, h, n, d, causal);
                        let r = measure(v, &w, reps, &Device::Cpu, dtype)?;
                        print_row(&r, dtype, ceiling);
                        rows.push((dtype, r));
                    }
                }
            }
        }
    }
    // Ratios within this run: the targets.
    let find = |v: Variant, n: usize, d: usize, c: bool| -> Option<&Row> {
        rows.iter().map(|(_, r)| r).find(|r| {
            r.variant == v && r.workload.n == n && r.workload.d == d && r.workload.causal == c
        })
    };
    println!("\n## Ratios measured in this run ({:?})", dtypes[0]);
    for &d in &ds {
        for &c in &causals {
            for &n in &ns {
                let (Some(v2), naive, nn) = (
                    find(Variant::V2, n, d, c),
                    find(Variant::Naive, n, d, c),
                    find(Variant::CandleNn, n, d, c),
                ) else {
                    continue;
                };
                let mut parts = Vec::new();
                if let (Some(a), Some(b)) = (naive.and_then(|r| r.fwd_bwd_ms), v2.fwd_bwd_ms) {
                    parts.push(format!("V2 fwd+bwd {:.2}× faster than naive", a / b));
                }
                if let Some(nn) = nn {
                    parts.push(format!(
                        "V2 fwd {:.1}× faster than candle-nn flash_attn",
                        nn.fwd_ms / v2.fwd_ms
                    ));
                }
                if let Some(v1) = find(Variant::V1, n, d, c) {
                    if let (Some(a), Some(b)) = (v1.fwd_bwd_ms, v2.fwd_bwd_ms) {
                        parts.push(format!("V2 fwd+bwd {:.2}× V1", a / b));
                    }
                }
                if !parts.is_empty() {
                    println!("- N={n} d={d} causal={c}: {}", parts.join("; "));
                }
            }
        }
    }
    if arg_list(&args, "--linear-memory-n")?.is_some() {
        linear_memory(num(&args, "--linear-memory-n", 0)?, h)?;
    }
    let decode = if decode_sk.is_empty() {
        Vec::new()
    } else {
        decode_rows(&decode_sk, &decode_hk, &dtypes, reps)?
    };
    if let Some(path) = arg_list(&args, "--json")?.map(|v| v.join(",")) {
        let items: Vec<String> = rows
            .iter()
            .map(|(dtype, r)| {
                format!(
                    "{{\"dtype\":\"{}\",\"n\":{},\"d\":{},\"heads\":{h},\"causal\":{},\"variant\":\"{}\",\"fwd_flops\":{},\"fwd_ms\":{:.3},\"fwd_bwd_ms\":{},\"fwd_peak_bytes\":{},\"fwd_bwd_peak_bytes\":{}}}",
                    dtype.as_str(),
                    r.workload.n,
                    r.workload.d,
                    r.workload.causal,
                    r.variant.key(),
                    r.workload.fwd_flops(),
                    r.fwd_ms,
                    r.fwd_bwd_ms.map(|t| format!("{t:.3}")).unwrap_or("null".into()),
                    r.fwd_mem.map(|m| m.to_string()).unwrap_or("null".into()),
                    r.fwd_bwd_mem.map(|m| m.to_string()).unwrap_or("null".into()),
                )
            })
            .collect();
        let machine = format!(
            "{{\"cpu\":{:?},\"gemm_path\":{:?},\"kernel_path\":{:?},\"threads\":{threads},\"reps\":{reps},\"gemm_ceiling_n\":{},\"gemm_ceiling_gflops\":{ceiling:.2},\"clock_ghz\":{},\"core_fma_peak_gflops\":{},\"read_gbps\":{}}}",
            cpu_model(),
            gemm_path(),
            kernel_path(),
            gemm_ceiling_n(&Device::Cpu),
            ghz.map_or("null".into(), |x| format!("{x:.3}")),
            fma.map_or("null".into(), |x| format!("{x:.2}")),
            decode.first().map_or("null".into(), |r| format!("{:.2}", r.read_gbps)),
        );
        let decode: Vec<String> = decode.iter().map(DecodeRow::json).collect();
        std::fs::write(
            &path,
            format!(
                "{{\"machine\": {machine},\n\"rows\": [\n{}\n],\n\"decode\": [\n{}\n]}}\n",
                items.join(",\n"),
                decode.join(",\n")
            ),
        )?;
        println!("\nwrote {path}");
    }
    Ok(())
}

/// `steps` V2 forward+backward steps on one workload, nothing else (see `--profile-fwd-bwd`).
fn profile_fwd_bwd(w: Workload, steps: usize) -> Result<()> {
    let input = || Tensor::randn(0f32, 1.0, w.shape(), &Device::Cpu);
    let (q, k, v) = (
        Var::from_tensor(&input()?)?,
        Var::from_tensor(&input()?)?,
        Var::from_tensor(&input()?)?,
    );
    let d_out = input()?;
    let t = Instant::now();
    for _ in 0..steps {
        let o = Variant::V2.forward(q.as_tensor(), k.as_tensor(), v.as_tensor(), &w)?;
        (o * &d_out)?.sum_all()?.backward()?;
    }
    let ms = t.elapsed().as_secs_f64() * 1e3 / steps.max(1) as f64;
    let gflops = (1.0 + BWD_PER_FWD_FLOPS) * w.fwd_flops() / ms / 1e6;
    println!(
        "flash V2 fwd+bwd N={} d={} H={}: {ms:.1} ms/step, {gflops:.1} GFLOP/s",
        w.n, w.d, w.heads
    );
    Ok(())
}

/// One table row: times, GFLOP/s (paper FLOP count) and their share of the GEMM `ceiling`.
fn print_row(r: &Row, dtype: DType, ceiling: f64) {
    let f = r.workload.fwd_flops();
    let gflops = |flops: f64, ms: f64| flops / ms / 1e6;
    let opt = |x: Option<f64>| x.map_or("–".into(), |t| format!("{t:.1}"));
    let bwd = r.bwd_ms();
    let fb = r
        .fwd_bwd_ms
        .map(|t| gflops((1.0 + BWD_PER_FWD_FLOPS) * f, t));
    println!(
        "| {} | {} | {} | {} | {} | {:.1} | {:.1} | {} | {} | {} | {} | {:.0}%, {} | {} | {} |",
        dtype.as_str(),
        r.workload.n,
        r.workload.d,
        if r.workload.causal { "yes" } else { "no" },
        r.variant.name(),
        r.fwd_ms,
        gflops(f, r.fwd_ms),
        opt(bwd),
        opt(bwd.map(|t| gflops(BWD_PER_FWD_FLOPS * f, t))),
        opt(r.fwd_bwd_ms),
        opt(fb),
        100.0 * gflops(f, r.fwd_ms) / ceiling,
        fb.map_or("–".into(), |g| format!("{:.0}%", 100.0 * g / ceiling)),
        r.fwd_mem.map(mb).unwrap_or("–".into()),
        r.fwd_bwd_mem.map(mb).unwrap_or("–".into()),
    );
}

/// One decoding step measured: its workload, dtype, time and the run's read bandwidth.
struct DecodeRow {
    w: DecodeWorkload,
    dtype: DType,
    ms: f64,
    read_gbps: f64,
}

impl DecodeRow {
    /// The time K and V take to read at the measured bandwidth, ms.
    fn roof_ms(&self) -> f64 {
        self.w.kv_bytes(self.dtype) as f64 / self.read_gbps / 1e6
    }

    fn json(&self) -> String {
        format!(
            "{{\"dtype\":\"{}\",\"sq\":1,\"sk\":{},\"heads_q\":{},\"heads_k\":{},\"d\":{},\"kv_bytes\":{},\"ms\":{:.4},\"roof_ms\":{:.4}}}",
            self.dtype.as_str(),
            self.w.sk,
            self.w.heads_q,
            self.w.heads_k,
            self.w.d,
            self.w.kv_bytes(self.dtype),
            self.ms,
            self.roof_ms(),
        )
    }
}

/// Decoding steps (B1, 32 query heads, d 128, one query row) for every `sk` and k/v head count,
/// against the read bandwidth measured first.
fn decode_rows(
    sks: &[usize],
    hks: &[usize],
    dtypes: &[DType],
    reps: usize,
) -> Result<Vec<DecodeRow>> {
    let read_gbps = read_bandwidth(reps.max(3))?;
    println!("\n## Decoding: one query row, B1, 32 query heads, d 128, flash V2 forward\n");
    println!("memory read bandwidth in this run (parallel read of 256 MiB): {read_gbps:.1} GB/s\n");
    println!(
        "| dtype | kv heads | sk | K+V MB | ms | GB/s | read-bandwidth time ms | × that time |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut out = Vec::new();
    for &dtype in dtypes {
        for &hk in hks {
            for &sk in sks {
                let w = DecodeWorkload {
                    sk,
                    heads_q: 32,
                    heads_k: hk,
                    d: 128,
                };
                let r = DecodeRow {
                    w,
                    dtype,
                    ms: measure_decode(&w, reps, dtype)?,
                    read_gbps,
                };
                let bytes = w.kv_bytes(dtype) as f64;
                println!(
                    "| {} | {hk} | {sk} | {:.1} | {:.3} | {:.1} | {:.3} | {:.2} |",
                    dtype.as_str(),
                    bytes / 1e6,
                    r.ms,
                    bytes / r.ms / 1e6,
                    r.roof_ms(),
                    r.ms / r.roof_ms(),
                );
                out.push(r);
            }
        }
    }
    Ok(out)
}

/// Flash V2 forward+backward at a length where naive attention's N×N matrices alone would not
/// fit: measured peak next to the size of one naive score matrix.
fn linear_memory(n: usize, h: usize) -> Result<()> {
    let d = 64;
    let r = measure(
        Variant::V2,
        &Workload::new(1, h, n, d, true),
        1,
        &Device::Cpu,
        DType::F32,
    )?;
    let inputs = 4 * n * h * d * 4;
    let one_scores = n * n * h * DType::F32.size_in_bytes();
    println!(
        "\n## Linear memory at N={n} (d={d}, {h} heads, causal)\n- flash V2 fwd+bwd: {:.1} s, peak extra heap {} (q, k, v, dO themselves: {})\n- naive would hold several N×N f32 matrices of {} each (scores, probabilities, their gradients): not run",
        r.fwd_bwd_ms.unwrap_or(0.0) / 1e3,
        mb(r.fwd_bwd_mem.unwrap_or(0)),
        mb(inputs),
        mb(one_scores),
    );
    Ok(())
}
