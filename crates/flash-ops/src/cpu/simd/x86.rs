//! The x86-64 vectors: `__m512` (AVX-512F) and `__m256` (AVX2+FMA), and the `#[target_feature]`
//! entry points that instantiate a kernel for each. The methods are `#[inline]` functions with
//! the same features as their entry point, so LLVM inlines them into it.

use std::arch::x86_64::*;

use super::vector::{Simd, SHIFTER};
use super::Kernel;

/// The methods whose intrinsics differ only by name between the two widths, then the
/// ISA's own methods (`own`), each `#[inline]` with the ISA's features.
macro_rules! lanewise {
    ($feat:literal, $w:literal, $set1:ident, $loadu:ident, $storeu:ident, $fmadd:ident,
     pow2: $cast_i:ident, $cast_f:ident, $sub32:ident, $add32:ident, $set1_32:ident, $slli:ident,
     binary: $($op:ident = $f:ident),*;
     own: $(unsafe fn $name:ident($($arg:tt)*) -> $ret:ty $body:block)*) => {
        const W: usize = $w;
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn splat(x: f32) -> Self {
            $set1(x)
        }
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn load(p: *const f32) -> Self {
            $loadu(p)
        }
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn store(self, p: *mut f32) {
            $storeu(p, self)
        }
        $(
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn $op(self, o: Self) -> Self {
                $f(self, o)
            }
        )*
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn mul_add(self, b: Self, c: Self) -> Self {
            $fmadd(self, b, c)
        }
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn pow2_shifted(self) -> Self {
            let bits = $sub32($cast_i(self), $cast_i($set1(SHIFTER)));
            $cast_f($slli::<23>($add32(bits, $set1_32(127))))
        }
        $(
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn $name($($arg)*) -> $ret $body
        )*
    };
}

impl Simd for __m512 {
    lanewise!("avx512f", 16, _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_fmadd_ps,
        pow2: _mm512_castps_si512, _mm512_castsi512_ps, _mm512_sub_epi32, _mm512_add_epi32, _mm512_set1_epi32, _mm512_slli_epi32,
        binary: add = _mm512_add_ps, sub = _mm512_sub_ps, mul = _mm512_mul_ps, div = _mm512_div_ps, max = _mm512_max_ps, min = _mm512_min_ps;
        own:
        unsafe fn abs(self) -> Self { _mm512_abs_ps(self) }
        unsafe fn lt_select(self, o: Self, x: Self, y: Self) -> Self {
            _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(self, o), y, x)
        }
        unsafe fn bit_select(bits: u32, x: Self, y: Self) -> Self {
            _mm512_mask_blend_ps(bits as u16, y, x)
        }
        unsafe fn iota() -> Self {
            _mm512_setr_ps(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0)
        }
        unsafe fn hmax(self) -> f32 { _mm512_reduce_max_ps(self) }
        unsafe fn hsum(self) -> f32 { _mm512_reduce_add_ps(self) }
    );
}

impl Simd for __m256 {
    lanewise!("avx2,fma", 8, _mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_fmadd_ps,
        pow2: _mm256_castps_si256, _mm256_castsi256_ps, _mm256_sub_epi32, _mm256_add_epi32, _mm256_set1_epi32, _mm256_slli_epi32,
        binary: add = _mm256_add_ps, sub = _mm256_sub_ps, mul = _mm256_mul_ps, div = _mm256_div_ps, max = _mm256_max_ps, min = _mm256_min_ps;
        own:
        unsafe fn abs(self) -> Self { _mm256_andnot_ps(_mm256_set1_ps(-0.0), self) }
        unsafe fn lt_select(self, o: Self, x: Self, y: Self) -> Self {
            _mm256_blendv_ps(y, x, _mm256_cmp_ps::<_CMP_LT_OQ>(self, o))
        }
        unsafe fn bit_select(bits: u32, x: Self, y: Self) -> Self {
            // Lane l keeps bit l: broadcast, AND with 1 << l, compare to 1 << l.
            let lanes = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
            let set = _mm256_and_si256(_mm256_set1_epi32(bits as i32), lanes);
            _mm256_blendv_ps(y, x, _mm256_castsi256_ps(_mm256_cmpeq_epi32(set, lanes)))
        }
        unsafe fn iota() -> Self { _mm256_setr_ps(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0) }
        unsafe fn hmax(self) -> f32 { fold(self, |a, b| _mm_max_ps(a, b)) }
        unsafe fn hsum(self) -> f32 { fold(self, |a, b| _mm_add_ps(a, b)) }
    );
}

/// The 8 lanes of `v` reduced by `op` in a fixed order: halves, then pairs, then the last two.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn fold(v: __m256, op: impl Fn(__m128, __m128) -> __m128) -> f32 {
    let h = op(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let h = op(h, _mm_movehl_ps(h, h));
    _mm_cvtss_f32(op(h, _mm_shuffle_ps::<1>(h, h)))
}

/// # Safety
/// The CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn on_avx512<K: Kernel>(k: K) -> K::Out {
    k.run::<__m512>()
}

/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn on_avx2<K: Kernel>(k: K) -> K::Out {
    k.run::<__m256>()
}
