//! CPU backend: tiled FlashAttention forward and backward, both schedules, parallel with rayon.
//!
//! Tiles are gathered into contiguous f32 scratch (f16/bf16 widened a row at a time, so every
//! product accumulates in f32). Per (q tile, k/v tile): `S = scale·Q·Kᵀ` through the `gemm`
//! crate, then one fused pass over the tile ([`fused`]: softcap, ALiBi, mask, running max, exp,
//! row sum; in backward `P` and `dS`), then the `P·V` (backward: `dV`, `dP`, `dQ`, `dK`)
//! products. Tiles the mask cuts run as 32-row parts narrowed to their visible keys
//! ([`visible_parts`]). With a block mask the loops visit only its listed blocks ([`sparse`]).
//! The fused passes run on the ISA path [`simd::Isa`] chose at run time.
//!
//! **Tile size, per path.** `TILE = 128` rows and columns on all three paths, because what sizes
//! it is L2, not the vector width: a task's q, k, v and accumulator tiles plus the score tile
//! take `(4·TILE·d + TILE²)·4` bytes, 192 KiB at d = 64 and 320 KiB at d = 128, inside one core's
//! L2 (512 KiB on Zen 2/3, 1 MiB on Zen 4 and Skylake-SP, 2 MiB on Sapphire Rapids), while the
//! `gemm` micro-kernels stream their packed panels through L1 (32–48 KiB). The width sets only
//! how a score row sits in registers: 128 f32 = 512 B = 8 `zmm` (AVX-512) or 16 `ymm` (AVX2)
//! registers, 128 scalars on the portable path; the fused pass reads each row from L2 once and
//! its second sweep re-reads it from L1. A 32-row part's score block (16 KiB) stays in L1
//! between its GEMM and its pass. 128-row tiles measured ~30% faster than 64-row ones on the
//! 2-core dev machine (fewer, larger GEMM calls amortise packing and dispatch).

mod bwd_v1;
mod bwd_v2;
mod decode;
mod fused;
mod fwd_v1;
mod fwd_v2;
pub mod simd;
mod sparse;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Layout, Result, WithDType};
use half::{bf16, f16, slice::HalfFloatSliceExt};

use crate::dropout::DropoutMask;
use crate::mask::ScoreMods;
use crate::op::BackwardInputs;
use crate::params::AttnParams;
use crate::plan::InputLayout;
use crate::{stats, Algorithm};
use fused::{DsTile, ProbsTile, TileAt, TileBits};
use simd::gemm::{gemm, Op, Threads};
use simd::Isa;
use sparse::{Sparsity, Visit};

/// Rows per q tile and per k/v tile (see the module docs for the size).
pub const TILE: usize = 128;

/// Element types the kernels read and write; all arithmetic is f32.
pub trait Elem: WithDType + Default {
    /// `dst[i] = src[i]` widened to f32, one row at a time: f16 through F16C (`half`'s slice
    /// conversion, detected at run time), bf16 by a shift that vectorises; f32 a copy.
    fn widen(src: &[Self], dst: &mut [f32]);
    /// `dst[i] = src[i]` rounded to the element type (to nearest even), likewise per row.
    fn narrow(src: &[f32], dst: &mut [Self]);
}

impl Elem for f32 {
    fn widen(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
    fn narrow(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src)
    }
}

macro_rules! half_elem {
    ($t:ty) => {
        impl Elem for $t {
            fn widen(src: &[Self], dst: &mut [f32]) {
                src.convert_to_f32_slice(dst)
            }
            fn narrow(src: &[f32], dst: &mut [Self]) {
                dst.convert_from_f32_slice(src)
            }
        }
    };
}
half_elem!(f16);
half_elem!(bf16);

/// Calls the generic `$f::<T>(args)` with `T` the element type of `$dtype`.
macro_rules! by_dtype {
    ($dtype:expr, $f:ident($($arg:expr),*)) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F16 => $f::<f16>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
            d => bail!("flash_attn: the CPU backend takes f32, f16 or bf16, got {d:?}"),
        }
    };
}

