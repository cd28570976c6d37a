//! Fused linear + cross-entropy: the LM-head loss without the `(tokens × vocab)` logits.
//!
//! [`linear_cross_entropy`] takes the final hidden states `hidden (n, d)`, the output projection
//! `weight (v, d)` (GPT-2's tied `wte`, BERT's decoder), an optional `bias (v)` and `targets (n)`
//! (u32), and returns the mean cross-entropy over the counted rows (those whose target is not
//! [`CeOptions::ignore_index`]) as a scalar: the same value as
//! `cross_entropy(hidden·weightᵀ + bias, targets)`, differentiable in hidden, weight and bias.
//!
//! # Why
//! Unfused, a GPT-2 micro-batch of 8 × 128 tokens builds logits of (1024 × 50 257) f32 = 206 MB,
//! then its log-softmax and, in backward, the softmax and the logits' gradient: four fresh buffers
//! of that size per micro-batch, each faulted in page by page and unmapped again, so the step
//! spent most of its time in the kernel. Here the rows are processed `chunk_rows` at a time:
//! for each chunk the logits, the log-sum-exp, the loss, the logits' gradient and both products
//! of backward (`dhidden = dlogits·W`, `dW += dlogitsᵀ·hidden`) are done while the chunk's
//! logits sit in one reused buffer of `chunk_rows × v` f32 (≈ [`CHUNK_BYTES`] by default: 163 rows
//! of GPT-2's vocabulary, 32 MB). The memory the loss needs is that buffer plus the gradients
//! themselves (`n × d` and `v × d`, the size of the inputs).
//!
//! # Gradients in the forward pass
//! The loss is a scalar, so its gradients are fixed up to the upstream factor: they are computed
//! in the same pass as the loss (no logits are recomputed, three GEMMs in all) whenever one of the
//! inputs is part of an autograd graph ([`Tensor::track_op`]), kept in the graph node, and
//! backward only scales them by the upstream gradient. Detached inputs (evaluation) cost one GEMM
//! and give a loss that is not differentiable.
//!
//! # Definition
//! Per counted row with logits `z` (in f32, or f64 for f64 inputs), `lse = log Σⱼ exp zⱼ` and
//! smoothing `ε`: `loss = lse − (1−ε)·z_y − (ε/v)·Σⱼ zⱼ + λ·lse²` (PyTorch's label smoothing; the
//! z-loss of PaLM with weight `λ`), averaged over the counted rows. With no counted row the loss
//! is 0 and every gradient is zero (never NaN).
//!
//! # Backends
//! On the CPU, f32/bf16/f16 inputs take a fast path on the raw slices (the `gemm` crate, rows in
//! parallel); other devices and f64 use the same chunked schedule through Candle's ops, so the
//! logits never exist there either. Accumulation is f32 for f32/bf16/f16, gradients come back in
//! the inputs' dtypes, and the loss is f32 (f64 for f64 inputs). Bad input is a `candle::Error`
//! naming the argument.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Layout, Result, Shape, Storage, Tensor, D};
use rayon::prelude::*;

use crate::embedding::TiedGrad;

/// The default budget of one chunk's logits. Each chunk's `dW += dlogitsᵀ·hidden` reads and
/// writes all of `dW` (`v × d`) with an inner dimension of only `chunk_rows`: at 8 MB (41 rows)
/// a GPT-2-small-width step made 25 passes over its 154 MB `dW`; at 32 MB, 7 passes of a
/// 163-deep GEMM took ~30% less CPU time for that step (3 steps, user time 40/35 s → 27/25 s).
pub const CHUNK_BYTES: usize = 32 << 20;

