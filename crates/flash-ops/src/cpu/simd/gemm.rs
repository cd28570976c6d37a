//! `c (+)= beta · op(a) · op(b)` on contiguous row-major `f32` slices through the `gemm` crate
//! (the one Candle's CPU matmul uses; with its `x86-v4` feature it picks AVX-512 micro-kernels
//! at run time).

use gemm::Parallelism;

/// An operand as stored: `N(x)` holds the `rows×cols` matrix row-major, `T(x)` its transpose
/// (`cols×rows` row-major).
#[derive(Clone, Copy)]
pub enum Op<'a> {
    N(&'a [f32]),
    T(&'a [f32]),
}

/// Who runs the product.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// The calling thread (attention tiles: the tasks are already parallel).
    One,
    /// The rayon pool, for products large enough to share (`m·n·k > 2¹⁶`).
    Pool,
}

impl<'a> Op<'a> {
    /// (row stride, column stride, slice) of this operand used as a `rows×cols` matrix.
    fn strides(self, rows: usize, cols: usize) -> (isize, isize, &'a [f32]) {
        match self {
            Op::N(x) => (cols as isize, 1, x),
            Op::T(x) => (1, rows as isize, x),
        }
    }
}

/// `c (+)= beta · a · b` with `a: m×k`, `b: k×n` (each as its [`Op`] says) and `c: m×n`
/// row-major; `accumulate` adds to `c` instead of overwriting it.
pub fn gemm(
    (m, n, k): (usize, usize, usize),
    a: Op,
    b: Op,
    c: &mut [f32],
    (accumulate, beta): (bool, f32),
    threads: Threads,
) {
    let (ar, ac, a) = a.strides(m, k);
    let (br, bc, b) = b.strides(k, n);
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    let pool = rayon::current_num_threads();
    let par = if threads == Threads::Pool && pool > 1 && m * n * k > 1 << 16 {
        Parallelism::Rayon(pool)
    } else {
        Parallelism::None
    };
    // SAFETY: the bounds above cover every element the strides address.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            ac,
            ar,
            b.as_ptr(),
            bc,
            br,
            1.0,
            beta,
            false,
            false,
            false,
            par,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::{gemm, Op, Threads};

    #[test]
    fn every_operand_order_matches_loops() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        // (a transposed?, b transposed?, element (t, i) of a, (t, j) of b).
        type At = fn(&[f32], usize, usize) -> f32;
        let cases: [(bool, bool, At, At); 3] = [
            (false, true, |a, i, t| a[i * 3 + t], |b, t, j| b[j * 3 + t]),
            (true, false, |a, i, t| a[t * 5 + i], |b, t, j| b[t * 7 + j]),
            (false, false, |a, i, t| a[i * 3 + t], |b, t, j| b[t * 7 + j]),
        ];
        for (at, bt, ea, eb) in cases {
            let op = |x, t| if t { Op::T(x) } else { Op::N(x) };
            let mut c = vec![1f32; m * n];
            gemm(
                (m, n, k),
                op(&a, at),
                op(&b, bt),
                &mut c,
                (true, 2.0),
                Threads::One,
            );
            for i in 0..m {
                for j in 0..n {
                    let want = 1.0 + 2.0 * (0..k).map(|t| ea(&a, i, t) * eb(&b, t, j)).sum::<f32>();
                    assert!((c[i * n + j] - want).abs() < 1e-5, "{at} {bt} ({i}, {j})");
                }
            }
        }
    }
}
