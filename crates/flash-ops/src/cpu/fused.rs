//! The fused passes over a hot score tile, written once over [`Simd`] and run on the path
//! [`Isa::current`] chose. After `S = scale·Q·Kᵀ` (one GEMM), a single pass per tile applies
//! softcap, ALiBi and the mask, takes the running max, then exponentiates and sums each row while
//! it is still in registers/L1 (a 128-column row is 512 B: 8 `zmm` or 16 `ymm` registers); no
//! separate elementwise sweep over the tile is left. Backward recomputes `P` the same way and
//! forms `dS = P ∘ (dP·drop − D) ∘ cap′` in one pass.

use super::simd::vector::{exp, get, put, tanh};
use super::simd::{Isa, Kernel, Simd};
use crate::mask::ScoreMods;

/// `for c in (0..cols).step_by(W)` with `n` the lanes of this step (`W` except at the tail).
macro_rules! for_vecs {
    ($v:ty, $cols:expr, |$c:ident, $n:ident| $body:block) => {{
        let cols = $cols;
        let mut $c = 0;
        while $c < cols {
            let $n = (cols - $c).min(<$v>::W);
            $body
            $c += <$v>::W;
        }
    }};
}

/// A partial block's bitmask under a tile (see `crate::block_mask`): the block's words, `wpr`
/// per block row, and the block row and column of the tile's row 0 and column 0.
#[derive(Clone, Copy)]
pub struct TileBits<'a> {
    pub words: &'a [u32],
    pub wpr: usize,
    pub row0: usize,
    pub col0: usize,
}

impl<'a> TileBits<'a> {
    /// The same bits seen from row `r0`, column `c0` of the tile (a part of it).
    pub fn from(self, r0: usize, c0: usize) -> Self {
        Self {
            row0: self.row0 + r0,
            col0: self.col0 + c0,
            ..self
        }
    }

    /// The columns `[first, last + 1)` of `0..cols` that some row of `rows` has a bit set in
    /// (an empty span, `first >= last + 1`, when none has).
    pub fn col_span(&self, rows: std::ops::Range<usize>, cols: usize) -> (usize, usize) {
        let (mut first, mut end) = (cols, 0);
        for r in rows {
            let row = self.row(r);
            let mut c = 0;
            while c < cols {
                // Columns c..c + 32 of the tile, those past `cols` cleared.
                let n = (cols - c).min(32);
                let word = row.lanes(c) & (u32::MAX >> (32 - n));
                if word != 0 {
                    first = first.min(c + word.trailing_zeros() as usize);
                    end = end.max(c + 32 - word.leading_zeros() as usize);
                }
                c += 32;
            }
        }
        (first, end)
    }

    /// Row `r`'s words and the bit of column 0.
    fn row(&self, r: usize) -> RowBits<'a> {
        let o = (self.row0 + r) * self.wpr;
        RowBits(&self.words[o..o + self.wpr], self.col0)
    }
}

/// One block row's words and the bit position of tile column 0.
#[derive(Clone, Copy)]
struct RowBits<'a>(&'a [u32], usize);

impl RowBits<'_> {
    /// Bits of columns `c..c + 32` in the low bits (0 past the row).
    #[inline(always)]
    fn lanes(&self, c: usize) -> u32 {
        let pos = self.1 + c;
        let (w, sh) = (pos / 32, pos % 32);
        let word = |k: usize| self.0.get(k).copied().unwrap_or(0) as u64;
        ((word(w) | word(w + 1) << 32) >> sh) as u32
    }
}

/// What the pass applies to one score row: visible keys `[lo, hi)` in tile columns, a partial
/// block's bits, and the modifiers (softcap first, then ALiBi, as [`ScoreMods::modify`]).
struct RowRule<'a> {
    lo: usize,
    hi: usize,
    bits: Option<RowBits<'a>>,
    /// `i + diag − j0`: ALiBi's distance of column `c` is `|centre − c|` (exact in f32 below 2²⁴).
    centre: f32,
    cap: Option<f32>,
    slope: Option<f32>,
}

