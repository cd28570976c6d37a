//! Standard attention, `softmax(scale·QKᵀ + bias)·V` with the `N×N` matrices materialised, built
//! from differentiable Candle ops. It is the test oracle (run in f64), the "naive" baseline of
//! the benchmarks and models (run in the model's dtype, backward by Candle's autograd), and it
//! takes exactly the options and layouts of [`crate::flash_attn`].
//!
//! Softmax is written out (max, exp, sum, divide) rather than calling
//! `candle_nn::ops::softmax_last_dim`, which has no backward.

use candle_core::{DType, Device, Result, Tensor, D};

use crate::dropout::DropoutMask;
use crate::mask::ScoreMods;
use crate::params::AttnParams;
use crate::AttnOptions;

/// Standard attention over dense inputs; same contract as [`crate::flash_attn`], any float
/// dtype (f64 included).
pub fn naive_attention(q: &Tensor, k: &Tensor, v: &Tensor, opts: &AttnOptions) -> Result<Tensor> {
    Ok(naive_attention_with_lse(q, k, v, opts)?.0)
}

/// As [`naive_attention`], with the log-sum-exp `(b, hq, sq)`.
pub fn naive_attention_with_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &AttnOptions,
) -> Result<(Tensor, Tensor)> {
    let p = AttnParams::dense(q, k, v, opts)?;
    let seq_ids: Vec<usize> = (0..p.batch()).collect();
    naive_core(q, k, v, &p, &seq_ids)
}

/// Standard attention over a varlen batch; same contract as [`crate::flash_attn_varlen`].
#[allow(clippy::too_many_arguments)]
pub fn naive_attention_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens_q: &Tensor,
    cu_seqlens_k: &Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    opts: &AttnOptions,
) -> Result<(Tensor, Tensor)> {
    let batch = crate::Varlen::new(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
    let p = AttnParams::varlen(q, k, v, &batch, opts)?;
    let mut outs = Vec::new();
    let mut lses = Vec::new();
    for (s, span) in p.seqs.iter().enumerate() {
        let qs = q.narrow(0, span.q_start, span.q_len)?.unsqueeze(0)?;
        let ks = k.narrow(0, span.k_start, span.k_len)?.unsqueeze(0)?;
        let vs = v.narrow(0, span.k_start, span.k_len)?.unsqueeze(0)?;
        let (o, lse) = naive_core(&qs, &ks, &vs, &p, &[s])?;
        outs.push(o.squeeze(0)?);
        lses.push(lse.squeeze(0)?);
    }
    Ok((Tensor::cat(&outs, 0)?, Tensor::cat(&lses, 1)?))
}

/// `mask_value`: finite (so a fully masked row gives no NaN before it is zeroed), and far below
/// any real score for the dtype.
fn mask_value(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => -3.0e4,
        _ => -1.0e30,
    }
}