/// Where row `t` of head `h` of sequence `s` starts in a strided `(.., heads, d)` buffer.
#[derive(Debug, Clone)]
pub struct RowView {
    seq_base: Vec<usize>,
    t_stride: usize,
    h_stride: usize,
}

impl RowView {
    /// View of a q-side (`is_q`) or k-side input as the launch plans see it.
    fn of_input(l: &InputLayout, p: &AttnParams, is_q: bool) -> Self {
        Self {
            seq_base: p
                .seqs
                .iter()
                .enumerate()
                .map(|(s, span)| l.seq_base(p, s, if is_q { span.q_start } else { span.k_start }))
                .collect(),
            t_stride: l.tok_stride(),
            h_stride: l.head_stride(),
        }
    }

    /// View of a contiguous `(tokens, heads, d)` buffer, as the op writes them.
    pub fn contiguous(p: &AttnParams, heads: usize, is_q: bool) -> Self {
        let row = heads * p.head_dim;
        Self {
            seq_base: p
                .seqs
                .iter()
                .map(|span| if is_q { span.q_start } else { span.k_start } * row)
                .collect(),
            t_stride: row,
            h_stride: p.head_dim,
        }
    }

    #[inline(always)]
    pub fn offset(&self, s: usize, t: usize, h: usize) -> usize {
        self.seq_base[s] + t * self.t_stride + h * self.h_stride
    }
}

/// A storage and its layout as the op receives them.
type Input<'a> = (&'a CpuStorage, &'a Layout);

/// The elements of `s` as `T`, or an error naming the operand.
fn elems<'a, T: WithDType>(name: &str, s: &'a CpuStorage) -> Result<&'a [T]> {
    match s.as_slice::<T>() {
        Ok(x) => Ok(x),
        Err(_) => bail!(
            "flash_attn: `{name}` is {:?}, expected {:?} like `q`",
            s.dtype(),
            T::DTYPE
        ),
    }
}

/// One tensor as the kernels read it: its elements and where each row starts.
pub struct Operand<'a, T> {
    data: &'a [T],
    rows: RowView,
}

impl<'a, T: Elem> Operand<'a, T> {
    /// An input (any strides, unit stride on head_dim); `is_q` for q's sequence starts.
    fn input(name: &str, (s, l): Input<'a>, p: &AttnParams, is_q: bool) -> Result<Self> {
        let layout = InputLayout::checked(name, l, p.head_dim)?;
        Ok(Self {
            data: elems(name, s)?,
            rows: RowView::of_input(&layout, p, is_q),
        })
    }

    /// A contiguous `(total_q, hq, d)` tensor from element `offset` on: the forward output or
    /// its gradient.
    fn q_like(name: &str, (s, offset): (&'a CpuStorage, usize), p: &AttnParams) -> Result<Self> {
        Ok(Self {
            data: &elems(name, s)?[offset..],
            rows: RowView::contiguous(p, p.heads_q, true),
        })
    }

    /// Reads `rows` rows (`t0..`) of head `h` of sequence `s` into contiguous f32.
    pub fn load(&self, (s, h, t0): (usize, usize, usize), rows: usize, d: usize, dst: &mut [f32]) {
        for r in 0..rows {
            let o = self.rows.offset(s, t0 + r, h);
            T::widen(&self.data[o..o + d], &mut dst[r * d..(r + 1) * d]);
        }
    }
}

/// The attention inputs q, k and v.
pub struct Operands<'a, T> {
    pub q: Operand<'a, T>,
    pub k: Operand<'a, T>,
    pub v: Operand<'a, T>,
}

impl<'a, T: Elem> Operands<'a, T> {
    fn new(p: &AttnParams, q: Input<'a>, k: Input<'a>, v: Input<'a>) -> Result<Self> {
        Ok(Self {
            q: Operand::input("q", q, p, true)?,
            k: Operand::input("k", k, p, false)?,
            v: Operand::input("v", v, p, false)?,
        })
    }