/// Options of [`linear_cross_entropy`].
#[derive(Debug, Clone, PartialEq)]
pub struct CeOptions {
    /// Rows whose target is this id are not counted (no loss, no gradient).
    pub ignore_index: Option<u32>,
    /// Label smoothing `ε` in `[0, 1)`.
    pub label_smoothing: f64,
    /// Weight `λ ≥ 0` of the z-loss `λ·lse²`.
    pub z_loss: f64,
    /// Rows per chunk; `None` splits the rows evenly into chunks of at most `CHUNK_BYTES / (4·v)`.
    pub chunk_rows: Option<usize>,
}

impl Default for CeOptions {
    fn default() -> Self {
        Self {
            ignore_index: None,
            label_smoothing: 0.0,
            z_loss: 0.0,
            chunk_rows: None,
        }
    }
}

/// Mean cross-entropy of `hidden (n, d) · weight (v, d)ᵀ + bias (v)` against `targets (n)`
/// (u32), computed one chunk of rows at a time; see the module documentation.
pub fn linear_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    targets: &Tensor,
    opts: &CeOptions,
) -> Result<Tensor> {
    linear_cross_entropy_tied(hidden, weight, bias, targets, opts, None)
}

/// [`linear_cross_entropy`] whose `weight` is also the table of the embedding given `tied`
/// ([`crate::embedding`]): on the CPU fast path the weight's gradient is handed to that
/// embedding's node, which starts the table's gradient from it, instead of being returned to
/// autograd (which would zero-fill and add a table-sized buffer for it).
pub(crate) fn linear_cross_entropy_tied(
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    targets: &Tensor,
    opts: &CeOptions,
    tied: Option<&TiedGrad>,
) -> Result<Tensor> {
    let p = Problem::new(hidden, weight, bias, targets, opts)?;
    let need = Need {
        hidden: hidden.track_op(),
        weight: weight.track_op(),
        bias: bias.is_some_and(|b| b.track_op()),
    };
    let (h, w, b) = (hidden.detach(), weight.detach(), bias.map(Tensor::detach));
    let fast = h.device().is_cpu() && h.dtype() != DType::F64;
    let op = if fast {
        cpu_fused(&p, &h, &w, b.as_ref(), need, tied)?
    } else {
        chunked_ops(&p, &h, &w, b.as_ref(), need)?
    };
    if !(need.hidden || need.weight || need.bias) {
        return Ok(op.loss);
    }
    // The node's inputs are the caller's tensors, so autograd routes the saved gradients to them.
    hidden.apply_op3(weight, bias.unwrap_or(weight), op)
}

/// Which gradients are wanted.
#[derive(Debug, Clone, Copy)]
struct Need {
    hidden: bool,
    weight: bool,
    bias: bool,
}

/// The validated problem: sizes, targets on the host, row weights.
struct Problem {
    n: usize,
    d: usize,
    v: usize,
    chunk: usize,
    targets: Vec<u32>,
    /// `1/counted` for a counted row, 0 for an ignored one.
    row_weight: Vec<f64>,
    smoothing: f64,
    z_loss: f64,
}

