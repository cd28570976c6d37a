//! The GPU backends' shared suite, included by tests/cuda.rs and tests/metal.rs: the CPU
//! backend's property checks on a device (output, lse and every gradient against the f64 oracle,
//! on random ragged shapes with every option) and the FlashAttention-2 paper's benchmark protocol
//! (`--ignored bench`, parsed by scripts/gpu-check.sh and scripts/metal-check.sh).
//! [`gpu_tests!`] defines the tests of a backend from its device constructor.

use candle_core::{DType, Device, Result, Tensor, Var};
use flash_ops::{
    flash_attn, flash_attn_varlen_with_lse, flash_attn_with_lse, reference, Algorithm, AttnOptions,
    BlockMask, Varlen,
};

use flash_test_support::{
    block_mask_patterns, cu_seqlens, lse_err, option_cases, oracle, rel_err, run_with_grads,
    skip_or_fail, Rng, HEAD_DIMS, REQUIRE_GPU,
};

/// The device, or `None` after a loud skip (a failure under `FLASH_OPS_REQUIRE_GPU=1`).
pub fn device(test: &str, open: impl FnOnce() -> Result<Device>) -> Option<Device> {
    match open() {
        Ok(d) => Some(d),
        Err(e) => {
            skip_or_fail(test, &format!("no device ({e})"), REQUIRE_GPU);
            None
        }
    }
}

/// The shared tests of one backend: `gpu_tests!("cuda", || Device::new_cuda(0));` defines
/// `gpu()` (the device or a loud skip) and the oracle checks, dense and varlen.
#[macro_export]
macro_rules! gpu_tests {
    ($backend:literal, $open:expr) => {
        fn gpu(test: &str) -> Option<candle_core::Device> {
            gpu_suite::device(&format!("{} {test}", $backend), $open)
        }

        #[test]
        fn dense_options_match_oracle() {
            if let Some(dev) = gpu("dense_options_match_oracle") {
                gpu_suite::dense_options_match_oracle(&dev)
            }
        }

        #[test]
        fn varlen_matches_oracle() {
            if let Some(dev) = gpu("varlen_matches_oracle") {
                gpu_suite::varlen_matches_oracle(&dev)
            }
        }

        #[test]
        fn block_mask_matches_oracle() {
            if let Some(dev) = gpu("block_mask_matches_oracle") {
                gpu_suite::block_mask_matches_oracle(&dev)
            }
        }
    };
}

/// A device's own fused attention forward on `(b, h, s, d)` inputs: `(q, k, v, causal, scale)`.
pub type FusedForward = dyn Fn(&Tensor, &Tensor, &Tensor, bool, f32) -> Result<Tensor>;

pub fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 5e-5,
        DType::F16 => 5e-3,
        _ => 3e-2,
    }
}

/// Dense problem on the GPU against the f64 oracle on the CPU.
fn check_dense(
    dev: &Device,
    name: &str,
    dims: (usize, usize, usize, usize, usize, usize),
    opts: &AttnOptions,
) {
    let (_, sq, sk, ..) = dims;
    for dtype in [DType::F16, DType::BF16, DType::F32] {
        let mut rng = Rng::new(0xC0DA ^ (sq * 31 + sk) as u64);
        let round = |t: Tensor| t.to_dtype(dtype).unwrap().to_dtype(DType::F64).unwrap();
        let [q, k, v, d_out] = rng.attn_inputs(dims).map(round);
        let want = oracle(&q, &k, &v, &d_out, opts);
        let on = |t: &Tensor| t.to_device(dev).unwrap();
        let got = run_with_grads(&on(&q), &on(&k), &on(&v), &on(&d_out), dtype, |q, k, v| {
            flash_attn_with_lse(q, k, v, opts)
        })
        .unwrap();
        let e = got.errors(&want);
        let le = lse_err(&got.lse, &want.lse);
        println!(
            "{name:28} {dtype:?}: out {:.1e} lse {le:.1e} dq {:.1e} dk {:.1e} dv {:.1e}",
            e[0], e[1], e[2], e[3]
        );
        assert!(le < 1e-4, "{name} {dtype:?}: lse error {le:.2e}");
        for (what, x) in ["out", "dq", "dk", "dv"].iter().zip(e) {
            assert!(x < tol(dtype), "{name} {dtype:?}: {what} error {x:.2e}");
        }
    }
}

pub fn dense_options_match_oracle(dev: &Device) {
    for d in HEAD_DIMS {
        check_dense(
            dev,
            &format!("plain d{d}"),
            (2, 200, 333, 4, 2, d),
            &AttnOptions::new(),
        );
    }
    for (name, opts) in option_cases(2, 300, 4) {
        check_dense(dev, name, (2, 257, 300, 4, 2, 64), &opts);
    }
    // sq > sk, causal: leading rows see no key.
    check_dense(
        dev,
        "causal sq>sk",
        (1, 300, 120, 2, 1, 128),
        &AttnOptions::new().causal(true),
    );
}

