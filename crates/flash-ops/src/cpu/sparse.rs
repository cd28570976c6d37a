//! Which tiles the loops visit. Without a block mask: the [`TILE`] grid, clipped to the rows or
//! keys the options' rule lets through (today's block skipping). With one: tiles lie inside
//! mask blocks (a block is cut into `TILE`-row chunks, so any allowed block size works and no
//! tile straddles two blocks), and a tile visits only the listed blocks — the row lists for the
//! query-outer loop (V2 forward), the transposed lists for the key-outer ones (V1 forward, both
//! backwards) — intersected with the same clipping. A full block's tiles carry no bits, so they
//! take the unmasked fast path; a partial block's carry its bitmask to the fused passes.

use super::fused::TileBits;
use super::TILE;
use crate::block_mask::{BlockLists, FULL};
use crate::mask::ScoreMods;
use crate::params::AttnParams;

/// A tile of the other side: `start..start + len`, with its partial block's bits.
#[derive(Clone, Copy)]
pub struct Visit<'a> {
    pub start: usize,
    pub len: usize,
    pub bits: Option<TileBits<'a>>,
}

/// `a..z` in chunks of at most [`TILE`]: `(start, len)`.
fn chunks(a: usize, z: usize) -> impl Iterator<Item = (usize, usize)> {
    (a..z).step_by(TILE).map(move |t| (t, TILE.min(z - t)))
}

/// The block mask of a call, as the tile loops read it.
#[derive(Clone, Copy)]
pub struct Sparsity<'a>(Option<BlockLists<'a>>);

impl<'a> Sparsity<'a> {
    pub fn of(p: &'a AttnParams) -> Self {
        Self(p.block_mask.as_ref().map(|m| m.lists()))
    }

    /// The tiles of `len` query rows (`q`) or keys, for the loops that own them.
    pub fn tiles(&self, len: usize, q: bool) -> Vec<(usize, usize)> {
        let block = match self.0 {
            Some(l) if q => l.block.0,
            Some(l) => l.block.1,
            None => TILE,
        };
        (0..len)
            .step_by(block)
            .flat_map(|b0| chunks(b0, (b0 + block).min(len)))
            .collect()
    }

    /// The tiles of the other side that `tile` (`(start, len)` of query rows, or with
    /// `transposed` of keys) of (sequence, query head) meets, ascending: clipped to what the
    /// options' rule lets through, and with a mask to the listed blocks (the row lists, or
    /// with `transposed` the transposed ones).
    pub fn visits(
        &self,
        mods: &ScoreMods,
        (s, h): (usize, usize),
        (own0, n): (usize, usize),
        transposed: bool,
    ) -> Vec<Visit<'a>> {
        let (lo, hi) = if transposed {
            mods.query_range_keys(own0, own0 + n)
        } else {
            mods.key_range_rows(own0, own0 + n)
        };
        let Some(l) = self.0 else {
            let all = chunks(lo, hi).map(|(start, len)| Visit {
                start,
                len,
                bits: None,
            });
            return all.collect();
        };
        let (own, other) = if transposed {
            (l.block.1, l.block.0)
        } else {
            l.block
        };
        let ob = own0 / own;
        let idx = if transposed {
            l.col(s, h, ob)
        } else {
            l.row(s, h, ob)
        };
        let (all_bits, words): (&'a [u32], usize) = (l.bits, l.block.0 * l.words_per_row);
        let mut out = Vec::new();
        for (b, id) in l.listed(transposed, idx) {
            for (start, len) in chunks((b * other).max(lo), ((b + 1) * other).min(hi)) {
                let (in_own, in_other) = (own0 - ob * own, start - b * other);
                let (row0, col0) = if transposed {
                    (in_other, in_own)
                } else {
                    (in_own, in_other)
                };
                let bits = (id != FULL).then(|| TileBits {
                    words: &all_bits[id as usize * words..(id as usize + 1) * words],
                    wpr: l.words_per_row,
                    row0,
                    col0,
                });
                out.push(Visit { start, len, bits });
            }
        }
        out
    }
}
