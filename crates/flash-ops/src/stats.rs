//! What forward saves for backward, and how it becomes the log-sum-exp.
//!
//! V2 saves the log-sum-exp itself; V1 saves the row max `m`, then the row sum `l` (each
//! [`AttnParams::lse_len`] long, in the log-sum-exp layout), as FlashAttention's Algorithm 1
//! keeps them. A row that saw no key has `m = -inf`, `l = 0` and `lse = -inf`.

use std::borrow::Cow;

use candle_core::{Result, Tensor};

use crate::params::AttnParams;
use crate::Algorithm;

/// `lse = m + ln l` of one row; `-inf` for a row that saw no key (`l = 0`).
#[inline]
pub fn lse(m: f32, l: f32) -> f32 {
    if l > 0.0 {
        m + l.ln()
    } else {
        f32::NEG_INFINITY
    }
}

/// The log-sum-exp of statistics held on the host (V1's `m ‖ l` converted row by row).
pub fn lse_host<'a>(p: &AttnParams, stats: &'a [f32]) -> Cow<'a, [f32]> {
    let n = p.lse_len();
    match p.algorithm {
        Algorithm::V2 => Cow::Borrowed(&stats[..n]),
        Algorithm::V1 => {
            let (m, l) = stats[..2 * n].split_at(n);
            Cow::Owned(m.iter().zip(l).map(|(&m, &l)| lse(m, l)).collect())
        }
    }
}

/// [`lse_host`] on statistics wherever they live (the GPU backends keep them on the device),
/// shaped [`AttnParams::lse_dims`]. The same rule as [`lse`]: where `l = 0`, `m = -inf` and
/// `ln 0 = -inf`, so the sum is `-inf` too.
pub fn lse_tensor(p: &AttnParams, stats: &Tensor) -> Result<Tensor> {
    let n = p.lse_len();
    let lse = match p.algorithm {
        Algorithm::V2 => stats.clone(),
        Algorithm::V1 => (stats.narrow(0, 0, n)? + stats.narrow(0, n, n)?.log()?)?,
    };
    lse.reshape(p.lse_dims())
}
