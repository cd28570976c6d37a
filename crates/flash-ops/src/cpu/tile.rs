//! Tile-level building blocks of the CPU kernels: GEMMs on contiguous f32 tiles (through the
//! `gemm` crate, the one candle itself uses), a vectorisable `exp`, and the elementwise passes of
//! the online softmax and of the backward pass.
//!
//! The elementwise passes are compiled twice, for the baseline target and for AVX2+FMA, and the
//! fast one is picked at run time: on an 8-wide machine they would otherwise cost as much as the
//! tile GEMMs (one `exp` per score against `4·d` GEMM flops).

use gemm::{gemm, Parallelism};

/// Compiles `$body` for the baseline target and for AVX2+FMA, and dispatches at run time.
macro_rules! simd_dispatch {
    ($(#[$m:meta])* pub fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn inner($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the features were detected at run time just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            inner($($arg),*)
        }
    };
}

/// Row and column strides of one GEMM operand.
#[derive(Clone, Copy)]
struct Strides {
    row: isize,
    col: isize,
}

/// A contiguous row-major operand used as the `rows×cols` matrix of a product: as stored
/// (`rows×cols` in memory) or transposed (`cols×rows` in memory). Returns its strides and the
/// elements it must hold.
fn operand(rows: usize, cols: usize, transposed: bool) -> (Strides, usize) {
    let strides = if transposed {
        Strides {
            row: 1,
            col: rows as isize,
        }
    } else {
        Strides {
            row: cols as isize,
            col: 1,
        }
    };
    (strides, rows * cols)
}

