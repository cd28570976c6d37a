//! The CUDA kernels, run by the SIMT emulator against the f64 reference: the shared cases of
//! `shared/mod.rs`, plus what only the CUDA backend has (deterministic dQ, the mma probe).

use candle_core::{DType, Device, Tensor};
use flash_emu::cuda as emu;
use flash_ops::{AttnOptions, BlockMask};

mod shared;
use emu::{host_input, AttnParams, Dt, Inputs};
use flash_test_support::{to_f64_vec, Rng, Tol};
use shared::{case, check, random_mask, DTYPES};

// About 4x the largest error measured (f16 3.7e-4, bf16 3.0e-3, f32 3.3e-7): the output
// rounding of the dtype, so a layout or masking bug cannot hide under the bound.
pub const TOL: Tol = Tol {
    f32: 2e-6,
    f16: 1.5e-3,
    bf16: 1.2e-2,
};

#[test]
fn deterministic_dq() {
    let slopes = Tensor::new(&[0.3f32, 0.1], &Device::Cpu).unwrap();
    for dt in DTYPES {
        let mut c = case(dt, (2, 90, 77), (2, 1, 64));
        c.opts = AttnOptions::new()
            .deterministic(true)
            .causal(true)
            .dropout(0.1, 3)
            .softcap(4.0)
            .alibi_slopes(slopes.clone());
        check("deterministic dq, all options", &c);
    }
    for (dt, d) in [(DType::F32, 256), (DType::BF16, 96)] {
        let mut c = case(dt, (1, 50, 40), (2, 2, d));
        c.opts = AttnOptions::new()
            .deterministic(true)
            .window(Some(10), Some(3));
        check(&format!("deterministic dq d{d}"), &c);
    }
    // bwd_dq walks the listed key blocks like the forward.
    let mut c = case(DType::F16, (1, 150, 200), (2, 1, 64));
    c.opts = AttnOptions::new()
        .deterministic(true)
        .dropout(0.1, 2)
        .block_mask(random_mask((150, 200), (1, 2), (0.3, 0.3), 8));
    check("deterministic dq, block mask", &c);
}

/// A block size the kernels cannot tile is refused before any launch, naming the multiple
/// (f16 at d64 tiles keys by 64, f32 by 32; queries by 64 in both).
#[test]
fn block_mask_bad_block_size() {
    let mut rng = Rng::new(2);
    for (dtype, want) in [(DType::F16, "(64, 64)"), (DType::F32, "(64, 32)")] {
        let [q, k, v] = [0; 3].map(|_| rng.tensor(&[1, 100, 1, 64]).to_dtype(dtype).unwrap());
        let mask = BlockMask::causal(100, 100, (32, 32)).unwrap();
        let p = AttnParams::dense(&q, &k, &v, &AttnOptions::new().block_mask(mask)).unwrap();
        let e = Inputs::new(&p, &q, &k, &v)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("`block_mask`") && e.contains(want), "{e}");
    }
}

/// The emulated ldmatrix / mma (and the f32 shuffle path) against plain matrix products, through
/// the same probe kernel that scripts/gpu-check.sh runs on the hardware.
#[test]
fn mma_probe_matches_matmul() {
    use emu::{launch, plan, Buf};
    for dt in [Dt::F16, Dt::Bf16, Dt::F32] {
        let mut rng = Rng::new(3);
        let dtype = match dt {
            Dt::F16 => DType::F16,
            Dt::Bf16 => DType::BF16,
            Dt::F32 => DType::F32,
        };
        let a = rng.tensor(&[16, 16]).to_dtype(dtype).unwrap();
        let b = rng.tensor(&[16, 16]).to_dtype(dtype).unwrap();
        let (mut ab, _) = host_input(&a).unwrap();
        let (mut bb, _) = host_input(&b).unwrap();
        let mut out = Buf::zeros(4 * 4 * 256);
        let fp = plan::FlashParams {
            q: ab.addr(),
            k: bb.addr(),
            dq_accum: out.addr(),
            ..Default::default()
        };
        launch(&plan::probe_launch(dt), &fp).unwrap();
        let got = out.to_f32(Dt::F32);
        let f32s = |t: &Tensor| -> Vec<f32> { to_f64_vec(t).iter().map(|&x| x as f32).collect() };
        plan::probe_check(dt, &f32s(&a), &f32s(&b), &got).unwrap();
    }
}
