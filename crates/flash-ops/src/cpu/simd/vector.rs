//! One vector of `f32` lanes, as the kernels see it, and the math written once over it.

/// A vector of [`Simd::W`] `f32` lanes. Every method is `unsafe`: the CPU must have the type's
/// features (the `#[target_feature]` entry points of `x86.rs` guarantee it).
pub trait Simd: Copy {
    const W: usize;
    unsafe fn splat(x: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    unsafe fn add(self, o: Self) -> Self;
    unsafe fn sub(self, o: Self) -> Self;
    unsafe fn mul(self, o: Self) -> Self;
    unsafe fn div(self, o: Self) -> Self;
    unsafe fn max(self, o: Self) -> Self;
    unsafe fn min(self, o: Self) -> Self;
    /// `self · b + c`, fused where the ISA has FMA.
    unsafe fn mul_add(self, b: Self, c: Self) -> Self;
    unsafe fn abs(self) -> Self;
    /// Lane-wise `if self < o { x } else { y }`.
    unsafe fn lt_select(self, o: Self, x: Self, y: Self) -> Self;
    /// Lane-wise `if bit l of bits { x } else { y }` (the low `W` bits: a block mask's row).
    unsafe fn bit_select(bits: u32, x: Self, y: Self) -> Self;
    /// `2ⁿ` for lanes `t = n + SHIFTER` (`n` integral, `-127 < n < 128`): the integer sits in
    /// the low mantissa bits, so subtracting `SHIFTER`'s bits and adding the bias gives the
    /// exponent field, with no float→int conversion.
    unsafe fn pow2_shifted(self) -> Self;
    /// `0, 1, …, W − 1`.
    unsafe fn iota() -> Self;
    /// Largest lane, reduced in a fixed order.
    unsafe fn hmax(self) -> f32;
    /// Sum of the lanes, reduced in a fixed order.
    unsafe fn hsum(self) -> f32;
}

/// 1.5·2²³: adding it rounds to the nearest integer (ties to even) and leaves that integer in
/// the low mantissa bits.
pub const SHIFTER: f32 = 12_582_912.0;

/// The portable path: one lane, plain arithmetic (no `mul_add`, a libm call without FMA).
impl Simd for f32 {
    const W: usize = 1;
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        x
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        *p
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        *p = self
    }
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        self + o
    }
    #[inline(always)]
    unsafe fn sub(self, o: Self) -> Self {
        self - o
    }
    #[inline(always)]
    unsafe fn mul(self, o: Self) -> Self {
        self * o
    }
    #[inline(always)]
    unsafe fn div(self, o: Self) -> Self {
        self / o
    }
    #[inline(always)]
    unsafe fn max(self, o: Self) -> Self {
        if self > o {
            self
        } else {
            o
        }
    }
    #[inline(always)]
    unsafe fn min(self, o: Self) -> Self {
        if self < o {
            self
        } else {
            o
        }
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        self * b + c
    }
    #[inline(always)]
    unsafe fn abs(self) -> Self {
        f32::abs(self)
    }
    #[inline(always)]
    unsafe fn lt_select(self, o: Self, x: Self, y: Self) -> Self {
        if self < o {
            x
        } else {
            y
        }
    }
    #[inline(always)]
    unsafe fn bit_select(bits: u32, x: Self, y: Self) -> Self {
        if bits & 1 == 1 {
            x
        } else {
            y
        }
    }
    #[inline(always)]
    unsafe fn pow2_shifted(self) -> Self {
        let biased = self
            .to_bits()
            .wrapping_sub(SHIFTER.to_bits())
            .wrapping_add(127);
        f32::from_bits(biased << 23)
    }
    #[inline(always)]
    unsafe fn iota() -> Self {
        0.0
    }
    #[inline(always)]
    unsafe fn hmax(self) -> f32 {
        self
    }
    #[inline(always)]
    unsafe fn hsum(self) -> f32 {
        self
    }
}

/// Lanes `c..c + n` of `s` (`n ≤ W`), the others `fill`.
#[inline(always)]
pub unsafe fn get<V: Simd>(s: &[f32], c: usize, n: usize, fill: f32) -> V {
    debug_assert!(c + n <= s.len());
    if n == V::W {
        V::load(s.as_ptr().add(c))
    } else {
        let mut buf = [fill; 16];
        buf[..n].copy_from_slice(&s[c..c + n]);
        V::load(buf.as_ptr())
    }
}

