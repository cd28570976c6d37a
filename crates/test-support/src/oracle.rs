//! One run of an attention implementation with its gradients, and the f64 oracle
//! (`flash_ops::reference`) run the same way.

use candle_core::{DType, Result, Tensor, Var};
use flash_ops::{reference, AttnOptions, Varlen};

/// Output, log-sum-exp and the gradients of one implementation for an upstream gradient.
pub struct Run {
    pub out: Tensor,
    pub lse: Tensor,
    pub dq: Tensor,
    pub dk: Tensor,
    pub dv: Tensor,
}

impl Run {
    /// Relative errors of (out, dq, dk, dv) against `want`.
    pub fn errors(&self, want: &Run) -> [f64; 4] {
        use crate::rel_err;
        [
            rel_err(&self.out, &want.out),
            rel_err(&self.dq, &want.dq),
            rel_err(&self.dk, &want.dk),
            rel_err(&self.dv, &want.dv),
        ]
    }
}

/// Runs `f` on `(q, k, v)` converted to `dtype`, then backward of `sum(out · d_out)` (`d_out`
/// f64, on the device of `q`).
pub fn run_with_grads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    d_out: &Tensor,
    dtype: DType,
    f: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<(Tensor, Tensor)>,
) -> Result<Run> {
    let qv = Var::from_tensor(&q.to_dtype(dtype)?)?;
    let kv = Var::from_tensor(&k.to_dtype(dtype)?)?;
    let vv = Var::from_tensor(&v.to_dtype(dtype)?)?;
    let (out, lse) = f(qv.as_tensor(), kv.as_tensor(), vv.as_tensor())?;
    let grads = (out.to_dtype(DType::F64)? * d_out.to_dtype(DType::F64)?)?
        .sum_all()?
        .backward()?;
    let get = |v: &Var| {
        grads
            .get(v.as_tensor())
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg("an input got no gradient".into()))
    };
    Ok(Run {
        dq: get(&qv)?,
        dk: get(&kv)?,
        dv: get(&vv)?,
        out,
        lse,
    })
}

/// The f64 oracle on dense inputs.
pub fn oracle(q: &Tensor, k: &Tensor, v: &Tensor, d_out: &Tensor, opts: &AttnOptions) -> Run {
    run_with_grads(q, k, v, d_out, DType::F64, |q, k, v| {
        reference::naive_attention_with_lse(q, k, v, opts)
    })
    .expect("the oracle accepts the inputs")
}

/// The f64 oracle on a varlen batch.
pub fn oracle_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    d_out: &Tensor,
    batch: &Varlen,
    opts: &AttnOptions,
) -> Run {
    run_with_grads(q, k, v, d_out, DType::F64, |q, k, v| {
        reference::naive_attention_varlen(q, k, v, batch, opts)
    })
    .expect("the oracle accepts the inputs")
}
