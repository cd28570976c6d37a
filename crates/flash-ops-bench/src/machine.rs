//! The machine a measurement ran on, for every report's header.

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