impl Problem {
    fn new(
        hidden: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        targets: &Tensor,
        opts: &CeOptions,
    ) -> Result<Self> {
        const F: &str = "linear_cross_entropy";
        let (n, d) = match hidden.dims() {
            &[n, d] => (n, d),
            s => bail!("{F}: `hidden` must be (n, d), got shape {s:?}"),
        };
        let v = match weight.dims() {
            &[v, wd] if wd == d => v,
            s => {
                bail!("{F}: `weight` must be (v, d) with d = {d} (hidden's width), got shape {s:?}")
            }
        };
        if v == 0 {
            bail!(
                "{F}: `weight` has an empty vocabulary (shape {:?})",
                weight.dims()
            )
        }
        let dt = hidden.dtype();
        if !matches!(dt, DType::F32 | DType::F16 | DType::BF16 | DType::F64) {
            bail!("{F}: `hidden` dtype must be f32, f16, bf16 or f64, got {dt:?}")
        }
        if weight.dtype() != dt {
            bail!(
                "{F}: `weight` dtype {:?} differs from hidden's {dt:?}",
                weight.dtype()
            )
        }
        if let Some(b) = bias {
            if b.dims() != [v] {
                bail!(
                    "{F}: `bias` must be (v) with v = {v}, got shape {:?}",
                    b.dims()
                )
            }
            if b.dtype() != dt {
                bail!(
                    "{F}: `bias` dtype {:?} differs from hidden's {dt:?}",
                    b.dtype()
                )
            }
        }
        if targets.dims() != [n] {
            bail!(
                "{F}: `targets` must be (n) with n = {n}, got shape {:?}",
                targets.dims()
            )
        }
        if targets.dtype() != DType::U32 {
            bail!(
                "{F}: `targets` dtype must be u32, got {:?}",
                targets.dtype()
            )
        }
        for (name, t) in [("weight", weight), ("targets", targets)]
            .into_iter()
            .chain(bias.map(|b| ("bias", b)))
        {
            if !t.device().same_device(hidden.device()) {
                bail!(
                    "{F}: `{name}` is on {:?}, hidden on {:?}",
                    t.device(),
                    hidden.device()
                )
            }
        }
        let smoothing = opts.label_smoothing;
        if !(0.0..1.0).contains(&smoothing) {
            bail!("{F}: `label_smoothing` must be in [0, 1), got {smoothing}")
        }
        if !(opts.z_loss >= 0.0 && opts.z_loss.is_finite()) {
            bail!("{F}: `z_loss` must be finite and ≥ 0, got {}", opts.z_loss)
        }
        let chunk = match opts.chunk_rows {
            Some(0) => bail!("{F}: `chunk_rows` must be at least 1"),
            Some(c) => c,
            // As many chunks as the budget needs, of equal size: a thin last chunk would cost a
            // whole pass over `dW` for a few rows.
            None => n
                .max(1)
                .div_ceil(n.max(1).div_ceil((CHUNK_BYTES / (4 * v)).max(1))),
        }
        .min(n.max(1));
        let targets = targets.to_vec1::<u32>()?;
        let counted = |t: u32| Some(t) != opts.ignore_index;
        if let Some((i, &t)) = targets
            .iter()
            .enumerate()
            .find(|&(_, &t)| counted(t) && t as usize >= v)
        {
            bail!("{F}: `targets`[{i}] = {t} is not below the vocabulary size {v} (nor the ignore_index)")
        }
        let count = targets.iter().filter(|&&t| counted(t)).count();
        let w = if count == 0 { 0.0 } else { 1.0 / count as f64 };
        let row_weight = targets
            .iter()
            .map(|&t| if counted(t) { w } else { 0.0 })
            .collect();
        Ok(Self {
            n,
            d,
            v,
            chunk,
            targets,
            row_weight,
            smoothing,
            z_loss: opts.z_loss,
        })
    }

    /// The target of row `i` as an index (0 for an ignored row, whose weight is 0).
    fn target(&self, i: usize) -> usize {
        if self.row_weight[i] == 0.0 {
            0
        } else {
            self.targets[i] as usize
        }
    }
}

/// `t` as contiguous f32: itself when it already is, else a converted copy.
fn f32_contiguous(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::F32)?.contiguous()
}

/// The `len` f32 elements of a contiguous CPU tensor's storage.
fn cpu_slice<'a>(s: &'a Storage, l: &Layout, len: usize) -> Result<&'a [f32]> {
    let Storage::Cpu(s) = s else {
        bail!("linear_cross_entropy: expected a cpu tensor")
    };
    Ok(&s.as_slice::<f32>()?[l.start_offset()..][..len])
}