    /// Loads keys `j0..j0 + cols` of k/v head `hk` of sequence `s` into the `k` and `v` tiles.
    pub fn load_kv(&self, (s, hk, j0): (usize, usize, usize), cols: usize, d: usize, kv: KvTiles) {
        self.k.load((s, hk, j0), cols, d, kv.0);
        self.v.load((s, hk, j0), cols, d, kv.1);
    }
}

/// The k and v tile scratch (`TILE × d` each).
pub type KvTiles<'a> = (&'a mut [f32], &'a mut [f32]);

/// A raw output pointer shared by parallel tasks.
///
/// Invariant: every task writes a set of elements disjoint from every other task's (its own
/// (sequence, head, row-block)), and the buffer outlives the parallel section.
#[derive(Clone, Copy)]
pub struct SharedOut<T>(*mut T, usize);
// SAFETY: see the invariant above; tasks never write the same element.
unsafe impl<T: Send> Send for SharedOut<T> {}
unsafe impl<T: Send> Sync for SharedOut<T> {}

impl<T: Elem> SharedOut<T> {
    pub fn new(buf: &mut [T]) -> Self {
        Self(buf.as_mut_ptr(), buf.len())
    }

    /// Writes `rows` rows of f32 into head `h` of sequence `s`, converting to `T`.
    ///
    /// # Safety
    /// No other task may write these rows concurrently (the type's invariant).
    pub unsafe fn store_rows(
        &self,
        view: &RowView,
        (s, h, t0): (usize, usize, usize),
        rows: usize,
        d: usize,
        src: &[f32],
    ) {
        for r in 0..rows {
            let o = view.offset(s, t0 + r, h);
            assert!(o + d <= self.1);
            let row = std::slice::from_raw_parts_mut(self.0.add(o), d);
            T::narrow(&src[r * d..(r + 1) * d], row);
        }
    }

    /// The same buffer seen from element `base` on.
    pub fn offset(&self, base: usize) -> Self {
        assert!(base <= self.1);
        // SAFETY: in bounds by the assert.
        Self(unsafe { self.0.add(base) }, self.1 - base)
    }

    /// Reads rows back (f32 buffers only in practice: the dQ partials).
    ///
    /// # Safety
    /// No other task may write these rows concurrently.
    pub unsafe fn load_rows(
        &self,
        view: &RowView,
        (s, h, t0): (usize, usize, usize),
        rows: usize,
        d: usize,
        dst: &mut [f32],
    ) {
        for r in 0..rows {
            let o = view.offset(s, t0 + r, h);
            assert!(o + d <= self.1);
            let row = std::slice::from_raw_parts(self.0.add(o), d);
            T::widen(row, &mut dst[r * d..(r + 1) * d]);
        }
    }

    /// # Safety
    /// As for `store_rows`, for the single element `i`.
    pub unsafe fn write(&self, i: usize, x: T) {
        assert!(i < self.1);
        *self.0.add(i) = x;
    }
}

/// `s = scale·q·kᵀ` for a tile (`q: rows×d`, `k: cols×d`): the one GEMM before the fused pass.
pub fn qk_scores(q: &[f32], k: &[f32], at: TileAt, d: usize, scale: f32, s: &mut [f32]) {
    tile_gemm((at.rows, at.cols, d), Op::N(q), Op::T(k), s, (false, scale));
}

/// `c (+)= scale·a·b` on one task's tiles: single-threaded, as every task already has a core.
fn tile_gemm(mnk: (usize, usize, usize), a: Op, b: Op, c: &mut [f32], acc_scale: (bool, f32)) {
    gemm(mnk, a, b, c, acc_scale, Threads::One);
}

