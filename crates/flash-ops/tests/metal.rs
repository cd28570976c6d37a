//! The Metal backend on an Apple GPU: the same property checks as the CUDA backend (output, lse
//! and every gradient against the f64 oracle, on random ragged shapes with every option), plus
//! the benchmark that `scripts/metal-check.sh` prints (`--ignored bench`): the CUDA protocol,
//! with candle's Metal `sdpa` (forward only: it has no backward) as the fused baseline.
//! macOS with `--features metal` only; without a Metal device every test says SKIPPED on stderr and
//! passes, or fails under `FLASH_OPS_REQUIRE_GPU=1`.
#![cfg(all(feature = "metal", target_os = "macos"))]

#[path = "common/gpu_suite.rs"]
mod gpu_suite;

use candle_core::Device;

gpu_tests!("metal", || Device::new_metal(0));

/// FlashAttention-2 paper protocol (bf16, 16k tokens, hidden 2048): ours V2/V1, candle naive,
/// and candle's fused Metal `sdpa` (forward only: it has no backward).
#[test]
#[ignore]
fn bench() {
    if let Some(dev) = gpu("bench") {
        let sdpa =
            |q: &candle_core::Tensor,
             k: &candle_core::Tensor,
             v: &candle_core::Tensor,
             causal: bool,
             scale: f32| { candle_nn::ops::sdpa(q, k, v, None, causal, scale, 1.0) };
        gpu_suite::bench(&dev, Some(("candle sdpa", &sdpa)))
    }
}
