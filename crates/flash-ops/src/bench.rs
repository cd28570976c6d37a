//! Measurement helpers shared by `cargo bench -p flash-ops` and the reproduction commands:
//! timing (median of repeats), peak heap memory through a counting allocator, the attention
//! variants under comparison and the FLOP counts of the FlashAttention-2 paper.
//!
//! FLOPs: forward 4·N²·d·H (half when causal), backward 2.5× forward, forward+backward 3.5×.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var};

use crate::{flash_attn, reference::naive_attention, Algorithm, AttnOptions};

/// A counting global allocator: install it with
/// `#[global_allocator] static A: flash_ops::bench::PeakAlloc = flash_ops::bench::PeakAlloc;`
/// to make [`peak_extra`] measure heap peaks.
pub struct PeakAlloc;
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

/// Runs `f` once and returns the peak heap bytes it added above what was live before.
pub fn peak_extra<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed).saturating_sub(base))
}

pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    xs[xs.len() / 2]
}

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Variant {
    V1,
    V2,
    Naive,
    CandleNn,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::V1 => "flash V1",
            Variant::V2 => "flash V2",
            Variant::Naive => "candle naive",
            Variant::CandleNn => "candle-nn flash_attn",
        }
    }
    pub const ALL: [Variant; 4] = [Variant::V1, Variant::V2, Variant::Naive, Variant::CandleNn];

    /// The short name used on command lines and in result files.
    pub fn key(self) -> &'static str {
        match self {
            Variant::V1 => "v1",
            Variant::V2 => "v2",
            Variant::Naive => "naive",
            Variant::CandleNn => "candle-nn",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.key() == s)
    }
}

/// One attention problem of the benchmarks: dense `(batch, n, heads, d)` self-attention.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Workload {
    pub batch: usize,
    pub heads: usize,
    pub n: usize,
    pub d: usize,
    pub causal: bool,
    /// FlashAttention's "dropout + masking" setting: attention dropout with this probability and
    /// a key-padding mask (batch element `i` keeps `n − i·n/(4·batch)` keys).
    pub dropout_and_padding: Option<f32>,
}

impl Workload {
    pub fn new(batch: usize, heads: usize, n: usize, d: usize, causal: bool) -> Self {
        Self {
            batch,
            heads,
            n,
            d,
            causal,
            dropout_and_padding: None,
        }
    }

    pub fn options(&self) -> AttnOptions {
        let mut o = AttnOptions::new().causal(self.causal);
        if let Some(p) = self.dropout_and_padding {
            let lengths = (0..self.batch)
                .map(|i| self.n - i * self.n / (4 * self.batch))
                .collect();
            o = o.dropout(p, 0x5EED).key_lengths(lengths);
        }
        o
    }

    /// Forward FLOPs of the FlashAttention-2 paper's count: 4·N²·d·H per sequence, half if causal.
    pub fn fwd_flops(&self) -> f64 {
        self.batch as f64 * flops_fwd(self.n, self.d, self.heads, self.causal)
    }
}

/// Runs one variant's forward pass.
pub fn forward(v: Variant, q: &Tensor, k: &Tensor, val: &Tensor, w: &Workload) -> Result<Tensor> {
    let opts = w.options();
    match v {
        Variant::V1 => flash_attn(q, k, val, &opts.algorithm(Algorithm::V1)),
        Variant::V2 => flash_attn(q, k, val, &opts.algorithm(Algorithm::V2)),
        Variant::Naive => naive_attention(q, k, val, &opts),
        Variant::CandleNn => {
            use candle_nn::attention::{flash_attn as nn_flash, AttnMask};
            if w.dropout_and_padding.is_some() {
                candle_core::bail!("candle-nn flash_attn has no dropout or key padding")
            }
            let mask = if w.causal {
                AttnMask::causal()
            } else {
                AttnMask::None
            };
            nn_flash::<f32>(q, k, val, 1.0 / (w.d as f32).sqrt(), mask, None, None)
        }
    }
}

/// Timings (median of `reps`, after one warm-up that also measures peak memory) of one variant.
pub struct Row {
    pub workload: Workload,
    pub variant: Variant,
    pub fwd_ms: f64,
    /// `None` for forward-only variants.
    pub fwd_bwd_ms: Option<f64>,
    /// Peak bytes above what was live before; `None` where the device has no counter (Metal).
    pub fwd_mem: Option<usize>,
    pub fwd_bwd_mem: Option<usize>,
}

impl Row {
    pub fn bwd_ms(&self) -> Option<f64> {
        self.fwd_bwd_ms.map(|t| t - self.fwd_ms)
    }
}

