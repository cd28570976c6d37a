//! Attention benchmark on CPU: forward, backward and forward+backward time, achieved GFLOP/s and
//! peak extra heap memory for flash V1, flash V2, Candle naive attention (matmul → softmax →
//! matmul, Candle autograd for backward) and candle-nn's CPU `attention::flash_attn` (forward
//! only). f32, batch 1, 12 heads by default.
//!
//! `cargo bench -p flash-ops-bench -- [--n 512,1024] [--d 64,128] [--causal no|yes|both]
//!   [--variants v1,v2,naive,candle-nn] [--reps 3] [--heads 12] [--max-naive-n 4096]
//!   [--json FILE] [--linear-memory-n 16384]`

use candle_core::{bail, DType, Device, Result};
use flash_ops_bench::args::{arg_list, num, nums};
use flash_ops_bench::{
    cpu_model, gemm_ceiling, gemm_ceiling_n, gemm_path, kernel_path, measure, PeakAlloc, Row,
    Variant, Workload, BWD_PER_FWD_FLOPS,
};

#[global_allocator]
static GLOBAL: PeakAlloc = PeakAlloc;

fn mb(b: usize) -> String {
    format!("{:.0} MB", b as f64 / 1e6)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
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
    let threads = rayon::current_num_threads();
    println!(
        "# flash-ops CPU attention benchmark: f32, batch 1, {h} heads, {threads} threads, median of {reps}\n"
    );
    println!(
        "CPU: {}; gemm micro-kernels: {}; flash-ops kernels: {}\n",
        cpu_model(),
        gemm_path(),
        kernel_path()
    );
    println!(
        "fp32 GEMM ceiling in this run (candle matmul {}³): {:.1} GFLOP/s\n",
        gemm_ceiling_n(&Device::Cpu),
        gemm_ceiling(reps, &Device::Cpu, DType::F32)?
    );
    println!("| N | d | causal | variant | fwd ms | fwd GFLOP/s | bwd ms | fwd+bwd ms | fwd+bwd GFLOP/s | peak mem fwd | peak mem fwd+bwd |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for &d in &ds {
        for &causal in &causals {
            for &n in &ns {
                for &v in &variants {
                    if matches!(v, Variant::Naive | Variant::CandleNn) && n > max_naive {
                        continue;
                    }
                    let w = Workload::new(1, h, n, d, causal);
                    let r = measure(v, &w, reps, &Device::Cpu, DType::F32)?;
                    let f = w.fwd_flops();
                    let bwd = r.bwd_ms();
                    let opt =
                        |x: Option<f64>, g: &dyn Fn(f64) -> String| x.map(g).unwrap_or("–".into());
                    println!(
                        "| {n} | {d} | {} | {} | {:.1} | {:.1} | {} | {} | {} | {} | {} |",
                        if causal { "yes" } else { "no" },
                        v.name(),
                        r.fwd_ms,
                        f / r.fwd_ms / 1e6,
                        opt(bwd, &|t| format!("{t:.1}")),
                        opt(r.fwd_bwd_ms, &|t| format!("{t:.1}")),
                        opt(r.fwd_bwd_ms, &|t| {
                            format!("{:.1}", (1.0 + BWD_PER_FWD_FLOPS) * f / t / 1e6)
                        }),
                        r.fwd_mem.map(mb).unwrap_or("–".into()),
                        r.fwd_bwd_mem.map(mb).unwrap_or("–".into()),
                    );
                    rows.push(r);
                }
            }
        }
    }
    // Ratios within this run: the targets.
    let find = |v: Variant, n: usize, d: usize, c: bool| -> Option<&Row> {
        rows.iter().find(|r| {
            r.variant == v && r.workload.n == n && r.workload.d == d && r.workload.causal == c
        })
    };
    println!("\n## Ratios measured in this run");
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
    if let Some(path) = arg_list(&args, "--json")?.map(|v| v.join(",")) {
        let items: Vec<String> = rows
            .iter()
            .map(|r| {
                format!(
                    "{{\"n\":{},\"d\":{},\"heads\":{h},\"causal\":{},\"variant\":\"{}\",\"fwd_ms\":{:.3},\"fwd_bwd_ms\":{},\"fwd_peak_bytes\":{},\"fwd_bwd_peak_bytes\":{}}}",
                    r.workload.n,
                    r.workload.d,
                    r.workload.causal,
                    r.variant.key(),
                    r.fwd_ms,
                    r.fwd_bwd_ms.map(|t| format!("{t:.3}")).unwrap_or("null".into()),
                    r.fwd_mem.map(|m| m.to_string()).unwrap_or("null".into()),
                    r.fwd_bwd_mem.map(|m| m.to_string()).unwrap_or("null".into()),
                )
            })
            .collect();
        std::fs::write(&path, format!("[\n{}\n]\n", items.join(",\n")))?;
        println!("\nwrote {path}");
    }
    Ok(())
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
