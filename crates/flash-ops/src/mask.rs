//! Which keys a query sees, and how a raw score is modified (softcap, ALiBi), for one
//! (sequence, head). One definition, used by the CPU kernels, block skipping and the reference.

use crate::params::{AttnParams, SeqSpan};

/// Score modifiers and visibility of one (sequence, query head).
#[derive(Debug, Clone, Copy)]
pub struct ScoreMods {
    /// Softmax scale, applied to `q·kᵀ` before the modifiers below.
    pub scale: f32,
    pub softcap: Option<f32>,
    pub alibi_slope: Option<f32>,
    pub window_left: Option<usize>,
    pub window_right: Option<usize>,
    /// `k_len - q_len`: the bottom-right alignment of the causal/window diagonal.
    pub diag: i64,
    pub q_len: usize,
    pub k_len: usize,
}

impl ScoreMods {
    pub fn new(p: &AttnParams, seq: usize, head_q: usize) -> Self {
        let span: SeqSpan = p.seqs[seq];
        Self {
            scale: p.scale,
            softcap: p.softcap,
            alibi_slope: p.alibi_slope(seq, head_q),
            window_left: p.window_left,
            window_right: p.window_right,
            diag: span.diag_offset(),
            q_len: span.q_len,
            k_len: span.k_len,
        }
    }

    /// Visible keys `[lo, hi)` of query row `i` (empty when `lo >= hi`).
    pub fn key_range(&self, i: usize) -> (usize, usize) {
        let centre = i as i64 + self.diag;
        let lo = match self.window_left {
            Some(l) => (centre - l as i64).max(0),
            None => 0,
        };
        let hi = match self.window_right {
            Some(r) => (centre + r as i64 + 1).min(self.k_len as i64),
            None => self.k_len as i64,
        };
        (lo.min(self.k_len as i64) as usize, hi.max(0) as usize)
    }

    /// Keys visible to at least one row of `[i0, i1)`: both bounds grow with `i`.
    pub fn key_range_rows(&self, i0: usize, i1: usize) -> (usize, usize) {
        let (lo, _) = self.key_range(i0);
        let (_, hi) = self.key_range(i1 - 1);
        (lo, hi)
    }

    /// Query rows that see at least one key of `[j0, j1)`.
    pub fn query_range_keys(&self, j0: usize, j1: usize) -> (usize, usize) {
        if j0 >= self.k_len {
            return (0, 0);
        }
        let j1 = j1.min(self.k_len);
        let q_len = self.q_len as i64;
        // Row i sees [i + diag - wl, i + diag + wr]; it meets [j0, j1) iff
        // i + diag + wr >= j0 and i + diag - wl < j1.
        let lo = match self.window_right {
            Some(r) => (j0 as i64 - self.diag - r as i64).max(0),
            None => 0,
        };
        let hi = match self.window_left {
            Some(l) => (j1 as i64 - self.diag + l as i64).min(q_len),
            None => q_len,
        };
        (lo.min(q_len) as usize, hi.max(0) as usize)
    }

    /// True when every (row, key) pair of the tile is visible, so the mask can be skipped.
    pub fn tile_fully_visible(&self, i0: usize, i1: usize, j0: usize, j1: usize) -> bool {
        let (lo_last, _) = self.key_range(i1 - 1);
        let (_, hi_first) = self.key_range(i0);
        lo_last <= j0 && hi_first >= j1
    }

    /// Modifies an already scaled score: softcap first, then ALiBi (FlashAttention-2's order).
    #[inline(always)]
    pub fn modify(&self, s: f32, i: usize, j: usize) -> f32 {
        let s = match self.softcap {
            Some(c) => c * (s / c).tanh(),
            None => s,
        };
        match self.alibi_slope {
            Some(slope) => s - slope * (i as i64 + self.diag - j as i64).abs() as f32,
            None => s,
        }
    }

    pub fn has_modifiers(&self) -> bool {
        self.softcap.is_some() || self.alibi_slope.is_some()
    }
}