pub fn varlen_matches_oracle(dev: &Device) {
    let lens = [(100usize, 260usize), (257, 31), (1, 1), (128, 128)];
    let (tq, tk) = lens.iter().fold((0, 0), |a, l| (a.0 + l.0, a.1 + l.1));
    let cq = cu_seqlens(&lens.map(|l| l.0));
    let ck = cu_seqlens(&lens.map(|l| l.1));
    let batch = Varlen::new(&cq, &ck, 257, 260);
    let opts = AttnOptions::new().causal(true);
    for dtype in [DType::F16, DType::BF16, DType::F32] {
        let mut rng = Rng::new(7);
        let round = |t: Tensor| t.to_dtype(dtype).unwrap().to_dtype(DType::F64).unwrap();
        let (q, k, v) = (
            round(rng.tensor(&[tq, 8, 64])),
            round(rng.tensor(&[tk, 2, 64])),
            round(rng.tensor(&[tk, 2, 64])),
        );
        let (want, want_lse) =
            reference::naive_attention_varlen(&q, &k, &v, &batch, &opts).unwrap();
        let on = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(dev).unwrap();
        let (got, got_lse) = flash_attn_varlen_with_lse(
            &on(&q),
            &on(&k),
            &on(&v),
            &Varlen::new(
                &cq.to_device(dev).unwrap(),
                &ck.to_device(dev).unwrap(),
                257,
                260,
            ),
            &opts,
        )
        .unwrap();
        let e = rel_err(&got, &want);
        let le = lse_err(&got_lse, &want_lse);
        println!("varlen {dtype:?}: out {e:.1e} lse {le:.1e}");
        assert!(e < tol(dtype) && le < 1e-4);
    }
}

/// Block-sparse attention (issue 12) on the device against the reference's expanded element
/// mask: per-head masks with empty rows, full and partial blocks, both schedules, GQA, causal,
/// dropout, named patterns; and a block size the kernels cannot tile refused by name.
pub fn block_mask_matches_oracle(dev: &Device) {
    let (sq, sk, blk) = (300, 400, (64, 64));
    // Row block 1 of head 0 lists nothing; other blocks empty, full or partial by position.
    let mixed = BlockMask::from_predicate(sq, sk, blk, 1, 4, |_, h, i, j| {
        let (r, c) = (i / 64, j / 64);
        !(h == 0 && r == 1)
            && (r + c + h) % 3 != 0
            && ((r * c + h) % 2 == 0 || (i + 3 * j) % 5 != 0)
    })
    .unwrap();
    for alg in [Algorithm::V2, Algorithm::V1] {
        let opts = AttnOptions::new().algorithm(alg).block_mask(mixed.clone());
        check_dense(
            dev,
            &format!("block mask mixed {alg:?}"),
            (2, sq, sk, 4, 2, 64),
            &opts,
        );
        let opts = opts.causal(true).dropout(0.1, 4);
        check_dense(
            dev,
            &format!("block mask causal dropout {alg:?}"),
            (2, sq, sk, 4, 2, 64),
            &opts,
        );
    }
    for (name, mask) in block_mask_patterns(sq, sk, blk, 4) {
        let opts = AttnOptions::new().block_mask(mask);
        check_dense(
            dev,
            &format!("block mask {name}"),
            (1, sq, sk, 4, 1, 128),
            &opts,
        );
    }
    let mut rng = Rng::new(1);
    let [q, k, v] = [0; 3].map(|_| {
        let t = rng.tensor(&[1, 128, 2, 64]).to_dtype(DType::F32).unwrap();
        t.to_device(dev).unwrap()
    });
    let bad = AttnOptions::new().block_mask(BlockMask::causal(128, 128, (16, 16)).unwrap());
    let e = flash_attn(&q, &k, &v, &bad)
        .expect_err("block size 16 refused")
        .to_string();
    assert!(
        e.contains("`block_mask`") && e.contains("multiples of"),
        "{e}"
    );
}

// ---- benchmark --------------------------------------------------------------------------------

pub fn time_ms(dev: &Device, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up (module load, allocations)
    dev.synchronize()?;
    let t = std::time::Instant::now();
    for _ in 0..iters {
        f()?;
    }
    dev.synchronize()?;
    Ok(t.elapsed().as_secs_f64() * 1e3 / iters as f64)
}