impl<'a> RowRule<'a> {
    fn new(
        mods: &ScoreMods,
        (i, r): (usize, usize),
        at: TileAt,
        bits: Option<TileBits<'a>>,
    ) -> Self {
        let (lo, hi) = mods.key_range(i);
        let (j0, cols) = (at.j0, at.cols);
        Self {
            lo: lo.saturating_sub(j0).min(cols),
            hi: hi.saturating_sub(j0).min(cols),
            bits: bits.map(|b| b.row(r)),
            centre: (i as i64 + mods.diag - j0 as i64) as f32,
            cap: mods.softcap,
            slope: mods.alibi_slope,
        }
    }

    /// Nothing to apply to a row of `cols` columns.
    fn plain(&self, cols: usize) -> bool {
        self.cap.is_none()
            && self.slope.is_none()
            && self.bits.is_none()
            && self.lo == 0
            && self.hi >= cols
    }

    /// Lanes `c..c + W` modified (`-inf` where masked, including lanes past `hi`) and the
    /// softcap's derivative `1 − tanh²` (0 where masked).
    #[inline(always)]
    unsafe fn apply<V: Simd>(&self, x: V, c: usize) -> (V, V) {
        let (mut x, mut g) = (x, V::splat(1.0));
        if let Some(cap) = self.cap {
            let t = tanh(x.div(V::splat(cap)));
            g = V::splat(1.0).sub(t.mul(t));
            x = t.mul(V::splat(cap));
        }
        let j = V::splat(c as f32).add(V::iota());
        if let Some(slope) = self.slope {
            let dist = V::splat(self.centre).sub(j).abs();
            x = x.sub(V::splat(slope).mul(dist));
        }
        if c < self.lo || c + V::W > self.hi {
            let (lo, hi) = (V::splat(self.lo as f32), V::splat(self.hi as f32));
            let ninf = V::splat(f32::NEG_INFINITY);
            x = j.lt_select(lo, ninf, j.lt_select(hi, x, ninf));
            g = j.lt_select(lo, V::splat(0.0), j.lt_select(hi, g, V::splat(0.0)));
        }
        // A partial block: one more select, by the block's bits.
        if let Some(bits) = self.bits {
            let keep = bits.lanes(c);
            x = V::bit_select(keep, x, V::splat(f32::NEG_INFINITY));
            g = V::bit_select(keep, g, V::splat(0.0));
        }
        (x, g)
    }
}

/// Where a tile sits: rows from `i0`, columns from `j0`, `rows × cols`.
#[derive(Clone, Copy)]
pub struct TileAt {
    pub i0: usize,
    pub j0: usize,
    pub rows: usize,
    pub cols: usize,
}

/// Forward (FlashAttention-2 Algorithm 1 lines 8–10): `s` holds `scale·Q·Kᵀ`; each row becomes
/// `exp(s̃ − m_new)` of its modified, masked scores, `m`/`l` the running max and sum, and the
/// accumulator row (`acc`, `d` wide) is rescaled by `exp(m − m_new)`. A row with nothing visible
/// yet keeps `m = -inf` and becomes zeros.
pub struct SoftmaxTile<'a> {
    pub s: &'a mut [f32],
    pub at: TileAt,
    pub mods: &'a ScoreMods,
    pub m: &'a mut [f32],
    pub l: &'a mut [f32],
    pub acc: Option<(&'a mut [f32], usize)>,
    /// A partial block's bits (`None`: a full block, or no block mask).
    pub bits: Option<TileBits<'a>>,
}

impl Kernel for SoftmaxTile<'_> {
    type Out = ();
    #[inline(always)]
    unsafe fn run<V: Simd>(self) {
        let SoftmaxTile {
            s,
            at,
            mods,
            m,
            l,
            mut acc,
            bits,
        } = self;
        let TileAt { i0, rows, cols, .. } = at;
        let ninf = f32::NEG_INFINITY;
        for r in 0..rows {
            let rule = RowRule::new(mods, (i0 + r, r), at, bits);
            let row = &mut s[r * cols..(r + 1) * cols];
            let mut vmax = V::splat(ninf);
            if rule.plain(cols) {
                for_vecs!(V, cols, |c, n| {
                    vmax = vmax.max(get::<V>(row, c, n, ninf));
                });
            } else {
                for_vecs!(V, cols, |c, n| {
                    let (x, _) = rule.apply(get::<V>(row, c, n, ninf), c);
                    vmax = vmax.max(x);
                    put(row, c, n, x);
                });
            }
            let m_old = m[r];
            let m_new = m_old.max(vmax.hmax());
            if m_new == ninf {
                row.fill(0.0);
                continue;
            }
            let (mv, mut vsum) = (V::splat(m_new), V::splat(0.0));
            for_vecs!(V, cols, |c, n| {
                let p = exp(get::<V>(row, c, n, ninf).sub(mv));
                vsum = vsum.add(p);
                put(row, c, n, p);
            });
            let corr = exp::<f32>(m_old - m_new);
            m[r] = m_new;
            l[r] = l[r] * corr + vsum.hsum();
            if let Some((acc, d)) = acc.as_mut() {
                if corr != 1.0 {
                    scale_row::<V>(&mut acc[r * *d..(r + 1) * *d], corr);
                }
            }
        }
    }
}