/// Forward dropout on a tile of weights: each row times its factors (`keep_scale` or 0,
/// regenerated from the seed); `factors` is one row of scratch.
pub fn drop_tile(mask: &DropoutMask, at: TileAt, s: &mut [f32], factors: &mut [f32]) {
    let cols = at.cols;
    for r in 0..at.rows {
        mask.row_factors(at.i0 + r, at.j0, &mut factors[..cols]);
        let row = &mut s[r * cols..(r + 1) * cols];
        fused::run(fused::Mul::Elems(row, &factors[..cols]));
    }
}

/// Forward on CPU: the output `(total_q, hq, d)` in the input dtype and the saved statistics
/// (f32, [`AttnParams::stats_len`]: V2 log-sum-exp; V1 `m` then `l`).
pub fn forward(p: &AttnParams, q: Input, k: Input, v: Input) -> Result<(CpuStorage, CpuStorage)> {
    fn run<T: Elem>(
        p: &AttnParams,
        q: Input,
        k: Input,
        v: Input,
    ) -> Result<(CpuStorage, CpuStorage)> {
        Isa::active()?;
        let ops = Operands::<T>::new(p, q, k, v)?;
        let mut out = vec![T::default(); p.out_len()];
        let stats = match p.algorithm {
            Algorithm::V2 if decode::applies(p) => decode::forward(p, &ops, &mut out),
            Algorithm::V2 => fwd_v2::forward(p, &ops, &mut out),
            Algorithm::V1 => fwd_v1::forward(p, &ops, &mut out),
        };
        Ok((T::to_cpu_storage_owned(out), CpuStorage::F32(stats)))
    }
    by_dtype!(q.0.dtype(), run(p, q, k, v))
}

/// What backward reads besides q, k, v, as the schedules take it: the forward output, its
/// gradient, the log-sum-exp (V1's `m ‖ l` already converted) and its gradient, if any.
pub struct BackwardOperands<'a, T> {
    pub o: Operand<'a, T>,
    pub d_o: Operand<'a, T>,
    pub lse: &'a [f32],
    pub dlse: Option<&'a [f32]>,
}

impl<T> BackwardOperands<'_, T> {
    /// The lse gradient of row `idx` (lse layout), 0 without one: the row term is `D − dlse`.
    pub fn dlse(&self, idx: usize) -> f32 {
        self.dlse.map_or(0.0, |g| g[idx])
    }
}

/// Backward on CPU: returns `dq ‖ dk ‖ dv` flattened into one buffer in the input dtype.
pub fn backward(
    p: &AttnParams,
    q: Input,
    k: Input,
    v: Input,
    bi: BackwardInputs<CpuStorage>,
) -> Result<CpuStorage> {
    by_dtype!(q.0.dtype(), backward_as(p, (q, k, v), bi))
}

fn backward_as<T: Elem>(
    p: &AttnParams,
    (q, k, v): (Input, Input, Input),
    bi: BackwardInputs<CpuStorage>,
) -> Result<CpuStorage> {
    Isa::active()?;
    let ops = Operands::<T>::new(p, q, k, v)?;
    let (stats, offset) = bi.stats;
    let lse = stats::lse_host(p, &elems::<f32>("statistics", stats)?[offset..]);
    let dlse = match bi.dlse {
        Some((s, off)) => Some(&elems::<f32>("lse gradient", s)?[off..]),
        None => None,
    };
    let saved = BackwardOperands {
        o: Operand::q_like("output", bi.out, p)?,
        d_o: Operand::q_like("output gradient", bi.grad_out, p)?,
        lse: &lse,
        dlse,
    };
    let (nq, nk) = (p.q_elems(), p.k_elems());
    let mut grads = vec![T::default(); nq + 2 * nk];
    let (dq, dkv) = grads.split_at_mut(nq);
    let sparsity = Sparsity::of(p);
    let step = KvTileStep::new(p, &ops, &saved, &sparsity, dkv.split_at_mut(nk));
    match p.algorithm {
        Algorithm::V2 => bwd_v2::backward(&step, dq),
        Algorithm::V1 => bwd_v1::backward(&step, dq),
    }
    Ok(T::to_cpu_storage_owned(grads))
}

