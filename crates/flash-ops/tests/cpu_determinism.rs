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
    let inputs = rng.attn_inputs((1, 300, 389, 4, 1, 64));
    let slopes = Tensor::new(&[0.3f32, 0.1, 0.05, 0.02], inputs[0].device()).unwrap();
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
            let what = format!("{alg:?} {opts:?}");
            assert_same_bits_across_threads(&inputs, dtype, &what, |q, k, v| {
                flash_attn_with_lse(q, k, v, &opts)
            });
        }
    }
}
