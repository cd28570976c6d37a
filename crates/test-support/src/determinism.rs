//! The CPU suites' determinism check: the same bits whatever the thread count.

use candle_core::{DType, Result, Tensor};

use crate::{f32_bits, run_with_grads};

fn in_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a rayon pool")
        .install(f)
}

/// Runs `f` with its gradients (as [`run_with_grads`], on `[q, k, v, d_out]` in `dtype`) in a
/// 1-thread rayon pool, then twice in a 2-thread one, and asserts that out, lse, dq, dk and dv
/// have the same bits every time; `what` names the case.
pub fn assert_same_bits_across_threads(
    [q, k, v, d_out]: &[Tensor; 4],
    dtype: DType,
    what: &str,
    f: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<(Tensor, Tensor)> + Sync,
) {
    let run = || {
        let r = run_with_grads(q, k, v, d_out, dtype, &f).unwrap();
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
            "{what} {dtype:?}: {name} differs between 1 and 2 threads"
        );
        assert!(b == c, "{what} {dtype:?}: {name} differs run to run");
    }
}