/// The CPU path: f32 slices, GEMMs through `gemm`, the softmax pass in parallel over rows.
fn cpu_fused(
    p: &Problem,
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    need: Need,
    tied: Option<&TiedGrad>,
) -> Result<SavedGrads> {
    let (n, d, v) = (p.n, p.d, p.v);
    // Borrowed in place for f32 inputs; bf16/f16 are converted to f32 once.
    let (h32, w32) = (f32_contiguous(hidden)?, f32_contiguous(weight)?);
    let b32 = bias.map(f32_contiguous).transpose()?;
    let (hs, hl) = h32.storage_and_layout();
    let (ws, wl) = w32.storage_and_layout();
    let bg = b32.as_ref().map(|b| b.storage_and_layout());
    let h = cpu_slice(&hs, hl, n * d)?;
    let w = cpu_slice(&ws, wl, v * d)?;
    let b = bg.as_ref().map(|(s, l)| cpu_slice(s, l, v)).transpose()?;
    let grads = need.hidden || need.weight || need.bias;
    let mut dh = vec![0f32; if need.hidden { n * d } else { 0 }];
    let mut dw = vec![0f32; if need.weight { v * d } else { 0 }];
    let mut db = vec![0f32; if need.bias { v } else { 0 }];
    let mut z = vec![0f32; p.chunk * v];
    let mut loss = 0f64;
    for r0 in (0..n).step_by(p.chunk) {
        let rows = p.chunk.min(n - r0);
        let hc = &h[r0 * d..(r0 + rows) * d];
        let z = &mut z[..rows * v];
        gemm::abt((rows, v, d), hc, w, z, false);
        loss += z
            .par_chunks_mut(v)
            .enumerate()
            .map(|(i, zr)| {
                let r = r0 + i;
                let row = RowCe {
                    target: p.target(r),
                    weight: p.row_weight[r] as f32,
                    smoothing: p.smoothing as f32,
                    z_loss: p.z_loss as f32,
                    grad: grads,
                };
                row_pass(zr, b, row)
            })
            .sum::<f64>();
        if need.hidden {
            gemm::ab((rows, d, v), z, w, &mut dh[r0 * d..(r0 + rows) * d], false);
        }
        if need.weight {
            gemm::atb((v, d, rows), z, hc, &mut dw, true);
        }
        if need.bias {
            for zr in z.chunks_exact(v) {
                db.iter_mut().zip(zr).for_each(|(a, &g)| *a += g);
            }
        }
    }
    let dev = hidden.device();
    let back = |g: Vec<f32>, shape: &[usize], like: &Tensor| {
        Tensor::from_vec(g, shape, dev)?.to_dtype(like.dtype())
    };
    let tied = tied.filter(|_| need.weight && weight.dtype() == DType::F32);
    let weight = match tied {
        Some(t) => {
            t.hand(dw);
            None
        }
        None => need.weight.then(|| back(dw, &[v, d], weight)).transpose()?,
    };
    Ok(SavedGrads {
        loss: Tensor::new(loss as f32, dev)?,
        hidden: need.hidden.then(|| back(dh, &[n, d], hidden)).transpose()?,
        weight,
        bias: match (need.bias, bias) {
            (true, Some(bt)) => Some(back(db, &[v], bt)?),
            _ => None,
        },
        tied: tied.cloned(),
    })
}

/// One row's parameters for [`row_pass`].
#[derive(Clone, Copy)]
struct RowCe {
    target: usize,
    weight: f32,
    smoothing: f32,
    z_loss: f32,
    grad: bool,
}

/// One row: adds the bias to the logits `z`, returns the row's weighted loss and, with `grad`,
/// overwrites `z` with the weighted gradient of the loss in the logits.
fn row_pass(z: &mut [f32], bias: Option<&[f32]>, row: RowCe) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(z: &mut [f32], bias: Option<&[f32]>, row: RowCe) -> f64 {
            row_pass_inner(z, bias, row)
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were detected at run time just above.
            return unsafe { avx2(z, bias, row) };
        }
    }
    row_pass_inner(z, bias, row)
}

