//! Backward is bit-for-bit reproducible; dropout keeps 1 − p of the weights and its gradient
//! matches the reference computed with the same (regenerated) mask.

use candle_core::{DType, Device, Tensor};
use flash_ops::dropout::DropoutMask;
use flash_ops::{flash_attn, Algorithm, AttnOptions};
use flash_test_support::*;

#[test]
fn backward_is_deterministic() {
    let mut rng = Rng::new(21);
    // Few (batch, kv-head) units so V2 splits k/v tiles into several dQ partials.
    let [q, k, v, d_out] = rng.attn_inputs((1, 333, 517, 4, 1, 64));
    for alg in [Algorithm::V1, Algorithm::V2] {
        let opts = AttnOptions::new()
            .causal(true)
            .dropout(0.2, 3)
            .algorithm(alg);
        let run = || {
            run_with_grads(&q, &k, &v, &d_out, DType::F32, |q, k, v| {
                flash_ops::flash_attn_with_lse(q, k, v, &opts)
            })
            .unwrap()
        };
        let (a, b) = (run(), run());
        for (x, y) in [
            (&a.out, &b.out),
            (&a.dq, &b.dq),
            (&a.dk, &b.dk),
            (&a.dv, &b.dv),
        ] {
            assert_eq!(f32_bits(x), f32_bits(y), "{alg:?}: two runs differ");
        }
    }
}

/// Random `q (b, sq, h, sk)` and `k (b, sk, h, sk)`, and `v` the identity for every batch entry
/// and head: the output row of query `i` is then row `i` of the (dropped-out) probability matrix.
fn identity_v_problem(seed: u64, (b, sq, sk, h): (usize, usize, usize, usize)) -> [Tensor; 3] {
    let mut rng = Rng::new(seed);
    let q = rng.tensor(&[b, sq, h, sk]).to_dtype(DType::F32).unwrap();
    let k = rng.tensor(&[b, sk, h, sk]).to_dtype(DType::F32).unwrap();
    let v = Tensor::eye(sk, DType::F32, &Device::Cpu)
        .and_then(|eye| eye.unsqueeze(1)?.unsqueeze(0)?.expand((b, sk, h, sk)))
        .unwrap();
    [q, k, v]
}

/// With `v` the identity (sk = d), row i of the output is row i of the dropped-out probability
/// matrix: count its zeros to measure the keep rate through the op itself.
#[test]
fn dropout_keep_rate_matches_one_minus_p() {
    let (sq, sk, h) = (512, 128, 4);
    let [q, k, v] = identity_v_problem(8, (1, sq, sk, h));
    for p in [0.1f32, 0.5] {
        for alg in [Algorithm::V1, Algorithm::V2] {
            let opts = AttnOptions::new()
                .softmax_scale(0.05)
                .dropout(p, 77)
                .algorithm(alg);
            let out: Vec<f32> = flash_attn(&q, &k, &v, &opts)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let kept = out.iter().filter(|x| **x != 0.0).count() as f64;
            let n = out.len() as f64;
            let rate = kept / n;
            let sigma = ((1.0 - p as f64) * p as f64 / n).sqrt();
            assert!(
                (rate - (1.0 - p as f64)).abs() < 5.0 * sigma,
                "{alg:?} p={p}: keep rate {rate} vs {} (σ {sigma:e})",
                1.0 - p
            );
            // Kept weights are rescaled by 1/(1-p): the row sums' mean is ≈ 1.
            let mean_row_sum = out.iter().map(|&x| x as f64).sum::<f64>() / (sq * h) as f64;
            assert!(
                (mean_row_sum - 1.0).abs() < 0.05,
                "mean row sum {mean_row_sum}"
            );
        }
    }
}

/// The op's dropped entries are exactly where the shared mask says so.
#[test]
fn dropout_pattern_is_the_shared_mask() {
    let (sq, sk, h) = (70, 64, 2);
    let [q, k, v] = identity_v_problem(9, (2, sq, sk, h));
    let opts = AttnOptions::new().softmax_scale(0.05).dropout(0.3, 5);
    let out = flash_attn(&q, &k, &v, &opts).unwrap();
    let out: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
    for b in 0..2 {
        for hh in 0..h {
            let m = DropoutMask::new(0.3, 5, b, h, hh);
            for i in 0..sq {
                for j in 0..sk {
                    let x = out[((b * sq + i) * h + hh) * sk + j];
                    assert_eq!(x != 0.0, m.keeps(i, j), "b{b} h{hh} i{i} j{j}");
                }
            }
        }
    }
}

#[test]
fn dropout_gradients_match_reference_with_same_mask() {
    let mut rng = Rng::new(10);
    let [q, k, v, d_out] = rng.attn_inputs((2, 90, 150, 4, 2, 32));
    for causal in [false, true] {
        let opts = AttnOptions::new().causal(causal).dropout(0.4, 0xDEAD);
        let want = oracle(&q, &k, &v, &d_out, &opts);
        for alg in [Algorithm::V1, Algorithm::V2] {
            let o = opts.clone().algorithm(alg);
            let got = run_with_grads(&q, &k, &v, &d_out, DType::F32, |q, k, v| {
                flash_ops::flash_attn_with_lse(q, k, v, &o)
            })
            .unwrap();
            let e = got.errors(&want);
            assert!(
                e.iter().all(|x| *x < 1e-5),
                "{alg:?} causal={causal}: {e:?}"
            );
        }
        // A different seed gives a different result: the mask really depends on it.
        let other = oracle(&q, &k, &v, &d_out, &opts.clone().dropout(0.4, 1));
        assert!(rel_err(&other.out, &want.out) > 0.1);
    }
}