/// Backward (FlashAttention-2 Algorithm 2 line 11): `s` holds `scale·Q·Kᵀ` and becomes
/// `P = exp(s̃ − lse)`; `cap_grad` (given with a softcap) receives `1 − tanh²` (0 where masked).
/// A row with `lse = -inf` saw no key: zeros.
pub struct ProbsTile<'a> {
    pub s: &'a mut [f32],
    pub at: TileAt,
    pub mods: &'a ScoreMods,
    pub lse: &'a [f32],
    pub cap_grad: Option<&'a mut [f32]>,
    /// As in [`SoftmaxTile`].
    pub bits: Option<TileBits<'a>>,
}

impl Kernel for ProbsTile<'_> {
    type Out = ();
    #[inline(always)]
    unsafe fn run<V: Simd>(mut self) {
        let TileAt { i0, rows, cols, .. } = self.at;
        let ninf = f32::NEG_INFINITY;
        for r in 0..rows {
            let rule = RowRule::new(self.mods, (i0 + r, r), self.at, self.bits);
            let row = &mut self.s[r * cols..(r + 1) * cols];
            let mut grad = self
                .cap_grad
                .as_deref_mut()
                .map(|g| &mut g[r * cols..(r + 1) * cols]);
            let lse = self.lse[r];
            if lse == ninf {
                row.fill(0.0);
                if let Some(g) = grad {
                    g.fill(0.0);
                }
                continue;
            }
            let lv = V::splat(lse);
            let plain = rule.plain(cols);
            for_vecs!(V, cols, |c, n| {
                let mut x = get::<V>(row, c, n, ninf);
                if !plain {
                    let (y, g) = rule.apply(x, c);
                    x = y;
                    if let Some(gr) = grad.as_deref_mut() {
                        put(gr, c, n, g);
                    }
                }
                put(row, c, n, exp(x.sub(lv)));
            });
        }
    }
}

/// `dS = P ∘ (dP ∘ drop − D) ∘ cap′` into `dp` (Algorithm 2 line 14, with dropout's factors
/// and the softcap's derivative when given).
pub struct DsTile<'a> {
    pub p: &'a [f32],
    pub dp: &'a mut [f32],
    pub rows: usize,
    pub cols: usize,
    pub delta: &'a [f32],
    pub drop: Option<&'a [f32]>,
    pub cap_grad: Option<&'a [f32]>,
}

impl Kernel for DsTile<'_> {
    type Out = ();
    #[inline(always)]
    unsafe fn run<V: Simd>(self) {
        let cols = self.cols;
        for r in 0..self.rows {
            let dv = V::splat(self.delta[r]);
            let o = r * cols;
            for_vecs!(V, cols, |c, n| {
                let mut dp = get::<V>(self.dp, o + c, n, 0.0);
                if let Some(f) = self.drop {
                    dp = dp.mul(get::<V>(f, o + c, n, 0.0));
                }
                let mut ds = get::<V>(self.p, o + c, n, 0.0).mul(dp.sub(dv));
                if let Some(g) = self.cap_grad {
                    ds = ds.mul(get::<V>(g, o + c, n, 0.0));
                }
                put(self.dp, o + c, n, ds);
            });
        }
    }
}

#[inline(always)]
unsafe fn scale_row<V: Simd>(x: &mut [f32], s: f32) {
    let sv = V::splat(s);
    for_vecs!(V, x.len(), |c, n| {
        put(x, c, n, get::<V>(x, c, n, 0.0).mul(sv));
    });
}