#[inline(always)]
fn row_pass_inner(z: &mut [f32], bias: Option<&[f32]>, row: RowCe) -> f64 {
    if let Some(b) = bias {
        z.iter_mut().zip(b).for_each(|(x, &b)| *x += b);
    }
    if row.weight == 0.0 {
        if row.grad {
            z.fill(0.0);
        }
        return 0.0;
    }
    let v = z.len();
    let max = lanes(z, f32::NEG_INFINITY, |x| x, f32::max);
    let mut loss = -(1.0 - row.smoothing as f64) * z[row.target] as f64;
    if row.smoothing > 0.0 {
        let sum_z = lanes(z, 0.0, |x| x, |a, b| a + b);
        loss -= row.smoothing as f64 / v as f64 * sum_z as f64;
    }
    // With a gradient wanted, `exp(z − max)` is kept in `z`: the gradient pass then multiplies
    // instead of evaluating exp a second time (exp was most of this pass's time).
    let sum_exp = if row.grad {
        exp_in_place(z, max)
    } else {
        lanes(z, 0.0, |x| exp(x - max), |a, b| a + b)
    };
    let lse = max + sum_exp.ln();
    loss += lse as f64 + row.z_loss as f64 * (lse as f64) * (lse as f64);
    if row.grad {
        // d/dz of lse − (1−ε) z_y − ε/v Σ z + λ lse² = p (1 + 2λ lse) − (1−ε) 1[y] − ε/v,
        // with p = exp(z − max) / Σ exp(z − max).
        let a = row.weight * (1.0 + 2.0 * row.z_loss * lse) / sum_exp;
        let c = row.weight * row.smoothing / v as f32;
        z.iter_mut().for_each(|x| *x = a * *x - c);
        z[row.target] -= row.weight * (1.0 - row.smoothing);
    }
    loss * row.weight as f64
}

/// Overwrites `z` with `exp(z − max)` and returns its sum, in the eight lanes of [`lanes`].
#[inline(always)]
fn exp_in_place(z: &mut [f32], max: f32) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = z.chunks_exact_mut(8);
    for c in &mut chunks {
        for k in 0..8 {
            c[k] = exp(c[k] - max);
            acc[k] += c[k];
        }
    }
    let tail = chunks.into_remainder().iter_mut().fold(0.0, |a, x| {
        *x = exp(*x - max);
        a + *x
    });
    acc.into_iter().fold(tail, |a, b| a + b)
}

/// `reduce` of `map(x)` over `z`, in eight independent lanes: LLVM vectorises those, not an
/// ordered float reduction.
#[inline(always)]
fn lanes(z: &[f32], init: f32, map: impl Fn(f32) -> f32, reduce: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 8];
    let chunks = z.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .fold(init, |a, &x| reduce(a, map(x)));
    for c in chunks {
        for k in 0..8 {
            acc[k] = reduce(acc[k], map(c[k]));
        }
    }
    acc.into_iter().fold(tail, &reduce)
}

/// flash-ops' `exp` (Cephes' `expf` polynomial, ~2 ulp), branch-free so the row loops vectorise;
/// exactly 0 far below the largest logit.
use flash_ops::simd::exp;

/// GEMMs on contiguous row-major f32 slices, parallel over the rayon pool (flash-ops' wrapper).
mod gemm {
    use flash_ops::simd::gemm::{gemm, Op, Threads};

    /// `c (+)= a · bᵀ`, `a: m×k`, `b: n×k`.
    pub fn abt(mnk: (usize, usize, usize), a: &[f32], b: &[f32], c: &mut [f32], acc: bool) {
        gemm(mnk, Op::N(a), Op::T(b), c, (acc, 1.0), Threads::Pool)
    }

    /// `c (+)= a · b`, `a: m×k`, `b: k×n`.
    pub fn ab(mnk: (usize, usize, usize), a: &[f32], b: &[f32], c: &mut [f32], acc: bool) {
        gemm(mnk, Op::N(a), Op::N(b), c, (acc, 1.0), Threads::Pool)
    }

