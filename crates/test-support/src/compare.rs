//! How a result is compared with the oracle: the relative L2 error, and the log-sum-exp rule
//! that a row which sees no key is `-inf` in both.

use candle_core::{DType, Tensor};

/// A suite's error bounds by dtype; `bf16`'s also bounds any other dtype.
#[derive(Debug, Clone, Copy)]
pub struct Tol {
    pub f32: f64,
    pub f16: f64,
    pub bf16: f64,
}

impl Tol {
    pub fn of(self, dtype: DType) -> f64 {
        match dtype {
            DType::F32 => self.f32,
            DType::F16 => self.f16,
            _ => self.bf16,
        }
    }
}

/// All elements of `t` as f64, row-major.
pub fn to_f64_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("a float tensor")
}

/// The f32 bit patterns of all elements of `t` (widened from f16/bf16), for tests that ask for
/// identical results rather than close ones.
pub fn f32_bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .expect("a float tensor")
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// `‖a − b‖₂ / ‖b‖₂` in f64; `‖a − b‖₂` when `b` is all zeros (so 0 when both are).
pub fn rel_err_slices(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "compared results differ in length");
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// [`rel_err_slices`] of two tensors of the same element count.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    rel_err_slices(&to_f64_vec(a), &to_f64_vec(b))
}

/// Relative error of a log-sum-exp `a` against `b` over the rows `b` says see a key; a row
/// with `b = -inf` (no visible key) must be `-inf` in `a` too (panics otherwise).
pub fn lse_err_slices(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "compared log-sum-exps differ in length");
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for (i, (&ai, &bi)) in a.iter().zip(b).enumerate() {
        if bi.is_infinite() {
            assert_eq!(
                ai, bi,
                "lse row {i}: a row that sees no key must have lse = -inf"
            );
        } else {
            x.push(ai);
            y.push(bi);
        }
    }
    rel_err_slices(&x, &y)
}

/// [`lse_err_slices`] of two tensors.
pub fn lse_err(a: &Tensor, b: &Tensor) -> f64 {
    lse_err_slices(&to_f64_vec(a), &to_f64_vec(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_error() {
        assert_eq!(rel_err_slices(&[3.0, 4.0], &[3.0, 4.0]), 0.0);
        assert!((rel_err_slices(&[3.0, 5.0], &[3.0, 4.0]) - 0.2).abs() < 1e-15);
        assert_eq!(rel_err_slices(&[0.0, 0.0], &[0.0, 0.0]), 0.0);
        assert_eq!(rel_err_slices(&[3.0, 4.0], &[0.0, 0.0]), 5.0);
    }

    #[test]
    fn lse_skips_empty_rows_that_match() {
        let inf = f64::NEG_INFINITY;
        assert_eq!(lse_err_slices(&[inf, 2.0], &[inf, 2.0]), 0.0);
        assert!((lse_err_slices(&[inf, 2.2], &[inf, 2.0]) - 0.1).abs() < 1e-12);
    }

    #[test]
    #[should_panic(expected = "must have lse = -inf")]
    fn lse_rejects_a_finite_value_for_an_empty_row() {
        lse_err_slices(&[1.0, 2.0], &[f64::NEG_INFINITY, 2.0]);
    }
}