/// Writes the first `n` lanes of `v` to `s[c..c + n]`.
#[inline(always)]
pub unsafe fn put<V: Simd>(s: &mut [f32], c: usize, n: usize, v: V) {
    debug_assert!(c + n <= s.len());
    if n == V::W {
        v.store(s.as_mut_ptr().add(c))
    } else {
        let mut buf = [0f32; 16];
        v.store(buf.as_mut_ptr());
        s[c..c + n].copy_from_slice(&buf[..n]);
    }
}

/// `exp(x)`, Cephes' `expf`: `x = n·ln2 + r` with `|r| ≤ ln2/2` (`ln2` split in two so `n·ln2`
/// is exact), then `eʳ ≈ 1 + r + r²·P(r)` with a degree-5 minimax `P`. The polynomial's own
/// error is below 2⁻²⁴ on that interval; Cephes measures a peak relative error of 1.7e-7 over
/// the whole range, and `fast_exp_is_accurate` bounds ours below 3e-7 (≈ 2.5 ulp). Arguments are
/// clamped to `[-87.3, 88.7]`; below `-87.3` (including `-inf`) the result is exactly 0.
#[inline(always)]
pub unsafe fn exp<V: Simd>(x: V) -> V {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let lo = V::splat(-87.3);
    let xc = x.max(lo).min(V::splat(88.7));
    let t = xc.mul_add(V::splat(LOG2E), V::splat(SHIFTER));
    let n = t.sub(V::splat(SHIFTER));
    let r = n.mul_add(V::splat(-LN2_HI), xc);
    let r = n.mul_add(V::splat(-LN2_LO), r);
    let mut p = V::splat(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = p.mul_add(r, V::splat(c));
    }
    let y = p.mul(r).mul_add(r, r).add(V::splat(1.0));
    x.lt_select(lo, V::splat(0.0), y.mul(t.pow2_shifted()))
}

/// `tanh(x)`, Cephes' `tanhf`: below `|x| = 0.625` an odd degree-9 minimax polynomial, above it
/// `1 − 2/(e^{2|x|} + 1)` (no cancellation there, since `e^{2|x|} > 3.4`), with the sign put
/// back. Cephes' peak relative error: 1.3e-7 (each branch computed, the right one selected).
#[inline(always)]
pub unsafe fn tanh<V: Simd>(x: V) -> V {
    let a = x.abs();
    let z = x.mul(x);
    let mut p = V::splat(-5.704_988_7e-3);
    for c in [2.063_909e-2, -5.373_971_6e-2, 1.333_144_2e-1, -3.333_328e-1] {
        p = p.mul_add(z, V::splat(c));
    }
    let small = p.mul(z).mul_add(x, x);
    let one = V::splat(1.0);
    let e = exp(a.add(a));
    let big = one.sub(V::splat(2.0).div(e.add(one)));
    let big = x.lt_select(V::splat(0.0), V::splat(0.0).sub(big), big);
    a.lt_select(V::splat(0.625), small, big)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Largest relative error of `f` against `want` on `[lo, hi)` in steps of `step`.
    fn worst(f: fn(f32) -> f32, want: fn(f64) -> f64, (lo, hi, step): (f32, f32, f32)) -> f64 {
        let mut worst = 0f64;
        let mut x = lo;
        while x < hi {
            let w = want(x as f64);
            worst = worst.max((f(x) as f64 - w).abs() / w.abs().max(1e-30));
            x += step;
        }
        worst
    }

    #[test]
    fn exp_and_tanh_are_accurate() {
        // SAFETY: the f32 path needs no feature.
        let e = worst(
            |x| unsafe { exp::<f32>(x) },
            f64::exp,
            (-87.0, 88.0, 0.0137),
        );
        assert!(e < 3e-7, "exp: worst relative error {e}");
        let t = worst(
            |x| unsafe { tanh::<f32>(x) },
            f64::tanh,
            (-12.0, 12.0, 0.00371),
        );
        assert!(t < 4e-7, "tanh: worst relative error {t}");
        assert_eq!(unsafe { exp::<f32>(f32::NEG_INFINITY) }, 0.0);
        assert_eq!(unsafe { exp::<f32>(-100.0) }, 0.0);
    }
}