    /// `c (+)= aᵀ · b`, `a: k×m`, `b: k×n`.
    pub fn atb(mnk: (usize, usize, usize), a: &[f32], b: &[f32], c: &mut [f32], acc: bool) {
        gemm(mnk, Op::T(a), Op::N(b), c, (acc, 1.0), Threads::Pool)
    }
}

/// Other devices and f64: the same chunked schedule through Candle's ops.
fn chunked_ops(
    p: &Problem,
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    need: Need,
) -> Result<SavedGrads> {
    let dev = hidden.device();
    let cd = if hidden.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let h = hidden.to_dtype(cd)?;
    let w = weight.to_dtype(cd)?;
    let b = bias.map(|b| b.to_dtype(cd)).transpose()?;
    let (eps, lambda, v) = (p.smoothing, p.z_loss, p.v as f64);
    let grads = need.hidden || need.weight || need.bias;
    let mut loss = Tensor::zeros((), cd, dev)?;
    let mut dh = Vec::new();
    let mut dw: Option<Tensor> = None;
    let mut db: Option<Tensor> = None;
    for r0 in (0..p.n).step_by(p.chunk) {
        let rows = p.chunk.min(p.n - r0);
        let hc = h.narrow(0, r0, rows)?;
        let mut z = hc.matmul(&w.t()?)?;
        if let Some(b) = &b {
            z = z.broadcast_add(b)?;
        }
        let idx: Vec<u32> = (r0..r0 + rows).map(|r| p.target(r) as u32).collect();
        let idx = Tensor::from_vec(idx, (rows, 1), dev)?;
        let rw = Tensor::from_slice(&p.row_weight[r0..r0 + rows], (rows, 1), dev)?.to_dtype(cd)?;
        let max = z.max_keepdim(D::Minus1)?;
        let lse = (z
            .broadcast_sub(&max)?
            .exp()?
            .sum_keepdim(D::Minus1)?
            .log()?
            + &max)?;
        let mut l = (&lse - z.gather(&idx, D::Minus1)?.affine(1.0 - eps, 0.0)?)?;
        if eps > 0.0 {
            l = (l - z.sum_keepdim(D::Minus1)?.affine(eps / v, 0.0)?)?;
        }
        if lambda > 0.0 {
            l = (l + lse.sqr()?.affine(lambda, 0.0)?)?;
        }
        loss = (loss + (l * &rw)?.sum_all()?)?;
        if !grads {
            continue;
        }
        let p_scale = (lse.affine(2.0 * lambda, 1.0)? * &rw)?;
        let onehot = Tensor::zeros((rows, 1), cd, dev)?.affine(0.0, -(1.0 - eps))?;
        let dz = z
            .broadcast_sub(&lse)?
            .exp()?
            .broadcast_mul(&p_scale)?
            .broadcast_sub(&rw.affine(eps / v, 0.0)?)?
            .scatter_add(&idx, &onehot.broadcast_mul(&rw)?, D::Minus1)?;
        if need.hidden {
            dh.push(dz.matmul(&w)?);
        }
        if need.weight {
            let g = dz.t()?.matmul(&hc)?;
            dw = Some(match dw {
                Some(acc) => (acc + g)?,
                None => g,
            });
        }
        if need.bias {
            let g = dz.sum(0)?;
            db = Some(match db {
                Some(acc) => (acc + g)?,
                None => g,
            });
        }
    }
    let zeros = |shape: &[usize]| Tensor::zeros(shape, cd, dev);
    let (n, d) = (p.n, p.d);
    let loss = if cd == DType::F64 {
        loss
    } else {
        loss.to_dtype(DType::F32)?
    };
    Ok(SavedGrads {
        loss,
        hidden: if need.hidden {
            let g = if dh.is_empty() {
                zeros(&[n, d])?
            } else {
                Tensor::cat(&dh, 0)?
            };
            Some(g.to_dtype(hidden.dtype())?)
        } else {
            None
        },
        weight: match (need.weight, dw) {
            (true, Some(g)) => Some(g.to_dtype(weight.dtype())?),
            (true, None) => Some(zeros(&[p.v, d])?.to_dtype(weight.dtype())?),
            _ => None,
        },
        bias: match (need.bias, db, bias) {
            (true, Some(g), Some(bt)) => Some(g.to_dtype(bt.dtype())?),
            (true, None, Some(bt)) => Some(zeros(&[p.v])?.to_dtype(bt.dtype())?),
            _ => None,
        },
        tied: None,
    })
}