/// `dst[i] *= by` (`by` a scalar or a slice of the same length).
pub enum Mul<'a> {
    Scalar(&'a mut [f32], f32),
    Elems(&'a mut [f32], &'a [f32]),
}

impl Kernel for Mul<'_> {
    type Out = ();
    #[inline(always)]
    unsafe fn run<V: Simd>(self) {
        match self {
            Mul::Scalar(x, s) => scale_row::<V>(x, s),
            Mul::Elems(x, f) => for_vecs!(V, x.len(), |c, n| {
                put(x, c, n, get::<V>(x, c, n, 0.0).mul(get::<V>(f, c, n, 0.0)));
            }),
        }
    }
}

/// `Σ a[i]·b[i]`, in `W` lanes reduced in a fixed order.
pub struct Dot<'a>(pub &'a [f32], pub &'a [f32]);

impl Kernel for Dot<'_> {
    type Out = f32;
    #[inline(always)]
    unsafe fn run<V: Simd>(self) -> f32 {
        let mut acc = V::splat(0.0);
        for_vecs!(V, self.0.len().min(self.1.len()), |c, n| {
            acc = get::<V>(self.0, c, n, 0.0).mul_add(get::<V>(self.1, c, n, 0.0), acc);
        });
        acc.hsum()
    }
}

/// Runs a kernel on the chosen path.
#[inline]
pub(crate) fn run<K: Kernel>(k: K) -> K::Out {
    Isa::current().run(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A partial block's bits, at an unaligned column offset across a word boundary and with
    /// a ragged tail, mask exactly (P = 0, softcap derivative 0) on every path this CPU runs.
    #[test]
    fn partial_block_bits_mask_exactly_on_every_path() {
        let (rows, cols, cap, lse) = (5, 37, 4.0f32, 1.5f32);
        let mods = ScoreMods {
            scale: 1.0,
            softcap: Some(cap),
            alibi_slope: None,
            window_left: None,
            window_right: None,
            diag: 0,
            q_len: 64,
            k_len: 64,
        };
        // A 16 × 64 block (two words per row); the tile sits at block row 3, column 13.
        let words: Vec<u32> = (0..32u32)
            .map(|x| x.wrapping_mul(0x9E37_79B9) ^ 0x5A5A_0F0F)
            .collect();
        let bits = TileBits {
            words: &words,
            wpr: 2,
            row0: 3,
            col0: 13,
        };
        let s0: Vec<f32> = (0..rows * cols)
            .map(|x| ((x * 7919) % 97) as f32 / 25.0 - 2.0)
            .collect();
        let set = |r: usize, c: usize| words[(3 + r) * 2 + c / 32] >> (c % 32) & 1 == 1;
        // The column span of rows 1..3 of the tile, columns 0..cols, by brute force.
        let seen: Vec<usize> = (0..cols)
            .filter(|&c| (1..3).any(|r| set(r, 13 + c)))
            .collect();
        let want = (seen[0], seen[seen.len() - 1] + 1);
        assert_eq!(bits.col_span(1..3, cols), want);
        let empty = [0u32; 32];
        let none = TileBits {
            words: &empty,
            ..bits
        };
        assert!(matches!(none.col_span(0..5, cols), (a, z) if a >= z));
        for isa in Isa::ALL.into_iter().filter(|i| i.supported()) {
            let (mut s, mut g) = (s0.clone(), vec![9f32; rows * cols]);
            isa.run(ProbsTile {
                s: &mut s,
                at: TileAt {
                    i0: 0,
                    j0: 0,
                    rows,
                    cols,
                },
                mods: &mods,
                lse: &[lse; 5],
                cap_grad: Some(&mut g),
                bits: Some(bits),
            });
            for (e, (&p, &g)) in s.iter().zip(&g).enumerate() {
                let (r, c) = (e / cols, 13 + e % cols);
                let set = set(r, c);
                let x = s0[e] as f64 / cap as f64;
                let want = if set {
                    (cap as f64 * x.tanh() - lse as f64).exp()
                } else {
                    0.0
                };
                assert!(
                    (p as f64 - want).abs() <= 1e-6 * want,
                    "{isa:?} ({r}, {c}): {p} vs {want}"
                );
                assert_eq!(g == 0.0, !set, "{isa:?} softcap derivative at ({r}, {c})");
            }
        }
    }
}
