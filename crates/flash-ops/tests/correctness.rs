//! Seeded random sweep over shapes and every option: output, log-sum-exp and dq, dk, dv of both
//! schedules against the f64 reference, by relative error.

use candle_core::{DType, Device, Tensor};
use flash_ops::{flash_attn_varlen_with_lse, flash_attn_with_lse, Algorithm, AttnOptions, Varlen};
use flash_test_support::*;

const F32_TOL: f64 = 1e-5;
const HALF_TOL: f64 = 2e-2;

#[derive(Debug, Clone)]
struct Case {
    b: usize,
    sq: usize,
    sk: usize,
    hk: usize,
    group: usize,
    d: usize,
    opts: AttnOptions,
}

fn random_case(rng: &mut Rng, max_len: usize) -> Case {
    const DIMS: [usize; 8] = [8, 16, 32, 40, 64, 80, 128, 256];
    let d = DIMS[rng.below(DIMS.len())];
    // Keep the f64 oracle cheap at large head dims.
    let max_len = if d >= 128 { max_len / 2 } else { max_len };
    let sq = 1 + rng.below(max_len);
    let sk = if rng.below(3) == 0 {
        sq
    } else {
        1 + rng.below(max_len)
    };
    let b = 1 + rng.below(3);
    let hk = 1 + rng.below(2);
    let group = 1 + rng.below(3);
    let opts = random_options(rng, b, sk, hk * group);
    Case {
        b,
        sq,
        sk,
        hk,
        group,
        d,
        opts,
    }
}

fn check_case(rng: &mut Rng, case: &Case, dtype: DType, tol: f64, worst: &mut [f64; 5]) {
    let hq = case.hk * case.group;
    let [q, k, v, d_out] = rng.attn_inputs((case.b, case.sq, case.sk, hq, case.hk, case.d));
    let want = oracle(&q, &k, &v, &d_out, &case.opts);
    for alg in [Algorithm::V1, Algorithm::V2] {
        let opts = case.opts.clone().algorithm(alg);
        let got = run_with_grads(&q, &k, &v, &d_out, dtype, |q, k, v| {
            flash_attn_with_lse(q, k, v, &opts)
        })
        .unwrap();
        let e = got.errors(&want);
        let el = lse_err(&got.lse, &want.lse);
        for (w, x) in worst.iter_mut().zip(e.iter().chain([el].iter())) {
            *w = w.max(*x);
        }
        for (name, x) in ["out", "dq", "dk", "dv", "lse"]
            .iter()
            .zip(e.iter().chain([el].iter()))
        {
            assert!(
                *x <= tol && x.is_finite(),
                "{alg:?} {dtype:?} {name} relative error {x:e} > {tol:e} for {case:?}"
            );
        }
    }
}

fn sweep(seed: u64, cases: usize, max_len: usize, dtype: DType, tol: f64) {
    let mut rng = Rng::new(seed);
    let mut worst = [0f64; 5];
    for _ in 0..cases {
        let case = random_case(&mut rng, max_len);
        check_case(&mut rng, &case, dtype, tol, &mut worst);
    }
    println!(
        "{dtype:?}: {cases} cases × 2 algorithms, worst relative error out {:.2e} dq {:.2e} dk {:.2e} dv {:.2e} lse {:.2e}",
        worst[0], worst[1], worst[2], worst[3], worst[4]
    );
}

#[test]
fn f32_matches_f64_reference_on_random_cases() {
    sweep(0xF1A5, 60, 160, DType::F32, F32_TOL);
}

#[test]
fn f16_matches_f64_reference_on_random_cases() {
    sweep(0x16, 20, 130, DType::F16, HALF_TOL);
}

#[test]
fn bf16_matches_f64_reference_on_random_cases() {
    sweep(0xBF16, 20, 130, DType::BF16, HALF_TOL);
}

/// Several full tiles plus ragged edges, the shapes the kernels' block loops care about.
#[test]
fn multi_tile_shapes_match_reference() {
    let mut rng = Rng::new(7);
    let mut worst = [0f64; 5];
    for (sq, sk, causal) in [
        (64, 64, false),
        (129, 257, true),
        (300, 130, true),
        (200, 200, false),
    ] {
        let case = Case {
            b: 1,
            sq,
            sk,
            hk: 2,
            group: 2,
            d: 64,
            opts: AttnOptions::new().causal(causal),
        };
        check_case(&mut rng, &case, DType::F32, F32_TOL, &mut worst);
    }
    println!("multi-tile worst {worst:?}");
}