/// The loss and the gradients wanted (in the inputs' dtypes), and the graph node of a fused
/// loss: its forward hands out the loss computed beforehand, its backward the saved gradients
/// times the upstream gradient.
struct SavedGrads {
    loss: Tensor,
    hidden: Option<Tensor>,
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    /// Where the weight's gradient went instead of `weight` (f32, CPU).
    tied: Option<TiedGrad>,
}

impl SavedGrads {
    /// The loss handed out as the node's forward result, on the device `unpack` accepts.
    fn loss_on<S>(
        &self,
        device: &str,
        unpack: impl FnOnce(&Storage, &Layout) -> Option<Result<S>>,
    ) -> Result<(S, Shape)> {
        let (s, l) = self.loss.storage_and_layout();
        match unpack(&s, l) {
            Some(s) => Ok((s?, Shape::from(()))),
            None => bail!("linear_cross_entropy: the loss is not on the {device}"),
        }
    }

    fn scaled(g: &Option<Tensor>, grad_out: &Tensor) -> Result<Option<Tensor>> {
        // The usual upstream gradient is exactly 1 (a plain `loss.backward()`): on the CPU, where
        // reading it is free, the saved gradients are then handed out without a copy.
        if grad_out.device().is_cpu() && grad_out.to_dtype(DType::F64)?.to_scalar::<f64>()? == 1.0 {
            return Ok(g.clone());
        }
        g.as_ref()
            .map(|g| g.broadcast_mul(&grad_out.to_dtype(g.dtype())?))
            .transpose()
    }
}

/// The node's forward on one device: the loss computed beforehand, whatever the operands.
macro_rules! hand_back_loss {
    ($fwd:ident, $storage:ty, $variant:ident, $device:literal) => {
        fn $fwd(
            &self,
            _: &$storage,
            _: &Layout,
            _: &$storage,
            _: &Layout,
            _: &$storage,
            _: &Layout,
        ) -> Result<($storage, Shape)> {
            self.loss_on($device, |s, l| match s {
                Storage::$variant(s) => Some(s.try_clone(l)),
                _ => None,
            })
        }
    };
}

// A bias-free loss hands the weight in again as the third operand; its gradient slot is the
// (absent) bias gradient, so autograd adds nothing more to the weight.
impl candle_core::CustomOp3 for SavedGrads {
    fn name(&self) -> &'static str {
        "linear-cross-entropy"
    }

    hand_back_loss!(cpu_fwd, CpuStorage, Cpu, "cpu");
    #[cfg(feature = "cuda")]
    hand_back_loss!(cuda_fwd, candle_core::CudaStorage, Cuda, "cuda device");
    #[cfg(all(feature = "metal", target_os = "macos"))]
    hand_back_loss!(metal_fwd, candle_core::MetalStorage, Metal, "metal device");

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if let Some(t) = &self.tied {
            t.scale(grad_out.to_dtype(DType::F32)?.to_scalar::<f32>()?);
        }
        Ok((
            Self::scaled(&self.hidden, grad_out)?,
            Self::scaled(&self.weight, grad_out)?,
            Self::scaled(&self.bias, grad_out)?,
        ))
    }
}
