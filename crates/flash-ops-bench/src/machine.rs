//! The machine a measurement ran on, for every report's header, and its memory read bandwidth.

use std::time::Instant;

use candle_core::{bail, Result};
use rayon::prelude::*;

use crate::median;

/// Bytes [`read_bandwidth`] streams: 8× the 32 MiB L3 of a Zen 2/3 CCX (and above any server
/// L3 slice a thread sees), so the read comes from DRAM.
pub const BANDWIDTH_BYTES: usize = 256 << 20;

/// What a plain parallel read of [`BANDWIDTH_BYTES`] reaches now, GB/s (median of `reps` after a
/// warm-up), on all threads of the rayon pool: the roof of memory-bound work such as a decoding
/// step. Summing u64 words with wrapping adds has a 1-cycle dependency, so it vectorises and
/// keeps up with the memory system.
pub fn read_bandwidth(reps: usize) -> Result<f64> {
    if reps == 0 {
        bail!("read_bandwidth: `reps` must be at least 1, got 0")
    }
    // Non-zero, so every page is written and backed before the timing.
    let buf = vec![1u64; BANDWIDTH_BYTES / 8];
    let read = || {
        let t = Instant::now();
        let sum = buf
            .par_chunks(1 << 15)
            .map(|c| c.iter().fold(0u64, |a, &x| a.wrapping_add(x)))
            .reduce(|| 0, u64::wrapping_add);
        std::hint::black_box(sum);
        BANDWIDTH_BYTES as f64 / t.elapsed().as_secs_f64() / 1e9
    };
    read();
    let rates: Vec<f64> = (0..reps).map(|_| read()).collect();
    Ok(median(&rates).unwrap_or(0.0))
}

/// The CPU's model name (Linux `/proc/cpuinfo`), else the architecture.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// Which micro-kernels `gemm` (flash-ops' CPU tile products and Candle's CPU matmul) runs here.
/// It picks at run time, as this does: with its `x86-v4` feature (on through the workspace's
/// `gemm` dependency, which flash-ops uses) AVX-512 when `avx512f` is detected, else AVX2+FMA
/// when `fma` is, else scalar; NEON on aarch64.
pub fn gemm_path() -> &'static str {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            "AVX-512 (avx512f detected)"
        } else if std::arch::is_x86_feature_detected!("fma") {
            "AVX2+FMA (no avx512f)"
        } else {
            "scalar (no fma)"
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            "NEON"
        } else {
            "scalar (no neon)"
        }
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "scalar"
    }
}

/// The path of flash-ops' own CPU kernels (the fused score-tile passes): `avx512`, `avx2` or
/// `portable`, as detected or forced with `FLASH_OPS_CPU_ISA`; a refused forcing says why.
pub fn kernel_path() -> String {
    use flash_ops::simd::{Isa, ISA_VAR};
    match (Isa::active(), std::env::var(ISA_VAR)) {
        (Ok(isa), Ok(_)) => format!("{} (forced by {ISA_VAR})", isa.name()),
        (Ok(isa), Err(_)) => format!("{} (detected; {ISA_VAR} forces one)", isa.name()),
        (Err(e), _) => format!("none: {e}"),
    }
}

/// Best of `reps` timed runs of `f`, which returns the work it did: the rate of a run that the
/// scheduler left alone (the dev machines are shared, so a median would measure the neighbours).
fn best_rate(reps: usize, f: impl Fn() -> f64) -> f64 {
    (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            let work = f();
            work / t.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

/// The core clock while running, GHz: a chain of dependent integer adds retires one per cycle
/// on every x86 core since the P6, so adds per second is the clock (no PMU needed: VMs hide
/// `cycles`). Best of `reps` runs of 10⁶ adds (≈ 0.4 ms, shorter than a scheduler slice, so
/// some runs are not preempted on a shared machine); `None` off x86-64.
pub fn clock_ghz(reps: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        const BLOCKS: u64 = 100_000;
        let run = || {
            let mut x = 0u64;
            for _ in 0..BLOCKS {
                // SAFETY: register arithmetic only.
                unsafe {
                    std::arch::asm!(
                        "add {x}, 1", "add {x}, 1", "add {x}, 1", "add {x}, 1", "add {x}, 1",
                        "add {x}, 1", "add {x}, 1", "add {x}, 1", "add {x}, 1", "add {x}, 1",
                        x = inout(reg) x,
                        options(nomem, nostack, pure),
                    )
                };
            }
            std::hint::black_box(x);
            (10 * BLOCKS) as f64
        };
        Some(best_rate(reps, run) / 1e9)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = reps;
        None
    }
}

/// One core's measured f32 FMA throughput, GFLOP/s: 12 independent 8-lane (AVX2) FMA chains,
/// enough to cover 2 FMA pipes × 4-cycle latency on Zen 3, so the rate is the pipes' peak (Zen 3:
/// 2 × 8 lanes × 2 FLOPs = 32 FLOP/cycle). Best of `reps` runs of 1.2·10⁶ FMAs (≈ 0.25 ms, as
/// for [`clock_ghz`]); `None` without AVX2+FMA.
pub fn fma_peak_gflops(reps: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        if !(std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma"))
        {
            return None;
        }
        const ITERS: usize = 100_000;
        #[target_feature(enable = "avx2,fma")]
        unsafe fn chains() -> f32 {
            use std::arch::x86_64::*;
            let (m, c) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
            let mut a = [_mm256_set1_ps(1.0); 12];
            for _ in 0..ITERS {
                for x in a.iter_mut() {
                    *x = _mm256_fmadd_ps(*x, m, c);
                }
            }
            let mut out = [0f32; 8];
            let sum = a
                .iter()
                .fold(_mm256_setzero_ps(), |s, &x| _mm256_add_ps(s, x));
            _mm256_storeu_ps(out.as_mut_ptr(), sum);
            out.iter().sum()
        }
        let run = || {
            // SAFETY: avx2 and fma were detected above.
            std::hint::black_box(unsafe { chains() });
            (ITERS * 12 * 8 * 2) as f64
        };
        Some(best_rate(reps, run) / 1e9)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = reps;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_is_positive_and_zero_reps_is_an_error() -> Result<()> {
        assert!(read_bandwidth(1)? > 0.0);
        let e = read_bandwidth(0).unwrap_err();
        assert!(e.to_string().contains("`reps`"), "{e}");
        Ok(())
    }

    #[test]
    fn clock_and_fma_peak_are_plausible() {
        #[cfg(target_arch = "x86_64")]
        {
            let ghz = clock_ghz(1).expect("x86-64 has a clock");
            assert!(ghz > 0.1 && ghz < 10.0, "{ghz} GHz");
            if let Some(g) = fma_peak_gflops(1) {
                // At most 2 FMA pipes × 16 lanes (AVX-512 cores run these 8-lane FMAs on them too).
                assert!(g > 0.0 && g < 2.0 * 16.0 * 2.0 * 10.0, "{g} GFLOP/s");
            }
        }
    }

    #[test]
    fn machine_line_is_filled() {
        assert!(!cpu_model().is_empty());
        #[cfg(target_arch = "x86_64")]
        {
            // x86-64 always has SSE2, and gemm's fma path needs AVX2 as well: whatever the
            // answer, it must agree with what the CPU reports.
            let avx512 = std::arch::is_x86_feature_detected!("avx512f");
            assert_eq!(gemm_path().starts_with("AVX-512"), avx512);
            if std::env::var(flash_ops::simd::ISA_VAR).is_err() {
                assert_eq!(kernel_path().starts_with("avx512"), avx512);
            }
        }
    }
}