#[test]
fn varlen_matches_reference() {
    let mut rng = Rng::new(99);
    let mut worst = [0f64; 5];
    for trial in 0..12 {
        let nseq = 1 + rng.below(4);
        let lens_q: Vec<usize> = (0..nseq).map(|_| rng.below(150)).collect();
        let lens_k: Vec<usize> = if trial % 2 == 0 {
            lens_q.clone()
        } else {
            (0..nseq).map(|_| rng.below(150)).collect()
        };
        let (cq, ck) = (cu_seqlens(&lens_q), cu_seqlens(&lens_k));
        let (tq, tk) = (lens_q.iter().sum(), lens_k.iter().sum());
        let (hk, group, d) = (
            1 + rng.below(2),
            1 + rng.below(2),
            [16, 32, 64][rng.below(3)],
        );
        let hq = hk * group;
        let mut opts = AttnOptions::new().causal(trial % 3 == 0);
        if trial % 4 == 1 {
            opts = opts.window(Some(17), Some(5));
        }
        if trial % 5 == 2 {
            let s: Vec<f32> = (0..nseq * hq).map(|i| 0.1 + 0.05 * i as f32).collect();
            opts = opts.alibi_slopes(Tensor::from_vec(s, (nseq, hq), &Device::Cpu).unwrap());
        }
        if trial % 4 == 3 {
            opts = opts.dropout(0.25, 1234 + trial as u64);
        }
        let q = rng.tensor(&[tq, hq, d]);
        let k = rng.tensor(&[tk, hk, d]);
        let v = rng.tensor(&[tk, hk, d]);
        let d_out = rng.tensor(&[tq, hq, d]);
        let (mq, mk) = (
            lens_q.iter().copied().max().unwrap(),
            lens_k.iter().copied().max().unwrap(),
        );
        let batch = Varlen::new(&cq, &ck, mq, mk);
        let want = oracle_varlen(&q, &k, &v, &d_out, &batch, &opts);
        for alg in [Algorithm::V1, Algorithm::V2] {
            let o = opts.clone().algorithm(alg);
            let got = run_with_grads(&q, &k, &v, &d_out, DType::F32, |q, k, v| {
                flash_attn_varlen_with_lse(q, k, v, &batch, &o)
            })
            .unwrap();
            let e = got.errors(&want);
            let el = lse_err(&got.lse, &want.lse);
            for (w, x) in worst.iter_mut().zip(e.iter().chain([el].iter())) {
                *w = w.max(*x);
            }
            assert!(
                e.iter().chain([el].iter()).all(|x| *x <= F32_TOL),
                "{alg:?} varlen errors {e:?} lse {el} lens {lens_q:?}/{lens_k:?}"
            );
        }
    }
    println!("varlen worst {worst:?}");
}

/// Rows that see no key (key_lengths 0; causal with sq > sk): zeros, zero gradients, no NaN.
#[test]
fn fully_masked_rows_are_zero_and_finite() {
    let mut rng = Rng::new(5);
    let [q, k, v, d_out] = rng.attn_inputs((2, 40, 10, 2, 2, 16));
    let opts = AttnOptions::new().causal(true).key_lengths(vec![0, 10]);
    for alg in [Algorithm::V1, Algorithm::V2] {
        let o = opts.clone().algorithm(alg);
        let got = run_with_grads(&q, &k, &v, &d_out, DType::F32, |q, k, v| {
            flash_attn_with_lse(q, k, v, &o)
        })
        .unwrap();
        let out: Vec<f32> = got.out.flatten_all().unwrap().to_vec1().unwrap();
        assert!(out.iter().all(|x| x.is_finite()));
        // Batch 0 sees no key at all; in batch 1, rows 0..30 precede the first key.
        let b0 = got.out.get(0).unwrap().abs().unwrap().sum_all().unwrap();
        assert_eq!(b0.to_scalar::<f32>().unwrap(), 0.0);
        let early = got.out.get(1).unwrap().narrow(0, 0, 30).unwrap();
        assert_eq!(
            early
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        let late = got.out.get(1).unwrap().narrow(0, 30, 10).unwrap();
        assert!(
            late.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
        for g in [&got.dq, &got.dk, &got.dv] {
            let gv: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
            assert!(gv.iter().all(|x| x.is_finite()));
        }
        let dk0 = got.dk.get(0).unwrap().abs().unwrap().sum_all().unwrap();
        assert_eq!(dk0.to_scalar::<f32>().unwrap(), 0.0);
        let lse: Vec<f32> = got.lse.flatten_all().unwrap().to_vec1().unwrap();
        assert!(lse[..80].iter().all(|x| *x == f32::NEG_INFINITY));
        let want = oracle(&q, &k, &v, &d_out, &opts);
        let e = got.errors(&want);
        assert!(e.iter().all(|x| *x <= F32_TOL), "{alg:?} {e:?}");
    }
}

/// Non-contiguous inputs (a fused qkv projection narrowed per tensor) need no copy and give
/// the same result as contiguous ones.
#[test]
fn strided_inputs_match_contiguous() {
    let mut rng = Rng::new(11);
    let qkv = rng.tensor(&[2, 70, 3, 4, 32]).to_dtype(DType::F32).unwrap();
    let q = qkv.narrow(2, 0, 1).unwrap().squeeze(2).unwrap();
    let k = qkv.narrow(2, 1, 1).unwrap().squeeze(2).unwrap();
    let v = qkv.narrow(2, 2, 1).unwrap().squeeze(2).unwrap();
    assert!(!q.is_contiguous());
    for alg in [Algorithm::V1, Algorithm::V2] {
        let opts = AttnOptions::new().causal(true).algorithm(alg);
        let a = flash_ops::flash_attn(&q, &k, &v, &opts).unwrap();
        let b = flash_ops::flash_attn(
            &q.contiguous().unwrap(),
            &k.contiguous().unwrap(),
            &v.contiguous().unwrap(),
            &opts,
        )
        .unwrap();
        assert_eq!(rel_err(&a, &b), 0.0);
    }
}
