//! The CUDA backend on a GPU: the shared GPU suite (common/gpu_suite.rs: the CPU backend's
//! property checks against the f64 oracle, and the benchmark that `scripts/gpu-check.sh` reports
//! with `--ignored bench`) plus the deterministic backward. Without a device (e.g. the stub
//! libcuda of scripts/setup-cuda-toolchain.sh) every test says SKIPPED on stderr and passes,
//! or fails under `FLASH_OPS_REQUIRE_GPU=1` (scripts/gpu-check.sh).
#![cfg(feature = "cuda")]

#[path = "common/gpu_suite.rs"]
mod gpu_suite;

use candle_core::{DType, Device};
use flash_ops::{flash_attn_with_lse, AttnOptions};
use flash_test_support::{run_with_grads, Rng};

gpu_tests!("cuda", || Device::new_cuda(0));

/// `deterministic(true)`: dQ by bwd_dq (no atomics), so two runs agree bit for bit.
#[test]
fn deterministic_backward_is_reproducible() {
    let Some(dev) = gpu("deterministic_backward_is_reproducible") else {
        return;
    };
    let mut rng = Rng::new(11);
    let opts = AttnOptions::new()
        .causal(true)
        .dropout(0.1, 1)
        .deterministic(true);
    let t = |r: &mut Rng, dims: &[usize]| {
        r.tensor(dims)
            .to_dtype(DType::BF16)
            .unwrap()
            .to_device(&dev)
            .unwrap()
    };
    let (q, k, v, g) = (
        t(&mut rng, &[2, 500, 8, 128]),
        t(&mut rng, &[2, 700, 2, 128]),
        t(&mut rng, &[2, 700, 2, 128]),
        t(&mut rng, &[2, 500, 8, 128]),
    );
    let grads = || -> Vec<Vec<f32>> {
        let run = run_with_grads(
            &q,
            &k,
            &v,
            &g.to_dtype(DType::F64).unwrap(),
            DType::BF16,
            |q, k, v| flash_attn_with_lse(q, k, v, &opts),
        )
        .unwrap();
        [run.dq, run.dk, run.dv]
            .iter()
            .map(|x| {
                x.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect()
    };
    let (a, b) = (grads(), grads());
    assert!(a == b, "deterministic backward differs between two runs");
}

/// FlashAttention-2 paper protocol (bf16, 16k tokens, hidden 2048): ours V2/V1 and candle naive.
#[test]
#[ignore]
fn bench() {
    if let Some(dev) = gpu("bench") {
        gpu_suite::bench(&dev, None)
    }
}
