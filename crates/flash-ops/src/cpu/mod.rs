//! CPU backend: tiled FlashAttention forward and backward, both schedules, parallel with rayon.
//!
//! Tiles are gathered into contiguous f32 scratch (converting f16/bf16 on the way, so every
//! product accumulates in f32) and multiplied with the `gemm` crate's blocked kernels. A task's
//! q, k, v and accumulator tiles plus the score tile take `(4·TILE·d + TILE²)·4` bytes: 192 KiB
//! at d = 64 and 320 KiB at d = 128, inside a current x86 core's L2 (512 KiB–2 MiB), while the
//! `gemm` micro-kernels stream through L1. 128-row tiles measured ~30% faster than 64-row ones
//! on the 2-core dev machine (fewer, larger GEMM calls amortise packing and dispatch).

mod bwd_v1;
mod bwd_v2;
mod fwd_v1;
mod fwd_v2;
pub mod tile;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Layout, Result, WithDType};
use half::{bf16, f16};

use crate::mask::ScoreMods;
use crate::op::BackwardInputs;
use crate::params::AttnParams;
use crate::plan::InputLayout;
use crate::{stats, Algorithm};

/// Rows per q tile and per k/v tile (see the module docs for the size).
pub const TILE: usize = 128;

/// Element types the kernels read and write; all arithmetic is f32.
pub trait Elem: WithDType + Default {
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}

impl Elem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}

macro_rules! half_elem {
    ($t:ty) => {
        impl Elem for $t {
            fn to_f32(self) -> f32 {
                <$t>::to_f32(self)
            }
            fn from_f32(x: f32) -> Self {
                <$t>::from_f32(x)
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
            for (x, y) in dst[r * d..(r + 1) * d].iter_mut().zip(&self.data[o..o + d]) {
                *x = y.to_f32();
            }
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
}

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
            for c in 0..d {
                *self.0.add(o + c) = T::from_f32(src[r * d + c]);
            }
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
            for c in 0..d {
                dst[r * d + c] = (*self.0.add(o + c)).to_f32();
            }
        }
    }

    /// # Safety
    /// As for `store_rows`, for the single element `i`.
    pub unsafe fn write(&self, i: usize, x: T) {
        assert!(i < self.1);
        *self.0.add(i) = x;
    }
}

/// `s = scale·q·kᵀ`, then softcap, ALiBi and the mask (`-inf`) for rows `i0..`, keys `j0..`.
/// When `softcap_grad` is given it receives `d cap(x)/dx = 1 − tanh²` (0 where masked).
pub fn scores(
    q: &[f32],
    k: &[f32],
    (rows, cols, d): (usize, usize, usize),
    mods: &ScoreMods,
    (i0, j0): (usize, usize),
    s: &mut [f32],
    mut softcap_grad: Option<&mut [f32]>,
) {
    tile::gemm_abt((rows, cols, d), q, k, s, false, mods.scale);
    if !mods.has_modifiers() && mods.tile_fully_visible(i0, i0 + rows, j0, j0 + cols) {
        return;
    }
    for r in 0..rows {
        let i = i0 + r;
        let (lo, hi) = mods.key_range(i);
        let row = &mut s[r * cols..(r + 1) * cols];
        for (c, x) in row.iter_mut().enumerate() {
            let j = j0 + c;
            let visible = j >= lo && j < hi;
            if let Some(g) = softcap_grad.as_deref_mut() {
                g[r * cols + c] = match (visible, mods.softcap) {
                    (true, Some(cap)) => {
                        let t = (*x / cap).tanh();
                        1.0 - t * t
                    }
                    _ => 0.0,
                };
            }
            *x = if visible {
                mods.modify(*x, i, j)
            } else {
                f32::NEG_INFINITY
            };
        }
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
        let ops = Operands::<T>::new(p, q, k, v)?;
        let mut out = vec![T::default(); p.out_len()];
        let stats = match p.algorithm {
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
    fn run<T: Elem>(
        p: &AttnParams,
        q: Input,
        k: Input,
        v: Input,
        bi: BackwardInputs<CpuStorage>,
    ) -> Result<CpuStorage> {
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
        let (dk, dv) = dkv.split_at_mut(nk);
        let g = GradOutputs { dq, dk, dv };
        match p.algorithm {
            Algorithm::V2 => bwd_v2::backward(p, &ops, &saved, g),
            Algorithm::V1 => bwd_v1::backward(p, &ops, &saved, g),
        }
        Ok(T::to_cpu_storage_owned(grads))
    }
    by_dtype!(q.0.dtype(), run(p, q, k, v, bi))
}

/// The gradient buffers, contiguous `(tokens, heads, d)` each.
pub struct GradOutputs<'a, T> {
    pub dq: &'a mut [T],
    pub dk: &'a mut [T],
    pub dv: &'a mut [T],
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
        let z = |n: usize| vec![0f32; n];
        Self {
            q: z(TILE * d),
            d_o: z(TILE * d),
            k: z(TILE * d),
            v: z(TILE * d),
            p: z(TILE * TILE),
            p_drop: z(TILE * TILE),
            drop_factors: z(TILE * TILE),
            dp: z(TILE * TILE),
            cap_grad: z(TILE * TILE),
            dk: z(TILE * d),
            dv: z(TILE * d),
            dq: z(TILE * d),
            lse: z(TILE),
            delta: z(TILE),
        }
    }
}

