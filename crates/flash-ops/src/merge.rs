//! The ⊕ operator of blockwise attention: attention over a key set split into parts, recovered
//! exactly from each part's output and log-sum-exp (Hydragen §3.1; FlashInfer's `merge_states`).
//!
//! With `m = maxᵢ lseᵢ` and `wᵢ = exp(lseᵢ − m)`: `out = Σ wᵢ·oᵢ / Σ wᵢ` and
//! `lse = m + ln Σ wᵢ`. `m` only keeps the exponentials in range, so it is detached: the result
//! does not depend on it. Built from Candle ops that have a backward on every device, so the
//! merge is differentiable in the outputs and the log-sum-exps (and, through
//! [`crate::flash_attn_with_lse`], in the parts' q, k and v).

use candle_core::{bail, DType, Result, Tensor};

/// Merges partial attention results over disjoint key sets into the result over their union.
///
/// `outs[i]` is `(b, sq, hq, d)` (or varlen `(total_q, hq, d)`), all of one shape and dtype;
/// `lses[i]` the matching natural-log log-sum-exp, f32, `(b, hq, sq)` (varlen `(hq, total_q)`), as
/// [`crate::flash_attn_with_lse`] returns them. Returns `(out, lse)` in the same layouts, `out` in
/// the parts' dtype; the weighted sum is accumulated in f32.
///
/// A row whose part saw no key (`lse = -inf`) contributes nothing to it; a row that no part saw
/// gets zeros and `lse = -inf`. Neither gives NaN, in values or gradients.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use flash_ops::{flash_attn_with_lse, merge_attention_states, AttnOptions};
///
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let q = Tensor::randn(0f32, 1.0, (1, 4, 2, 16), &dev)?;
/// let k = Tensor::randn(0f32, 1.0, (1, 10, 2, 16), &dev)?;
/// let v = Tensor::randn(0f32, 1.0, (1, 10, 2, 16), &dev)?;
/// let opts = AttnOptions::new();
/// // Keys 0..6 and 6..10 separately, then merged: attention over all 10 keys.
/// let a = flash_attn_with_lse(&q, &k.narrow(1, 0, 6)?, &v.narrow(1, 0, 6)?, &opts)?;
/// let b = flash_attn_with_lse(&q, &k.narrow(1, 6, 4)?, &v.narrow(1, 6, 4)?, &opts)?;
/// let (out, lse) = merge_attention_states(&[a.0, b.0], &[a.1, b.1])?;
/// let (whole, whole_lse) = flash_attn_with_lse(&q, &k, &v, &opts)?;
/// assert!((out - whole)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);
/// assert!((lse - whole_lse)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);
/// # Ok(())
/// # }
/// ```
pub fn merge_attention_states(outs: &[Tensor], lses: &[Tensor]) -> Result<(Tensor, Tensor)> {
    check(outs, lses)?;
    let rank = outs[0].rank();
    // (b, hq, sq) → (b, sq, hq, 1), varlen (hq, t) → (t, hq, 1): the log-sum-exp beside its row.
    let beside_rows = |w: &Tensor| w.transpose(rank - 3, rank - 2)?.unsqueeze(rank - 1);

    let mut m = lses[0].detach();
    for l in &lses[1..] {
        m = m.maximum(&l.detach())?;
    }
    // Rows no part saw have m = -inf: shift them by 0 instead (every weight is then exp(-inf) = 0).
    let m = m.eq(f32::NEG_INFINITY)?.where_cond(&m.zeros_like()?, &m)?;

    let mut den: Option<Tensor> = None;
    let mut num: Option<Tensor> = None;
    for (o, l) in outs.iter().zip(lses) {
        let w = l.broadcast_sub(&m)?.exp()?;
        let part = o.to_dtype(DType::F32)?.broadcast_mul(&beside_rows(&w)?)?;
        num = Some(match num {
            None => part,
            Some(n) => (n + part)?,
        });
        den = Some(match den {
            None => w,
            Some(d) => (d + w)?,
        });
    }
    let (num, den) = (num.expect("a part"), den.expect("a part"));
    // Σw = 0 exactly where no part saw a key: divide by 1 there (numerator 0, so out = 0) and set
    // lse = -inf by a constant, so neither 0/0 nor the gradient of ln 0 appears.
    let empty = den.eq(0f32)?;
    let den = empty.where_cond(&den.ones_like()?, &den)?;
    let out = num.broadcast_div(&beside_rows(&den)?)?;
    let neg_inf = (den.zeros_like()? - f64::INFINITY)?;
    let lse = empty.where_cond(&neg_inf, &(m + den.log()?)?)?;
    Ok((out.to_dtype(outs[0].dtype())?, lse))
}

fn check(outs: &[Tensor], lses: &[Tensor]) -> Result<()> {
    if outs.is_empty() || outs.len() != lses.len() {
        bail!(
            "merge_attention_states: `outs` and `lses` must hold the same non-zero number of parts, got {} and {}",
            outs.len(),
            lses.len()
        )
    }
    let o0 = &outs[0];
    let expected: Vec<usize> = match o0.dims() {
        [b, sq, hq, _] => vec![*b, *hq, *sq],
        [t, hq, _] => vec![*hq, *t],
        dims => bail!(
            "merge_attention_states: `outs` must be (b, sq, hq, d) or (total_q, hq, d), got {dims:?}"
        ),
    };
    for (i, (o, l)) in outs.iter().zip(lses).enumerate() {
        if o.dims() != o0.dims() || o.dtype() != o0.dtype() {
            bail!(
                "merge_attention_states: `outs[{i}]` is {:?} {:?}, must match `outs[0]` {:?} {:?}",
                o.dtype(),
                o.dims(),
                o0.dtype(),
                o0.dims()
            )
        }
        if l.dims() != expected.as_slice() || l.dtype() != DType::F32 {
            bail!(
                "merge_attention_states: `lses[{i}]` must be f32 {expected:?} (the log-sum-exp of `outs[{i}]`), got {:?} {:?}",
                l.dtype(),
                l.dims()
            )
        }
        if !o.device().same_device(o0.device()) || !l.device().same_device(o0.device()) {
            bail!("merge_attention_states: part {i} is on another device than `outs[0]`")
        }
    }
    Ok(())
}
