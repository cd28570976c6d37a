//! Standard attention, `softmax(scale·QKᵀ + bias)·V` with the `N×N` matrices materialised, built
//! from differentiable Candle ops. It is the test oracle (run in f64), the "naive" baseline of
//! the benchmarks and models (run in the model's dtype, backward by Candle's autograd), and it
//! takes exactly the options and layouts of [`crate::flash_attn`].
//!
//! As an oracle it shares no code with what it checks: visibility, ALiBi and the dropout mask are
//! written here again from their definitions (the docs of [`AttnOptions`] and of
//! [`crate::dropout`]), not taken from `mask` or `dropout`. Only argument checking and resolved
//! scalars (scale, softcap, per-head slopes, sequence lengths) come from `AttnParams`.
//!
//! Softmax is written out (max, exp, sum, divide) rather than calling
//! `candle_nn::ops::softmax_last_dim`, which has no backward.

use candle_core::{DType, Device, Result, Tensor, D};

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
    naive_core(q, k, v, &p, opts, &seq_ids)
}

/// Standard attention over a varlen batch; same contract as [`crate::flash_attn_varlen`].
pub fn naive_attention_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    batch: &crate::Varlen,
    opts: &AttnOptions,
) -> Result<(Tensor, Tensor)> {
    let p = AttnParams::varlen(q, k, v, batch, opts)?;
    let mut outs = Vec::new();
    let mut lses = Vec::new();
    for (s, span) in p.seqs.iter().enumerate() {
        let qs = q.narrow(0, span.q_start, span.q_len)?.unsqueeze(0)?;
        let ks = k.narrow(0, span.k_start, span.k_len)?.unsqueeze(0)?;
        let vs = v.narrow(0, span.k_start, span.k_len)?.unsqueeze(0)?;
        let (o, lse) = naive_core(&qs, &ks, &vs, &p, opts, &[s])?;
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

/// Whether query `i` sees key `j` in a sequence of `q_len` queries and `k_len` keys (its
/// `key_lengths` entry or varlen length), by the definition in [`AttnOptions`]: keys past `k_len`
/// are padding; causal and the window are aligned on the bottom-right diagonal `i + sk - sq`.
fn visible(opts: &AttnOptions, i: usize, j: usize, q_len: usize, k_len: usize) -> bool {
    if j >= k_len {
        return false;
    }
    let (j, diag) = (j as i64, i as i64 + k_len as i64 - q_len as i64);
    let after_diag = opts.causal && j > diag;
    let left_of_window = opts.window_left.is_some_and(|l| j < diag - l as i64);
    let right_of_window = opts.window_right.is_some_and(|r| j > diag + r as i64);
    !(after_diag || left_of_window || right_of_window)
}

/// ALiBi's bias of query `i` and key `j`: `-slope · |i + sk - sq - j|`.
fn alibi_bias(slope: f32, i: usize, j: usize, q_len: usize, k_len: usize) -> f64 {
    let dist = i as i64 + k_len as i64 - q_len as i64 - j as i64;
    -(slope as f64) * dist.unsigned_abs() as f64
}

/// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", 2011), written
/// from the Random123 specification: ten rounds of two 32×32→64 multiplications, the key bumped
/// by the Weyl constants between rounds.
fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    const MUL: [u64; 2] = [0xD251_1F53, 0xCD9E_8D57];
    const WEYL: [u32; 2] = [0x9E37_79B9, 0xBB67_AE85];
    let [mut x0, mut x1, mut x2, mut x3] = counter;
    let [mut k0, mut k1] = key;
    for round in 0..10 {
        if round > 0 {
            k0 = k0.wrapping_add(WEYL[0]);
            k1 = k1.wrapping_add(WEYL[1]);
        }
        let p0 = MUL[0] * x0 as u64;
        let p1 = MUL[1] * x2 as u64;
        (x0, x1, x2, x3) = (
            (p1 >> 32) as u32 ^ x1 ^ k0,
            p1 as u32,
            (p0 >> 32) as u32 ^ x3 ^ k1,
            p0 as u32,
        );
    }
    [x0, x1, x2, x3]
}

/// The dropout factor of (sequence `seq`, query head `head`, query `i`, key `j`), from the mask
/// layout documented in [`crate::dropout`]: draw `j mod 4` of Philox at counter
/// `[j / 4, i, seq · heads_q + head, 0]` with key `[seed lo, seed hi]`; the weight is kept iff
/// the draw is `>= p · 2³²` (clamped to `u32::MAX`) and kept weights are scaled by `1 / (1 - p)`.
fn dropout_factor(p: f32, seed: u64, stream: usize, i: usize, j: usize) -> f64 {
    let threshold = (p as f64 * 4_294_967_296.0).min(u32::MAX as f64) as u32;
    let counter = [(j / 4) as u32, i as u32, stream as u32, 0];
    let draw = philox4x32_10(counter, [seed as u32, (seed >> 32) as u32])[j % 4];
    if draw >= threshold {
        1.0 / (1.0 - p as f64)
    } else {
        0.0
    }
}

/// q `(nb, sq, hq, d)`, k/v `(nb, sk, hk, d)`, where local batch entry `b` is sequence
/// `seq_ids[b]` of `p` (that is where its key count, slopes and dropout stream come from).
fn naive_core(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    p: &AttnParams,
    opts: &AttnOptions,
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
    let on_device = |data: Vec<f64>, shape: &[usize]| -> Result<Tensor> {
        Tensor::from_vec(data, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)
    };
    let qh = q.transpose(1, 2)?.contiguous()?; // (nb, hq, sq, d)
    let kh = expand_kv(k)?;
    let vh = expand_kv(v)?;
    let mut s = (qh.matmul(&kh.t()?)? * p.scale as f64)?;
    if let Some(cap) = p.softcap {
        s = ((s / cap as f64)?.tanh()? * cap as f64)?;
    }

    // Keys of each local sequence: its `key_lengths` entry (dense) or its whole length (varlen).
    // A block mask adds its element rule (`BlockMask::visible`, sequence-local indices).
    let k_lens: Vec<usize> = seq_ids.iter().map(|&sid| p.seqs[sid].k_len).collect();
    let mask = opts.block_mask.as_ref();
    let sees = |b: usize, h: usize, i: usize, j: usize| {
        visible(opts, i, j, sq, k_lens[b]) && mask.is_none_or(|m| m.visible(seq_ids[b], h, i, j))
    };
    // One bias per batch entry and head only when slopes, key counts or the mask differ
    // between them.
    let per_head = p.alibi.is_some() || mask.is_some_and(|m| m.heads() > 1);
    let per_batch =
        per_head || k_lens.iter().any(|&l| l != k_lens[0]) || mask.is_some_and(|m| m.batch() > 1);
    let bb = if per_batch { nb } else { 1 };
    let hh = if per_head { hq } else { 1 };
    let all_visible =
        (0..bb).all(|b| (0..hh).all(|h| (0..sq).all(|i| (0..sk).all(|j| sees(b, h, i, j)))));
    let mut valid_rows = None;
    if p.alibi.is_some() || !all_visible {
        let neg = mask_value(dtype);
        let mut bias = Vec::with_capacity(bb * hh * sq * sk);
        for b in 0..bb {
            for h in 0..hh {
                let slope = p.alibi_slope(seq_ids[b], h);
                for i in 0..sq {
                    bias.extend((0..sk).map(|j| match (sees(b, h, i, j), slope) {
                        (false, _) => neg,
                        (true, None) => 0.0,
                        (true, Some(sl)) => alibi_bias(sl, i, j, sq, k_lens[b]),
                    }));
                }
            }
        }
        s = s.broadcast_add(&on_device(bias, &[bb, hh, sq, sk])?)?;
        let valid: Vec<f64> = (0..nb)
            .flat_map(|b| (0..hh).flat_map(move |h| (0..sq).map(move |i| (b, h, i))))
            .map(|(b, h, i)| {
                if (0..sk).any(|j| sees(b, h, i, j)) {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        if valid.contains(&0.0) {
            valid_rows = Some(on_device(valid, &[nb, hh, sq, 1])?.broadcast_as((nb, hq, sq, 1))?);
        }
    }

    // Softmax written out; subtracting the (detached) row max changes nothing mathematically.
    let m = s.max_keepdim(D::Minus1)?.detach();
    let e = s.broadcast_sub(&m)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    let mut probs = e.broadcast_div(&sum)?;
    let mut lse = (sum.log()? + &m)?;
    if let Some(valid) = &valid_rows {
        // Rows that see no key: zero weights and lse = -inf.
        probs = probs.broadcast_mul(valid)?;
        let neg_inf = on_device(vec![f64::NEG_INFINITY; nb * hq * sq], &[nb, hq, sq, 1])?;
        lse = valid.ne(0.0)?.where_cond(&lse, &neg_inf)?;
    }
    if let Some(dp) = p.dropout {
        let mut f = Vec::with_capacity(nb * hq * sq * sk);
        for &sid in seq_ids {
            for h in 0..hq {
                let stream = sid * p.heads_q + h;
                for i in 0..sq {
                    f.extend((0..sk).map(|j| dropout_factor(dp.p, dp.seed, stream, i, j)));
                }
            }
        }
        probs = (probs * on_device(f, &[nb, hq, sq, sk])?)?;
    }
    let out = probs.matmul(&vh)?.transpose(1, 2)?.contiguous()?;
    Ok((out, lse.squeeze(D::Minus1)?.to_dtype(DType::F32)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_matches_random123_known_answers() {
        // Random123's kat_vectors for philox4x32_10.
        assert_eq!(
            philox4x32_10([0; 4], [0; 2]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0]
            ),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn visibility_follows_the_definition() {
        // sq 3, sk 5: the diagonal of row i is key i + 2.
        let causal = AttnOptions::new().causal(true);
        let rows: Vec<Vec<bool>> = (0..3)
            .map(|i| (0..5).map(|j| visible(&causal, i, j, 3, 5)).collect())
            .collect();
        assert_eq!(rows[0], [true, true, true, false, false]);
        assert_eq!(rows[2], [true; 5]);
        // Window (1, 0) on the same diagonal; key 4 is padding when k_len is 4.
        let w = AttnOptions::new().window(Some(1), Some(0));
        let row: Vec<bool> = (0..5).map(|j| visible(&w, 1, j, 3, 5)).collect();
        assert_eq!(row, [false, false, true, true, false]);
        assert!(!visible(&AttnOptions::new(), 0, 4, 3, 4));
        // sq > sk, causal: the first rows see no key.
        assert!((0..2).all(|j| !visible(&causal, 0, j, 4, 2)));
        assert_eq!(alibi_bias(0.5, 0, 4, 3, 5), -1.0);
    }

    #[test]
    fn dropout_threshold_and_scale() {
        // p = 0 keeps everything unscaled; a p close to 1 drops nearly everything.
        assert!((0..64).all(|j| dropout_factor(0.0, 9, 3, 1, j) == 1.0));
        let kept = (0..4096)
            .filter(|&j| dropout_factor(0.999, 9, 3, 1, j) > 0.0)
            .count();
        assert!(kept < 20, "{kept}");
        let f = (0..64)
            .map(|j| dropout_factor(0.5, 9, 3, 1, j))
            .find(|&f| f > 0.0);
        assert_eq!(f, Some(2.0));
    }
}