/// FlashAttention-2 paper protocol: bf16, batch x seq = 16k tokens, hidden 2048 (heads = 2048 /
/// d), forward FLOPs 4·b·h·s²·d (halved when causal), backward 2.5x forward. Prints JSON lines
/// `{"impl", "seq", "d", "causal", "fwd_ms", "fwdbwd_ms", "fwd_tflops", "bwd_tflops",
/// "fwdbwd_tflops"}`; gpu-check.sh / metal-check.sh turn them into the report table. `fused`
/// is the device's own forward-only attention, if Candle has one: `(name, f(q, k, v, causal,
/// scale))` on `(b, h, s, d)` inputs.
pub fn bench(dev: &Device, fused: Option<(&str, &FusedForward)>) {
    let seqs: Vec<usize> = std::env::var("FLASH_BENCH_SEQS")
        .map(|s| s.split(',').map(|x| x.parse().unwrap()).collect())
        .unwrap_or_else(|_| vec![512, 1024, 2048, 4096, 8192, 16384]);
    for d in [64usize, 128] {
        for causal in [false, true] {
            for &s in &seqs {
                let (b, h) = (16384 / s, 2048 / d);
                let mk = || {
                    Tensor::randn(0f32, 1.0, (b, s, h, d), dev)
                        .unwrap()
                        .to_dtype(DType::BF16)
                        .unwrap()
                };
                let (q, k, v, d_out) = (mk(), mk(), mk(), mk());
                let flops = 4.0 * (b * h * s * s * d) as f64 / if causal { 2.0 } else { 1.0 };
                let impls: [(&str, Option<Algorithm>); 3] = [
                    ("flash-ops v2", Some(Algorithm::V2)),
                    ("flash-ops v1", Some(Algorithm::V1)),
                    ("candle naive", None),
                ];
                if let Some((name, f)) = fused {
                    let tr = |t: &Tensor| t.transpose(1, 2).unwrap().contiguous().unwrap();
                    let (qt, kt, vt) = (tr(&q), tr(&k), tr(&v));
                    let scale = 1.0 / (d as f32).sqrt();
                    let iters = if s >= 8192 { 3 } else { 10 };
                    match time_ms(dev, iters, || f(&qt, &kt, &vt, causal, scale).map(|_| ())) {
                        Ok(f) => println!(
                            "BENCH {{\"impl\":\"{name}\",\"seq\":{s},\"d\":{d},\"causal\":{causal},\"fwd_ms\":{f:.4},\"fwd_tflops\":{:.2}}}",
                            flops / f / 1e9
                        ),
                        Err(e) => println!(
                            "BENCH {{\"impl\":\"{name}\",\"seq\":{s},\"d\":{d},\"causal\":{causal},\"error\":\"{}\"}}",
                            e.to_string().replace('"', "'").lines().next().unwrap_or("")
                        ),
                    }
                }
                for (name, alg) in impls {
                    let opts = alg
                        .map_or(AttnOptions::new(), |a| AttnOptions::new().algorithm(a))
                        .causal(causal);
                    let fwd = |q: &Tensor, k: &Tensor, v: &Tensor| match alg {
                        Some(_) => flash_ops::flash_attn(q, k, v, &opts),
                        None => reference::naive_attention(q, k, v, &opts),
                    };
                    let iters = if s >= 8192 { 3 } else { 10 };
                    let f = time_ms(dev, iters, || fwd(&q, &k, &v).map(|_| ()));
                    let fb = time_ms(dev, iters, || {
                        let (qv, kv, vv) = (
                            Var::from_tensor(&q)?,
                            Var::from_tensor(&k)?,
                            Var::from_tensor(&v)?,
                        );
                        let out = fwd(qv.as_tensor(), kv.as_tensor(), vv.as_tensor())?;
                        (out * &d_out)?.sum_all()?.backward()?;
                        Ok(())
                    });
                    match (f, fb) {
                        (Ok(f), Ok(fb)) => println!(
                            "BENCH {{\"impl\":\"{name}\",\"seq\":{s},\"d\":{d},\"causal\":{causal},\"fwd_ms\":{f:.4},\"fwdbwd_ms\":{fb:.4},\"fwd_tflops\":{:.2},\"bwd_tflops\":{:.2},\"fwdbwd_tflops\":{:.2}}}",
                            flops / f / 1e9,
                            2.5 * flops / (fb - f).max(1e-6) / 1e9,
                            3.5 * flops / fb / 1e9
                        ),
                        (a, b) => println!(
                            "BENCH {{\"impl\":\"{name}\",\"seq\":{s},\"d\":{d},\"causal\":{causal},\"error\":\"{}\"}}",
                            format!("{:?}", a.err().or(b.err())).replace('"', "'").lines().next().unwrap_or("")
                        ),
                    }
                }
            }
        }
    }
}