/// q `(nb, sq, hq, d)`, k/v `(nb, sk, hk, d)`, where local batch entry `i` is sequence
/// `seq_ids[i]` of `p` (that is where its masks, slopes and dropout stream come from).
fn naive_core(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    p: &AttnParams,
    seq_ids: &[usize],
) -> Result<(Tensor, Tensor)> {
    let (nb, sq, hq, d) = q.dims4()?;
    let sk = k.dim(1)?;
    let hk = k.dim(2)?;
    let dtype = q.dtype();
    let dev = q.device();
    let g = hq / hk;
    let expand_kv = |t: &Tensor| -> Result<Tensor> {
        let t = t.transpose(1, 2)?; // (nb, hk, sk, d)
        if g == 1 {
            return t.contiguous();
        }
        t.unsqueeze(2)?
            .expand((nb, hk, g, sk, d))?
            .reshape((nb, hq, sk, d))
    };
    let qh = q.transpose(1, 2)?.contiguous()?; // (nb, hq, sq, d)
    let kh = expand_kv(k)?;
    let vh = expand_kv(v)?;
    let mut s = (qh.matmul(&kh.t()?)? * p.scale as f64)?;
    if let Some(cap) = p.softcap {
        s = ((s / cap as f64)?.tanh()? * cap as f64)?;
    }

    let mods: Vec<Vec<ScoreMods>> = seq_ids
        .iter()
        .map(|&sid| (0..hq).map(|h| ScoreMods::new(p, sid, h)).collect())
        .collect();
    let needs_mask = mods.iter().flatten().any(|m| {
        m.alibi_slope.is_some()
            || m.k_len != sk
            || m.window_left
                .is_some_and(|l| (l as i64) < (sk as i64 + sq as i64))
            || m.window_right.is_some_and(|r| (r as i64) < sk as i64)
    });
    let mut valid_rows = None;
    if needs_mask {
        // A bias per (batch, head) only when slopes or lengths differ between them.
        let per_head = p.alibi.is_some();
        let per_batch = per_head || mods.iter().any(|m| m[0].k_len != mods[0][0].k_len);
        let (bb, hh) = (
            if per_batch { nb } else { 1 },
            if per_head { hq } else { 1 },
        );
        let neg = mask_value(dtype);
        let mut bias = vec![0f64; bb * hh * sq * sk];
        let mut valid = vec![1f64; nb * hq * sq];
        for (b, mb) in mods.iter().enumerate() {
            for (h, m) in mb.iter().enumerate() {
                for i in 0..sq {
                    let (lo, hi) = m.key_range(i);
                    if lo >= hi {
                        valid[(b * hq + h) * sq + i] = 0.0;
                    }
                    if b >= bb || h >= hh {
                        continue;
                    }
                    let row = &mut bias[((b * hh + h) * sq + i) * sk..][..sk];
                    for (j, x) in row.iter_mut().enumerate() {
                        *x = if j >= lo && j < hi {
                            m.alibi_slope.map_or(0.0, |sl| {
                                -(sl as f64) * (i as i64 + m.diag - j as i64).abs() as f64
                            })
                        } else {
                            neg
                        };
                    }
                }
            }
        }
        let bias = Tensor::from_vec(bias, (bb, hh, sq, sk), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)?;
        s = s.broadcast_add(&bias)?;
        if valid.contains(&0.0) {
            valid_rows = Some(
                Tensor::from_vec(valid, (nb, hq, sq, 1), &Device::Cpu)?
                    .to_dtype(dtype)?
                    .to_device(dev)?,
            );
        }
    }

    // Softmax written out; subtracting the (detached) row max changes nothing mathematically.
    let m = s.max_keepdim(D::Minus1)?.detach();
    let e = s.broadcast_sub(&m)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    let mut probs = e.broadcast_div(&sum)?;
    let mut lse = (sum.log()? + &m)?;
    if let Some(valid) = &valid_rows {
        probs = probs.broadcast_mul(valid)?;
        let neg_inf = Tensor::full(f64::NEG_INFINITY, lse.shape(), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)?;
        lse = valid.ne(0.0)?.where_cond(&lse, &neg_inf)?;
    }
    if let Some(dp) = p.dropout {
        let mut f = vec![0f32; nb * hq * sq * sk];
        for (b, &sid) in seq_ids.iter().enumerate() {
            for h in 0..hq {
                let dm = DropoutMask::new(dp.p, dp.seed, sid, p.heads_q, h);
                for i in 0..sq {
                    dm.row_factors(i, 0, &mut f[((b * hq + h) * sq + i) * sk..][..sk]);
                }
            }
        }
        let f = Tensor::from_vec(f, (nb, hq, sq, sk), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)?;
        probs = (probs * f)?;
    }
    let out = probs.matmul(&vh)?.transpose(1, 2)?.contiguous()?;
    Ok((out, lse.squeeze(D::Minus1)?.to_dtype(DType::F32)?))
}