/// Per-task scratch of the backward tile step.
pub struct BwdScratch {
    pub q: Vec<f32>,
    pub d_o: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub p: Vec<f32>,
    pub p_drop: Vec<f32>,
    pub drop_factors: Vec<f32>,
    pub dp: Vec<f32>,
    pub cap_grad: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
    pub dq: Vec<f32>,
    pub lse: Vec<f32>,
    pub delta: Vec<f32>,
}

impl BwdScratch {
    pub fn new(d: usize) -> Self {
        use std::array::from_fn;
        // Row tiles (`TILE × d`), score tiles (`TILE × TILE`) and per-row terms.
        let [q, d_o, k, v, dk, dv, dq] = from_fn(|_| vec![0f32; TILE * d]);
        let [p, p_drop, drop_factors, dp, cap_grad] = from_fn(|_| vec![0f32; TILE * TILE]);
        let [lse, delta] = from_fn(|_| vec![0f32; TILE]);
        Self {
            q,
            d_o,
            k,
            v,
            p,
            p_drop,
            drop_factors,
            dp,
            cap_grad,
            dk,
            dv,
            dq,
            lse,
            delta,
        }
    }
}

/// Every (sequence, head) pair for `heads` heads, sequence-major: the tasks of the per-head passes.
pub fn seq_heads(p: &AttnParams, heads: usize) -> Vec<(usize, usize)> {
    (0..p.batch())
        .flat_map(|s| (0..heads).map(move |h| (s, h)))
        .collect()
}

/// The k/v-tile step both backward schedules share (FlashAttention Algorithm 4 lines 6–24,
/// FlashAttention-2 Algorithm 2 lines 5–18), and what they read: they differ only in where
/// `delta` and dQ live.
pub struct KvTileStep<'a, T> {
    p: &'a AttnParams,
    ops: &'a Operands<'a, T>,
    saved: &'a BackwardOperands<'a, T>,
    sparsity: &'a Sparsity<'a>,
    k_view: RowView,
    dk: SharedOut<T>,
    dv: SharedOut<T>,
}

impl<'a, T: Elem> KvTileStep<'a, T> {
    pub fn new(
        p: &'a AttnParams,
        ops: &'a Operands<'a, T>,
        saved: &'a BackwardOperands<'a, T>,
        sparsity: &'a Sparsity<'a>,
        (dk, dv): (&mut [T], &mut [T]),
    ) -> Self {
        let k_view = RowView::contiguous(p, p.heads_k, false);
        let (dk, dv) = (SharedOut::new(dk), SharedOut::new(dv));
        Self {
            p,
            ops,
            saved,
            sparsity,
            k_view,
            dk,
            dv,
        }
    }

