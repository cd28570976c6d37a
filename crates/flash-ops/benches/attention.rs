//! Attention benchmark on CPU: forward, backward and forward+backward time, achieved GFLOP/s and
//! peak extra heap memory for flash V1, flash V2, Candle naive attention (matmul → softmax →
//! matmul, Candle autograd for backward) and candle-nn's CPU `attention::flash_attn` (forward
//! only). f32, batch 1, 12 heads by default.
//!
//! `cargo bench -p flash-ops -- [--n 512,1024] [--d 64,128] [--causal no|yes|both]
//!   [--variants v1,v2,naive,candle-nn] [--reps 3] [--max-naive-n 4096] [--json FILE]
//!   [--linear-memory-n 16384]`
//!
//! FLOPs: forward 4·N²·d·H (half when causal), backward 2.5× forward (the FlashAttention-2
//! paper's convention). Memory: peak heap bytes above the inputs during the call, from a
//! counting global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var};
use flash_ops::{flash_attn, reference::naive_attention, Algorithm, AttnOptions};

struct PeakAlloc;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, only counting bytes.
unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static GLOBAL: PeakAlloc = PeakAlloc;

/// Runs `f` once and returns the peak heap bytes it added above what was live before.
fn peak_extra<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed).saturating_sub(base))
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    xs[xs.len() / 2]
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Variant {
    V1,
    V2,
    Naive,
    CandleNn,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::V1 => "flash V1",
            Variant::V2 => "flash V2",
            Variant::Naive => "candle naive",
            Variant::CandleNn => "candle-nn flash_attn",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "v1" => Variant::V1,
            "v2" => Variant::V2,
            "naive" => Variant::Naive,
            "candle-nn" => Variant::CandleNn,
            _ => return None,
        })
    }
}

fn forward(v: Variant, q: &Tensor, k: &Tensor, val: &Tensor, causal: bool) -> Result<Tensor> {
    let opts = AttnOptions::new().causal(causal);
    match v {
        Variant::V1 => flash_attn(q, k, val, &opts.algorithm(Algorithm::V1)),
        Variant::V2 => flash_attn(q, k, val, &opts.algorithm(Algorithm::V2)),
        Variant::Naive => naive_attention(q, k, val, &opts),
        Variant::CandleNn => {
            use candle_nn::attention::{flash_attn as nn_flash, AttnMask};
            let d = q.dim(3)?;
            let mask = if causal {
                AttnMask::causal()
            } else {
                AttnMask::None
            };
            nn_flash::<f32>(q, k, val, 1.0 / (d as f32).sqrt(), mask, None, None)
        }
    }
}

struct Row {
    n: usize,
    d: usize,
    causal: bool,
    variant: Variant,
    fwd_ms: f64,
    fwd_bwd_ms: Option<f64>,
    fwd_mem: usize,
    fwd_bwd_mem: Option<usize>,
}

fn measure(v: Variant, n: usize, d: usize, h: usize, causal: bool, reps: usize) -> Result<Row> {
    let dev = Device::Cpu;
    let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, n, h, d), &dev)?)?;
    let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, n, h, d), &dev)?)?;
    let val = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, n, h, d), &dev)?)?;
    let d_out = Tensor::randn(0f32, 1.0, (1, n, h, d), &dev)?;
    let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), val.as_tensor());
    // Forward only: detached inputs, so no graph is kept.
    let (qd, kd, vd) = (qt.detach(), kt.detach(), vt.detach());
    let (_, fwd_mem) = peak_extra(|| forward(v, &qd, &kd, &vd, causal).map(|o| o.dims().to_vec()));
    let mut fwd = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let o = forward(v, &qd, &kd, &vd, causal)?;
        fwd.push(t.elapsed().as_secs_f64() * 1e3);
        drop(o);
    }
    let (fwd_bwd_ms, fwd_bwd_mem) = if v == Variant::CandleNn {
        (None, None)
    } else {
        let step = || -> Result<()> {
            let o = forward(v, qt, kt, vt, causal)?;
            let g = (o * &d_out)?.sum_all()?.backward()?;
            assert!(g.get(qt).is_some() && g.get(kt).is_some() && g.get(vt).is_some());
            Ok(())
        };
        let (r, mem) = peak_extra(step);
        r?;
        let mut times = Vec::new();
        for _ in 0..reps {
            let t = Instant::now();
            step()?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        (Some(median(times)), Some(mem))
    };
    Ok(Row {
        n,
        d,
        causal,
        variant: v,
        fwd_ms: median(fwd),
        fwd_bwd_ms,
        fwd_mem,
        fwd_bwd_mem,
    })
}

