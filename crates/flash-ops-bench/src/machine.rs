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