    /// Loads k/v tile `(s, hk, j0..j0 + cols)`, zeroes its dK and dV, and for every q tile each
    /// head of group `hk` visits loads the q and dO rows and the lse, then calls
    /// `q_tile(h, (i0, rows), sc, tile)`, which fills `delta`, brings in dQ, runs `tile`
    /// ([`backward_tile`] on this tile pair) and puts dQ back; last it stores dK and dV.
    ///
    /// # Safety
    /// No other task writes this tile of dK and dV meanwhile.
    pub unsafe fn run(
        &self,
        (s, hk): (usize, usize),
        (j0, cols): (usize, usize),
        sc: &mut BwdScratch,
        mut q_tile: impl FnMut(usize, (usize, usize), &mut BwdScratch, &dyn Fn(&mut BwdScratch)),
    ) {
        let (p, d) = (self.p, self.p.head_dim);
        self.ops
            .load_kv((s, hk, j0), cols, d, (&mut sc.k, &mut sc.v));
        sc.dk[..cols * d].fill(0.0);
        sc.dv[..cols * d].fill(0.0);
        // GQA: every q head of the group adds into this k/v head's gradients.
        for h in hk * p.group()..(hk + 1) * p.group() {
            let mods = ScoreMods::new(p, s, h);
            for Visit {
                start: i0,
                len: rows,
                bits,
            } in self.sparsity.visits(&mods, (s, h), (j0, cols), true)
            {
                self.ops.q.load((s, h, i0), rows, d, &mut sc.q);
                self.saved.d_o.load((s, h, i0), rows, d, &mut sc.d_o);
                for r in 0..rows {
                    sc.lse[r] = self.saved.lse[p.lse_index(s, h, i0 + r)];
                }
                let at = ((i0, rows), (j0, cols));
                let tile =
                    |sc: &mut BwdScratch| backward_tile(p, &mods, (s, h), at.0, at.1, bits, sc);
                q_tile(h, (i0, rows), sc, &tile);
            }
        }
        // SAFETY: the caller's.
        unsafe {
            self.dk
                .store_rows(&self.k_view, (s, hk, j0), cols, d, &sc.dk);
            self.dv
                .store_rows(&self.k_view, (s, hk, j0), cols, d, &sc.dv);
        }
    }
}

/// One (q tile, k/v tile) step of the backward pass, shared by both schedules (FlashAttention
/// Algorithm 4 lines 11–21, FlashAttention-2 Algorithm 2 lines 10–15). Expects `q`, `d_o`, `k`,
/// `v`, `lse`, `delta` loaded; adds into `dq`, `dk`, `dv`, one [`visible_parts`] part at a time.
/// `bits`: the tile's partial block mask, if any.
pub fn backward_tile(
    p: &AttnParams,
    mods: &ScoreMods,
    (seq, head): (usize, usize),
    (i0, rows): (usize, usize),
    (j0, cols): (usize, usize),
    bits: Option<TileBits>,
    sc: &mut BwdScratch,
) {
    let drop_mask = p.dropout_mask(seq, head);
    for part in visible_parts(mods, TileAt { i0, j0, rows, cols }, bits) {
        let bits = bits.map(|b| b.from(part.r0, part.c0));
        backward_part(p, mods, drop_mask.as_ref(), (part, bits), sc);
    }
}

/// [`backward_tile`] on one part: rows `r0..` and columns `c0..` of the loaded tiles.
fn backward_part(
    p: &AttnParams,
    mods: &ScoreMods,
    drop_mask: Option<&DropoutMask>,
    (Part { at, r0, c0 }, bits): (Part, Option<TileBits>),
    sc: &mut BwdScratch,
) {
    let d = p.head_dim;
    let TileAt { i0, j0, rows, cols } = at;
    let n = rows * cols;
    let (q, d_o) = (&sc.q[r0 * d..], &sc.d_o[r0 * d..]);
    let (k, v) = (&sc.k[c0 * d..], &sc.v[c0 * d..]);
    qk_scores(q, k, at, d, mods.scale, &mut sc.p[..n]);
    fused::run(ProbsTile {
        s: &mut sc.p[..n],
        at,
        mods,
        lse: &sc.lse[r0..r0 + rows],
        cap_grad: mods.softcap.map(|_| &mut sc.cap_grad[..n]),
        bits,
    });
    // Dropout: dV and dP see the kept, rescaled probabilities (the mask regenerated from the seed).
    if let Some(m) = drop_mask {
        for r in 0..rows {
            m.row_factors(i0 + r, j0, &mut sc.drop_factors[r * cols..(r + 1) * cols]);
        }
        sc.p_drop[..n].copy_from_slice(&sc.p[..n]);
        fused::run(fused::Mul::Elems(
            &mut sc.p_drop[..n],
            &sc.drop_factors[..n],
        ));
    }
    let p_used = if drop_mask.is_some() {
        &sc.p_drop[..n]
    } else {
        &sc.p[..n]
    };
    let (dv, dk) = (&mut sc.dv[c0 * d..], &mut sc.dk[c0 * d..]);
    tile_gemm((cols, d, rows), Op::T(p_used), Op::N(d_o), dv, (true, 1.0));
    tile_gemm(
        (rows, cols, d),
        Op::N(d_o),
        Op::T(v),
        &mut sc.dp[..n],
        (false, 1.0),
    );
    fused::run(DsTile {
        p: &sc.p[..n],
        dp: &mut sc.dp[..n],
        rows,
        cols,
        delta: &sc.delta[r0..r0 + rows],
        drop: drop_mask.map(|_| &sc.drop_factors[..n]),
        cap_grad: mods.softcap.map(|_| &sc.cap_grad[..n]),
    });
    // dQ += scale·dS·K and dK += scale·dSᵀ·Q (Algorithm 2 lines 15–16).
    let ds = &sc.dp[..n];
    let dq = &mut sc.dq[r0 * d..];
    tile_gemm((rows, d, cols), Op::N(ds), Op::N(k), dq, (true, p.scale));
    tile_gemm((cols, d, rows), Op::T(ds), Op::N(q), dk, (true, p.scale));
}