/// What a large plain matmul reaches on this machine now: the roof the tiled kernels aim at.
fn gemm_ceiling(reps: usize) -> Result<f64> {
    let n = 2048;
    let a = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    a.matmul(&b)?;
    let mut ts = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        a.matmul(&b)?;
        ts.push(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n as f64).powi(3) / median(ts) / 1e9)
}

fn flops_fwd(n: usize, d: usize, h: usize, causal: bool) -> f64 {
    let f = 4.0 * (n * n) as f64 * d as f64 * h as f64;
    if causal {
        f / 2.0
    } else {
        f
    }
}

fn mb(b: usize) -> String {
    format!("{:.0} MB", b as f64 / 1e6)
}

fn arg_list(args: &[String], name: &str) -> Option<Vec<String>> {
    let i = args.iter().position(|a| a == name)?;
    Some(args.get(i + 1)?.split(',').map(str::to_string).collect())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let nums = |name: &str, default: &[usize]| -> Vec<usize> {
        arg_list(&args, name)
            .map(|v| v.iter().map(|x| x.parse().expect("a number")).collect())
            .unwrap_or_else(|| default.to_vec())
    };
    let ns = nums("--n", &[512, 1024, 2048, 4096, 8192]);
    let ds = nums("--d", &[64, 128]);
    let reps = nums("--reps", &[3])[0];
    let h = nums("--heads", &[12])[0];
    let max_naive = nums("--max-naive-n", &[4096])[0];
    let causals: Vec<bool> = match arg_list(&args, "--causal").as_deref() {
        Some([c]) if c == "yes" => vec![true],
        Some([c]) if c == "no" => vec![false],
        _ => vec![false, true],
    };
    let variants: Vec<Variant> = arg_list(&args, "--variants")
        .map(|v| {
            v.iter()
                .map(|s| Variant::parse(s).expect("v1|v2|naive|candle-nn"))
                .collect()
        })
        .unwrap_or_else(|| vec![Variant::V2, Variant::V1, Variant::Naive, Variant::CandleNn]);
    let threads = rayon::current_num_threads();
    println!(
        "# flash-ops CPU attention benchmark: f32, batch 1, {h} heads, {threads} threads, median of {reps}\n"
    );
    println!(
        "fp32 GEMM ceiling in this run (candle matmul 2048³): {:.1} GFLOP/s\n",
        gemm_ceiling(reps)?
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
                    let r = measure(v, n, d, h, causal, reps)?;
                    let f = flops_fwd(n, d, h, causal);
                    let bwd = r.fwd_bwd_ms.map(|t| t - r.fwd_ms);
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
                        opt(r.fwd_bwd_ms, &|t| format!("{:.1}", 3.5 * f / t / 1e6)),
                        mb(r.fwd_mem),
                        r.fwd_bwd_mem.map(mb).unwrap_or("–".into()),
                    );
                    rows.push(r);
                }
            }
        }
    }
    // Ratios within this run: the targets.
    let find = |v: Variant, n: usize, d: usize, c: bool| {
        rows.iter()
            .find(|r| r.variant == v && r.n == n && r.d == d && r.causal == c)
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
    if let Some(n) = arg_list(&args, "--linear-memory-n").map(|v| v[0].parse::<usize>().unwrap()) {
        linear_memory(n, h)?;
    }
    if let Some(path) = arg_list(&args, "--json").map(|v| v[0].clone()) {
        let items: Vec<String> = rows
            .iter()
            .map(|r| {
                format!(
                    "{{\"n\":{},\"d\":{},\"heads\":{h},\"causal\":{},\"variant\":\"{}\",\"fwd_ms\":{:.3},\"fwd_bwd_ms\":{},\"fwd_peak_bytes\":{},\"fwd_bwd_peak_bytes\":{}}}",
                    r.n,
                    r.d,
                    r.causal,
                    r.variant.name(),
                    r.fwd_ms,
                    r.fwd_bwd_ms.map(|t| format!("{t:.3}")).unwrap_or("null".into()),
                    r.fwd_mem,
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
    let r = measure(Variant::V2, n, d, h, true, 1)?;
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
