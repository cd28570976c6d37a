//! The CPU backward gives the same bits whatever the thread count: one shape run in a 1-thread
//! and a 2-thread rayon pool (and twice in the latter), out, lse, dq, dk, dv compared bit for
//! bit, on every schedule, with options that take the kernels' masked and modified paths.

use candle_core::{DType, Tensor};
use flash_ops::{flash_attn_with_lse, Algorithm, AttnOptions};
use flash_test_support::*;

#[test]
fn backward_bits_do_not_depend_on_the_thread_count() {
    let mut rng = Rng::new(0xD7);
    // One (batch, kv head) unit: V2 splits its k/v tiles into several dQ partials.
    let [q, k, v, d_out] = rng.attn_inputs((1, 300, 389, 4, 1, 64));
    let slopes = Tensor::new(&[0.3f32, 0.1, 0.05, 0.02], q.device()).unwrap();
    let cases = [
        AttnOptions::new().causal(true),
        AttnOptions::new()
            .softcap(8.0)
            .alibi_slopes(slopes)
            .window(Some(150), Some(40)),
        AttnOptions::new().dropout(0.2, 11),
    ];
    for (dtype, opts) in [DType::F32, DType::BF16]
        .into_iter()
        .flat_map(|t| cases.iter().map(move |o| (t, o)))
    {
        for alg in [Algorithm::V1, Algorithm::V2] {
            let opts = opts.clone().algorithm(alg);
            let run = || {
                let r = run_with_grads(&q, &k, &v, &d_out, dtype, |q, k, v| {
                    flash_attn_with_lse(q, k, v, &opts)
                })
                .unwrap();
                [r.out, r.lse, r.dq, r.dk, r.dv].map(|t| f32_bits(&t))
            };
            let one = in_pool(1, run);
            let (two, again) = in_pool(2, || (run(), run()));
            for (name, ((a, b), c)) in ["out", "lse", "dq", "dk", "dv"]
                .iter()
                .zip(one.iter().zip(&two).zip(&again))
            {
                assert!(
                    a == b,
                    "{alg:?} {dtype:?} {opts:?}: {name} differs between 1 and 2 threads"
                );
                assert!(
                    b == c,
                    "{alg:?} {dtype:?} {opts:?}: {name} differs run to run"
                );
            }
        }
    }
}