/// `c (+)= beta · lhs · rhs` with `lhs: m×k`, `rhs: k×n` (each stored row-major, transposed when
/// its flag says so) and `c: m×n` row-major.
fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    (lhs, lhs_t): (&[f32], bool),
    (rhs, rhs_t): (&[f32], bool),
    c: &mut [f32],
    accumulate: bool,
    beta: f32,
) {
    let (ls, lhs_len) = operand(m, k, lhs_t);
    let (rs, rhs_len) = operand(k, n, rhs_t);
    assert!(lhs.len() >= lhs_len && rhs.len() >= rhs_len && c.len() >= m * n);
    // SAFETY: the bounds above cover every element the strides address.
    unsafe {
        gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            ls.col,
            ls.row,
            rhs.as_ptr(),
            rs.col,
            rs.row,
            1.0,
            beta,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// `c (+)= beta · a · bᵀ`, with `a: m×k`, `b: n×k`, `c: m×n`, all row-major and contiguous.
pub fn gemm_abt(
    mnk: (usize, usize, usize),
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    acc: bool,
    beta: f32,
) {
    gemm_f32(mnk, (a, false), (b, true), c, acc, beta)
}

/// `c (+)= beta · a · b`, with `a: m×k`, `b: k×n`, `c: m×n`, row-major and contiguous.
pub fn gemm_ab(
    mnk: (usize, usize, usize),
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    acc: bool,
    beta: f32,
) {
    gemm_f32(mnk, (a, false), (b, false), c, acc, beta)
}

/// `c (+)= beta · aᵀ · b`, with `a: k×m`, `b: k×n`, `c: m×n`, row-major and contiguous.
pub fn gemm_atb(
    mnk: (usize, usize, usize),
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    acc: bool,
    beta: f32,
) {
    gemm_f32(mnk, (a, true), (b, false), c, acc, beta)
}

/// `exp(x)` to ~1 ulp (Cephes' `expf` polynomial), written branch-free so loops vectorise;
/// exactly 0 below `ln(f32::MIN_POSITIVE)`, so masked (`-inf`) scores give exactly 0.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding it rounds to the nearest integer (ties to even) and leaves that integer in
    // the low mantissa bits, so no float→int conversion (which does not vectorise) is needed.
    const SHIFTER: f32 = 12_582_912.0;
    let xc = x.clamp(-87.3, 88.7);
    let t = xc * LOG2E + SHIFTER;
    let n = t - SHIFTER;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let biased = t
        .to_bits()
        .wrapping_sub(SHIFTER.to_bits())
        .wrapping_add(127);
    let pow2 = f32::from_bits(biased << 23);
    if x < -87.3 {
        0.0
    } else {
        y * pow2
    }
}

/// Largest element (`-inf` for an empty or fully masked slice), eight independent lanes: LLVM
/// does not vectorise an ordered float reduction, but it does vectorise independent lanes.
#[inline(always)]
fn max_of(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for c in chunks {
        for k in 0..8 {
            lanes[k] = if c[k] > lanes[k] { c[k] } else { lanes[k] };
        }
    }
    lanes.iter().fold(tail, |a, &b| a.max(b))
}

/// Sum in eight lanes (see `max_of`).
#[inline(always)]
fn sum_of(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for k in 0..8 {
            lanes[k] += c[k];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

simd_dispatch! {
    /// Online-softmax step of one score row (FlashAttention-2, Algorithm 1 lines 8–10): given the
    /// running max `m` and sum `l`, turns `row` into `exp(row - m_new)` and returns
    /// `(m_new, l_new, correction)` where `correction = exp(m - m_new)` rescales the old state.
    /// A row with nothing visible yet keeps `m = -inf` and becomes all zeros.
    pub fn online_softmax_row(row: &mut [f32], m: f32, l: f32) -> (f32, f32, f32) {
        let m_new = m.max(max_of(row));
        if m_new == f32::NEG_INFINITY {
            row.iter_mut().for_each(|x| *x = 0.0);
            return (m, l, 1.0);
        }
        // Separate passes: the map vectorises, and so does the lane-wise sum.
        row.iter_mut().for_each(|x| *x = exp(*x - m_new));
        let sum = sum_of(row);
        let correction = exp(m - m_new);
        (m_new, l * correction + sum, correction)
    }
}

simd_dispatch! {
    /// `row[c] = exp(row[c] - lse)`: probabilities recomputed from the saved log-sum-exp
    /// (FlashAttention-2, Algorithm 2 line 11). A row with `lse = -inf` saw no key: all zeros.
    pub fn probs_from_lse(row: &mut [f32], lse: f32) {
        if lse == f32::NEG_INFINITY {
            row.iter_mut().for_each(|x| *x = 0.0);
        } else {
            row.iter_mut().for_each(|x| *x = exp(*x - lse));
        }
    }
}

simd_dispatch! {
    /// `ds = p ∘ (dp − delta)`, written into `dp` (Algorithm 2 line 14).
    pub fn softmax_grad_row(p: &[f32], dp: &mut [f32], delta: f32) {
        for (d, &pv) in dp.iter_mut().zip(p) {
            *d = pv * (*d - delta);
        }
    }
}

simd_dispatch! {
    /// `dst[i] *= src[i]`.
    pub fn mul_assign(dst: &mut [f32], src: &[f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d *= s;
        }
    }
}

simd_dispatch! {
    /// `dst[i] *= s`.
    pub fn scale_assign(dst: &mut [f32], s: f32) {
        dst.iter_mut().for_each(|d| *d *= s);
    }
}

simd_dispatch! {
    /// `Σ a[i]·b[i]`, accumulated in eight lanes.
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut lanes = [0.0f32; 8];
        let ca = a.chunks_exact(8);
        let cb = b.chunks_exact(8);
        let mut tail = 0.0f32;
        for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
            tail += x * y;
        }
        for (x, y) in ca.zip(cb) {
            for l in 0..8 {
                lanes[l] += x[l] * y[l];
            }
        }
        lanes.iter().sum::<f32>() + tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let rel = ((exp(x) as f64) - (x as f64).exp()).abs() / (x as f64).exp();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
    }

    #[test]
    fn gemm_wrappers_match_loops() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut c = vec![0f32; m * n];
        gemm_abt((m, n, k), &a, &b, &mut c, false, 2.0);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|t| a[i * k + t] * b[j * k + t]).sum::<f32>() * 2.0;
                assert!((c[i * n + j] - want).abs() < 1e-5);
            }
        }
        // aᵀ·b with a: k×m stored as the first k·m values, b: k×n.
        let mut c2 = vec![1f32; m * n];
        gemm_atb((m, n, k), &a[..k * m], &b[..k * n], &mut c2, true, 1.0);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = 1.0 + (0..k).map(|t| a[t * m + i] * b[t * n + j]).sum::<f32>();
                assert!((c2[i * n + j] - want).abs() < 1e-5);
            }
        }
        let mut c3 = vec![0f32; m * n];
        gemm_ab((m, n, k), &a, &b[..k * n], &mut c3, false, 1.0);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|t| a[i * k + t] * b[t * n + j]).sum();
                assert!((c3[i * n + j] - want).abs() < 1e-5);
            }
        }
    }
}
