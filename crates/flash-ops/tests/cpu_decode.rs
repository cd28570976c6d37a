//! The CPU flash-decoding path (few query rows against many keys: the key range split into
//! chunks merged by log-sum-exp, GQA heads stacked per k/v head): output, log-sum-exp and the
//! gradients (V2's backward from the log-sum-exp this path saves) against the f64 reference, and
//! the same bits for 1 and 2 threads. Every shape here has `sq ≤ 16` or fewer than 8 q tiles and
//! more keys than one 256-key chunk, so the split and the merge are exercised.

use candle_core::{DType, Device, Tensor};
use flash_ops::{flash_attn_with_lse, AttnOptions};
use flash_test_support::*;

const F32_TOL: f64 = 1e-5;
const HALF_TOL: f64 = 2e-2;

/// `(name, (b, sq, sk, hq, hk, d), options)`.
type Case = (
    &'static str,
    (usize, usize, usize, usize, usize, usize),
    AttnOptions,
);

fn cases() -> Vec<Case> {
    let slopes = |hq: usize| {
        let s: Vec<f32> = (0..hq).map(|h| 0.3 / (h + 1) as f32).collect();
        Tensor::from_vec(s, hq, &Device::Cpu).unwrap()
    };
    vec![
        ("decode MHA", (1, 1, 1000, 4, 4, 64), AttnOptions::new()),
        ("decode GQA 8/2", (2, 1, 777, 8, 2, 128), AttnOptions::new()),
        ("decode MQA 6/1", (1, 1, 530, 6, 1, 32), AttnOptions::new()),
        (
            "sq 16 causal bottom-right, GQA",
            (1, 16, 700, 8, 2, 64),
            AttnOptions::new().causal(true),
        ),
        (
            "sq 5 causal, key_lengths",
            (3, 5, 600, 4, 2, 40),
            AttnOptions::new()
                .causal(true)
                .key_lengths(vec![600, 3, 301]),
        ),
        (
            "sq 3 window, alibi, softcap",
            (1, 3, 900, 4, 1, 64),
            AttnOptions::new()
                .window(Some(400), Some(0))
                .alibi_slopes(slopes(4))
                .softcap(6.0),
        ),
        (
            "sq 2 causal, window, alibi, GQA 4/1",
            (1, 2, 650, 4, 1, 64),
            AttnOptions::new()
                .causal(true)
                .window(Some(300), None)
                .alibi_slopes(slopes(4)),
        ),
        (
            "sq 1, every key masked by key_lengths",
            (2, 1, 300, 2, 1, 16),
            AttnOptions::new().key_lengths(vec![0, 300]),
        ),
        (
            "few tasks: sq 200 causal, 2 heads",
            (1, 200, 640, 2, 1, 64),
            AttnOptions::new().causal(true),
        ),
    ]
}

#[test]
fn decode_matches_f64_reference() {
    let mut rng = Rng::new(0xDEC0);
    for (name, dims, opts) in cases() {
        let [q, k, v, d_out] = rng.attn_inputs(dims);
        let want = oracle(&q, &k, &v, &d_out, &opts);
        for (dtype, tol) in [(DType::F32, F32_TOL), (DType::BF16, HALF_TOL)] {
            let got = run_with_grads(&q, &k, &v, &d_out, dtype, |q, k, v| {
                flash_attn_with_lse(q, k, v, &opts)
            })
            .unwrap();
            let e = got.errors(&want);
            let el = lse_err(&got.lse, &want.lse);
            for (what, x) in ["out", "dq", "dk", "dv", "lse"]
                .iter()
                .zip(e.iter().chain([el].iter()))
            {
                assert!(
                    *x <= tol && x.is_finite(),
                    "{name} {dtype:?}: {what} relative error {x:e} > {tol:e}"
                );
            }
        }
    }
}

#[test]
fn decode_bits_do_not_depend_on_the_thread_count() {
    let mut rng = Rng::new(0xB175);
    for (name, dims, opts) in cases() {
        let [q, k, v, _] = rng.attn_inputs(dims);
        let (q, k, v) = (
            q.to_dtype(DType::F32).unwrap(),
            k.to_dtype(DType::F32).unwrap(),
            v.to_dtype(DType::F32).unwrap(),
        );
        let run = || {
            let (o, l) = flash_attn_with_lse(&q, &k, &v, &opts).unwrap();
            (f32_bits(&o), f32_bits(&l))
        };
        let one = in_pool(1, run);
        let (two, again) = in_pool(2, || (run(), run()));
        assert!(one == two, "{name}: bits differ between 1 and 2 threads");
        assert!(two == again, "{name}: bits differ run to run");
    }
}