/// Rows per part of a tile the mask cuts (the causal diagonal, window edges): each part's GEMMs
/// cover only the columns some of its rows see, so a diagonal 128×128 tile costs
/// (1 + 2 + 3 + 4)/16 = 62.5% of a full one. 32 rows keep the parts' GEMMs efficient (several
/// micro-kernel row blocks each) while cutting the masked work of a diagonal tile from 50% to 19%.
const STRIP: usize = 32;

/// A part of a tile: where it sits (`at`, absolute) and its row and column offsets in the tile.
#[derive(Clone, Copy)]
pub struct Part {
    pub at: TileAt,
    pub r0: usize,
    pub c0: usize,
}

/// The parts of tile `at` that hold visible scores: the whole tile when nothing in it is masked,
/// else strips of [`STRIP`] rows narrowed to the keys their rows see (a strip that sees none is
/// left out). Each row is in exactly one part, which holds every key of the tile the row sees.
/// A partial block's `bits` narrow the strips further, to the columns their bits hold (the
/// diagonal blocks of a causal or windowed mask then cost what the options' diagonal costs).
pub fn visible_parts<'a>(
    mods: &'a ScoreMods,
    at: TileAt,
    bits: Option<TileBits<'a>>,
) -> impl Iterator<Item = Part> + 'a {
    let full =
        bits.is_none() && mods.tile_fully_visible(at.i0, at.i0 + at.rows, at.j0, at.j0 + at.cols);
    let step = if full { at.rows } else { STRIP };
    (0..at.rows).step_by(step.max(1)).filter_map(move |r0| {
        let r1 = (r0 + step).min(at.rows);
        let (lo, hi) = mods.key_range_rows(at.i0 + r0, at.i0 + r1);
        let clip = |x: usize| x.clamp(at.j0, at.j0 + at.cols) - at.j0;
        let (mut c0, mut c1) = (clip(lo), clip(hi));
        if let Some(b) = bits {
            let (a, z) = b.col_span(r0..r1, at.cols);
            (c0, c1) = (c0.max(a), c1.min(z));
        }
        (c0 < c1).then(|| Part {
            at: TileAt {
                i0: at.i0 + r0,
                j0: at.j0 + c0,
                rows: r1 - r0,
                cols: c1 - c0,
            },
            r0,
            c0,
        })
    })
}

/// `delta_i = rowsum(dO_i ∘ O_i)` for `rows` rows already loaded (FlashAttention-2 Algorithm 2
/// line 4; FlashAttention Algorithm 4 line 19).
pub fn row_deltas(d_o: &[f32], o: &[f32], rows: usize, d: usize, out: &mut [f32]) {
    for r in 0..rows {
        out[r] = fused::run(fused::Dot(&d_o[r * d..(r + 1) * d], &o[r * d..(r + 1) * d]));
    }
}