/// Runs `f` once and returns the peak bytes it added on `dev` above what was live before: heap
/// bytes on the CPU (needs [`PeakAlloc`] installed), the high-water mark of the stream-ordered
/// memory pool Candle allocates from on CUDA, `None` on Metal.
pub fn peak_extra_on<T>(dev: &Device, f: impl FnOnce() -> Result<T>) -> Result<(T, Option<usize>)> {
    match dev {
        Device::Cpu => {
            let (out, peak) = peak_extra(f);
            Ok((out?, Some(peak)))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            dev.synchronize()?;
            let base = crate::cuda::pool_memory::reset_peak(d)?;
            let out = f()?;
            dev.synchronize()?;
            let peak = crate::cuda::pool_memory::peak(d)?;
            Ok((out, Some(peak.saturating_sub(base) as usize)))
        }
        _ => Ok((f()?, None)),
    }
}

/// Wall time of `f` in ms, waiting for the device's queued work before and after.
fn time_ms(dev: &Device, f: impl FnOnce() -> Result<()>) -> Result<f64> {
    dev.synchronize()?;
    let t = Instant::now();
    f()?;
    dev.synchronize()?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// Times one variant on `dev` with inputs of `dtype` (the papers' GPU runs: bf16/f16; CPU: f32).
pub fn measure(v: Variant, w: &Workload, reps: usize, dev: &Device, dtype: DType) -> Result<Row> {
    if v == Variant::CandleNn && (!dev.is_cpu() || dtype != DType::F32) {
        candle_core::bail!("candle-nn flash_attn is measured on the CPU in f32 only")
    }
    let shape = (w.batch, w.n, w.heads, w.d);
    let input = || Tensor::randn(0f32, 1.0, shape, dev)?.to_dtype(dtype);
    let q = Var::from_tensor(&input()?)?;
    let k = Var::from_tensor(&input()?)?;
    let val = Var::from_tensor(&input()?)?;
    let d_out = input()?;
    let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), val.as_tensor());
    // Forward only: detached inputs, so no graph is kept.
    let (qd, kd, vd) = (qt.detach(), kt.detach(), vt.detach());
    let fwd_once = || forward(v, &qd, &kd, &vd, w).map(drop);
    let ((), fwd_mem) = peak_extra_on(dev, fwd_once)?;
    let fwd = (0..reps)
        .map(|_| time_ms(dev, fwd_once))
        .collect::<Result<Vec<_>>>()?;
    let (fwd_bwd_ms, fwd_bwd_mem) = if v == Variant::CandleNn {
        (None, None)
    } else {
        let step = || -> Result<()> {
            let o = forward(v, qt, kt, vt, w)?;
            let g = (o * &d_out)?.sum_all()?.backward()?;
            if g.get(qt).is_none() || g.get(kt).is_none() || g.get(vt).is_none() {
                candle_core::bail!("{}: a gradient is missing", v.name())
            }
            Ok(())
        };
        let ((), mem) = peak_extra_on(dev, step)?;
        let times = (0..reps)
            .map(|_| time_ms(dev, step))
            .collect::<Result<Vec<_>>>()?;
        (Some(median(times)), mem)
    };
    Ok(Row {
        workload: *w,
        variant: v,
        fwd_ms: median(fwd),
        fwd_bwd_ms,
        fwd_mem,
        fwd_bwd_mem,
    })
}

/// The matmul size of [`gemm_ceiling`]: large enough to reach the device's matmul peak.
pub fn gemm_ceiling_n(dev: &Device) -> usize {
    if dev.is_cpu() {
        2048
    } else {
        8192
    }
}

/// What a large plain matmul in `dtype` reaches on `dev` now (GFLOP/s): the roof the tiled
/// kernels aim at.
pub fn gemm_ceiling(reps: usize, dev: &Device, dtype: DType) -> Result<f64> {
    let n = gemm_ceiling_n(dev);
    let a = Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(dtype)?;
    time_ms(dev, || a.matmul(&b).map(drop))?;
    let ts = (0..reps)
        .map(|_| time_ms(dev, || a.matmul(&b).map(drop)))
        .collect::<Result<Vec<_>>>()?;
    Ok(2.0 * (n as f64).powi(3) / median(ts) / 1e6)
}

/// Backward FLOPs per forward FLOP in the FlashAttention-2 paper's count (2 matmuls forward, 5
/// backward); forward+backward is `1 + BWD_PER_FWD_FLOPS`.
pub const BWD_PER_FWD_FLOPS: f64 = 2.5;

pub fn flops_fwd(n: usize, d: usize, h: usize, causal: bool) -> f64 {
    let f = 4.0 * (n * n) as f64 * d as f64 * h as f64;
    if causal {
        f / 2.0
    } else {
        f
    }
}