/// One (q tile, k/v tile) step of the backward pass, shared by both schedules (FlashAttention
/// Algorithm 4 lines 11–21, FlashAttention-2 Algorithm 2 lines 10–15). Expects `q`, `d_o`, `k`,
/// `v`, `lse`, `delta` loaded; adds into `dq`, `dk`, `dv`.
pub fn backward_tile(
    p: &AttnParams,
    mods: &ScoreMods,
    (seq, head): (usize, usize),
    (i0, rows): (usize, usize),
    (j0, cols): (usize, usize),
    sc: &mut BwdScratch,
) {
    let d = p.head_dim;
    let n = rows * cols;
    let cap = mods.softcap.map(|_| &mut sc.cap_grad[..n]);
    scores(
        &sc.q,
        &sc.k,
        (rows, cols, d),
        mods,
        (i0, j0),
        &mut sc.p[..n],
        cap,
    );
    for r in 0..rows {
        tile::probs_from_lse(&mut sc.p[r * cols..(r + 1) * cols], sc.lse[r]);
    }
    // Dropout: dV and dP see the kept, rescaled probabilities (the mask regenerated from the seed).
    let drop_mask = p.dropout_mask(seq, head);
    if let Some(m) = &drop_mask {
        for r in 0..rows {
            m.row_factors(i0 + r, j0, &mut sc.drop_factors[r * cols..(r + 1) * cols]);
        }
        sc.p_drop[..n].copy_from_slice(&sc.p[..n]);
        tile::mul_assign(&mut sc.p_drop[..n], &sc.drop_factors[..n]);
    }
    let p_used = if drop_mask.is_some() {
        &sc.p_drop[..n]
    } else {
        &sc.p[..n]
    };
    tile::gemm_atb((cols, d, rows), p_used, &sc.d_o, &mut sc.dv, true, 1.0);
    tile::gemm_abt((rows, cols, d), &sc.d_o, &sc.v, &mut sc.dp[..n], false, 1.0);
    if drop_mask.is_some() {
        tile::mul_assign(&mut sc.dp[..n], &sc.drop_factors[..n]);
    }
    for r in 0..rows {
        tile::softmax_grad_row(
            &sc.p[r * cols..(r + 1) * cols],
            &mut sc.dp[r * cols..(r + 1) * cols],
            sc.delta[r],
        );
    }
    if mods.softcap.is_some() {
        tile::mul_assign(&mut sc.dp[..n], &sc.cap_grad[..n]);
    }
    tile::gemm_ab(
        (rows, d, cols),
        &sc.dp[..n],
        &sc.k,
        &mut sc.dq,
        true,
        p.scale,
    );
    tile::gemm_atb(
        (cols, d, rows),
        &sc.dp[..n],
        &sc.q,
        &mut sc.dk,
        true,
        p.scale,
    );
}

/// `delta_i = rowsum(dO_i ∘ O_i)` for `rows` rows already loaded (FlashAttention-2 Algorithm 2
/// line 4; FlashAttention Algorithm 4 line 19).
pub fn row_deltas(d_o: &[f32], o: &[f32], rows: usize, d: usize, out: &mut [f32]) {
    for r in 0..rows {
        out[r] = tile::dot(&d_o[r * d..(r + 1) * d], &o[r * d..(r + 1) * d]);
    }
}
