//! Fused elementwise passes of the training step, with backward: bias + GELU (tanh form) after
//! the MLP's first matmul, and bias (+ residual) after the other projections.
//!
//! Candle builds these from single-threaded passes that each allocate their output: bias and
//! residual are two broadcast adds, and GELU's backward is about ten elementwise ops. Here each
//! direction is one pass on the CPU in f32, parallel over row blocks: forward writes the output
//! only, backward recomputes the pre-activation from the op's inputs (nothing extra is saved) and
//! writes its gradient once. The bias gradient is a column sum over a row-block count fixed by
//! the shape, summed in order, so it does not depend on the thread count. Other dtypes and
//! devices take the composed Candle ops: [`gelu_tanh_composed`] and [`bias_residual_composed`],
//! also the tests' reference.

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage,
    Tensor, D,
};
use rayon::prelude::*;
use std::ops::Range;

/// Rows per parallel task: about 32K elements, whole rows.
fn block_rows(n: usize) -> usize {
    (32 * 1024 / n.max(1)).max(1)
}

/// `sqrt(2/π)` and the cubic coefficient of the tanh approximation (Hendrycks & Gimpel, 2016).
const K0: f32 = 0.797_884_6;
const K1: f32 = 0.044_715;

/// `(1 + tanh s) / 2 = σ(2s)` at `s = K0·(u + K1·u³)`, through flash-ops' branch-free `exp`: libm's
/// `tanhf` is a call per element (the step's GELU spent ~4% of its time there), this vectorises.
#[inline(always)]
fn half_one_plus_tanh(u: f32) -> f32 {
    1.0 / (1.0 + exp(-2.0 * K0 * (u + K1 * u * u * u)))
}

/// `0.5·u·(1 + tanh s) = u·σ(2s)`.
#[inline(always)]
fn gelu(u: f32) -> f32 {
    u * half_one_plus_tanh(u)
}

/// d gelu / du `= σ + 2u·σ(1 − σ)·K0·(1 + 3·K1·u²)`, as `(1 − tanh² s)/2 = 2σ(1 − σ)`.
#[inline(always)]
fn gelu_grad(u: f32) -> f32 {
    let h = half_one_plus_tanh(u);
    h + 2.0 * u * h * (1.0 - h) * K0 * (1.0 + 3.0 * K1 * u * u)
}

use flash_ops::simd::exp;

/// Whether the fast path applies: every tensor contiguous f32 on the CPU, x's last dimension n,
/// the bias `(n)` and the others x's shape.
fn fast(x: &Tensor, bias: Option<&Tensor>, same: &[&Tensor]) -> bool {
    let n = x.dims().last().copied().unwrap_or(0);
    let ok = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous();
    ok(x)
        && n > 0
        && bias.is_none_or(|b| ok(b) && b.dims() == [n])
        && same.iter().all(|t| ok(t) && t.shape() == x.shape())
}

/// The contiguous f32 elements of one CPU operand.
fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => bail!("fused elementwise: `{what}` must be contiguous"),
    }
}

/// `f(out_row, range)` for every row of `len / n` (`range`: the row's elements), in parallel
/// over row blocks. `f` zips the row's slices, so its loop vectorises; it is compiled for
/// AVX2+FMA where the CPU has them.
fn map_rows<F: Fn(&mut [f32], Range<usize>) + Sync>(len: usize, n: usize, f: F) -> Vec<f32> {
    let mut out = vec![0f32; len];
    let block = block_rows(n) * n;
    out.par_chunks_mut(block)
        .enumerate()
        .for_each(|(bi, o)| rows_block(o, bi * block, n, &f));
    out
}

/// One block of [`map_rows`], starting at element `base`.
fn rows_block<F: Fn(&mut [f32], Range<usize>)>(o: &mut [f32], base: usize, n: usize, f: &F) {
    #[inline(always)]
    fn inner<F: Fn(&mut [f32], Range<usize>)>(o: &mut [f32], base: usize, n: usize, f: &F) {
        for (r, row) in o.chunks_mut(n).enumerate() {
            let i0 = base + r * n;
            f(row, i0..i0 + n);
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<F: Fn(&mut [f32], Range<usize>)>(o: &mut [f32], b: usize, n: usize, f: &F) {
            inner(o, b, n, f)
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were detected at run time just above.
            return unsafe { avx2(o, base, n, f) };
        }
    }
    inner(o, base, n, f)
}

/// `o[j] = f(a[j])` over one row.
#[inline(always)]
fn zip1(o: &mut [f32], a: &[f32], f: impl Fn(f32) -> f32) {
    o.iter_mut().zip(a).for_each(|(o, &a)| *o = f(a));
}

/// `o[j] = f(a[j], b[j])` over one row.
#[inline(always)]
fn zip2(o: &mut [f32], a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) {
    o.iter_mut()
        .zip(a.iter().zip(b))
        .for_each(|(o, (&a, &b))| *o = f(a, b));
}

/// `o[j] = f(a[j], b[j], c[j])` over one row.
#[inline(always)]
fn zip3(o: &mut [f32], a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32) {
    o.iter_mut()
        .zip(a.iter().zip(b).zip(c))
        .for_each(|(o, ((&a, &b), &c))| *o = f(a, b, c));
}

/// Column sums of a contiguous `(rows, n)` f32 slice, in f64 per row block, blocks summed in order.
fn col_sum_slice(g: &[f32], n: usize) -> Vec<f32> {
    let block = block_rows(n) * n;
    let partials: Vec<Vec<f64>> = g
        .par_chunks(block)
        .map(|rows| {
            let mut acc = vec![0f64; n];
            for row in rows.chunks_exact(n) {
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += v as f64;
                }
            }
            acc
        })
        .collect();
    let mut total = vec![0f64; n];
    for p in &partials {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total.into_iter().map(|v| v as f32).collect()
}

/// `f` of the host f32 elements of tensors that passed [`fast`] (contiguous f32 on the CPU).
fn with_slices<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> Result<R>) -> Result<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let slices = guards
        .iter()
        .map(|(s, l)| match &**s {
            Storage::Cpu(s) => slice(s, l, "operand"),
            _ => bail!("fused elementwise: expected a cpu tensor"),
        })
        .collect::<Result<Vec<_>>>()?;
    f(&slices)
}

/// The bias gradient: `g` summed over every dimension but the last.
fn col_sum(g: &Tensor) -> Result<Tensor> {
    let n = g.dim(D::Minus1)?;
    if !fast(g, None, &[]) {
        return g.reshape(((), n))?.sum(0);
    }
    let sums = with_slices(&[g], |s| Ok(col_sum_slice(s[0], n)))?;
    Tensor::from_vec(sums, n, g.device())
}

/// The fused passes, by their operands: `x`, then the bias `(n)`, then the residual.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fused {
    /// `gelu_tanh(x)`.
    Gelu,
    /// `gelu_tanh(x + bias)`.
    BiasGelu,
    /// `x + bias`.
    Bias,
    /// `x + bias + residual`.
    BiasResidual,
}

impl Fused {
    fn name(self) -> &'static str {
        match self {
            Self::Gelu => "fused-gelu-tanh",
            Self::BiasGelu => "fused-bias-gelu-tanh",
            Self::Bias => "fused-bias-add",
            Self::BiasResidual => "fused-bias-residual-add",
        }
    }

    /// The forward pass over host slices; `n` is the last dimension.
    fn forward(self, a: &[&[f32]], n: usize) -> Vec<f32> {
        let (x, len) = (a[0], a[0].len());
        match self {
            Self::Gelu => map_rows(len, n, |o, r| zip1(o, &x[r], gelu)),
            Self::BiasGelu => map_rows(len, n, |o, r| zip2(o, &x[r], a[1], |x, b| gelu(x + b))),
            Self::Bias => map_rows(len, n, |o, r| zip2(o, &x[r], a[1], |x, b| x + b)),
            Self::BiasResidual => map_rows(len, n, |o, r| {
                zip3(o, &x[r.clone()], a[1], &a[2][r], |x, b, s| x + b + s)
            }),
        }
    }

    fn cpu(self, args: &[(&CpuStorage, &Layout)]) -> Result<(CpuStorage, Shape)> {
        let (_, l) = args[0];
        let n = l.dims().last().copied().unwrap_or(1);
        let a = args
            .iter()
            .map(|(s, l)| slice(s, l, "operand"))
            .collect::<Result<Vec<_>>>()?;
        Ok((CpuStorage::F32(self.forward(&a, n)), l.shape().clone()))
    }

    /// Gradients of the operands `args` for `dy`. GELU's derivative is taken at `x (+ bias)`,
    /// recomputed here; the adds hand `dy` on without a copy.
    fn backward(self, args: &[&Tensor], dy: &Tensor) -> Result<Vec<Tensor>> {
        let x = args[0];
        let dy = dy.contiguous()?;
        let n = x.dim(D::Minus1)?;
        Ok(match self {
            Self::Gelu | Self::BiasGelu => {
                let du = with_slices(&[x, &dy, args.get(1).copied().unwrap_or(x)], |s| {
                    let (x, dy, b) = (s[0], s[1], s[2]);
                    let len = x.len();
                    Ok(match self {
                        Self::Gelu => map_rows(len, n, |o, r| {
                            zip2(o, &x[r.clone()], &dy[r], |x, g| g * gelu_grad(x))
                        }),
                        _ => map_rows(len, n, |o, r| {
                            zip3(o, &x[r.clone()], b, &dy[r], |x, b, g| g * gelu_grad(x + b))
                        }),
                    })
                })?;
                let du = Tensor::from_vec(du, x.shape(), x.device())?;
                match self {
                    Self::Gelu => vec![du],
                    _ => vec![du.clone(), col_sum(&du)?],
                }
            }
            Self::Bias => vec![dy.clone(), col_sum(&dy)?],
            Self::BiasResidual => vec![dy.clone(), col_sum(&dy)?, dy.clone()],
        })
    }
}

// One-line signatures: `S` is the CPU storage, `L` its layout.
type S = CpuStorage;
type L = Layout;

impl CustomOp1 for Fused {
    fn name(&self) -> &'static str {
        Fused::name(*self)
    }

    fn cpu_fwd(&self, s1: &S, l1: &L) -> Result<(S, Shape)> {
        self.cpu(&[(s1, l1)])
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(self.backward(&[x], dy)?.into_iter().next())
    }
}

impl CustomOp2 for Fused {
    fn name(&self) -> &'static str {
        Fused::name(*self)
    }

    fn cpu_fwd(&self, s1: &S, l1: &L, s2: &S, l2: &L) -> Result<(S, Shape)> {
        self.cpu(&[(s1, l1), (s2, l2)])
    }

    fn bwd(&self, x: &Tensor, b: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Grads2> {
        let mut g = self.backward(&[x, b], dy)?.into_iter();
        Ok((g.next(), g.next()))
    }
}

impl CustomOp3 for Fused {
    fn name(&self) -> &'static str {
        Fused::name(*self)
    }

    fn cpu_fwd(&self, s1: &S, l1: &L, s2: &S, l2: &L, s3: &S, l3: &L) -> Result<(S, Shape)> {
        self.cpu(&[(s1, l1), (s2, l2), (s3, l3)])
    }

    fn bwd(&self, x: &Tensor, b: &Tensor, r: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Grads3> {
        let mut g = self.backward(&[x, b, r], dy)?.into_iter();
        Ok((g.next(), g.next(), g.next()))
    }
}

type Grads2 = (Option<Tensor>, Option<Tensor>);
type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// GELU, tanh form (GPT-2's `gelu_new`), of `x + bias` (bias over the last dimension).
pub fn gelu_tanh(x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    if !fast(x, bias, &[]) {
        return gelu_tanh_composed(x, bias);
    }
    match bias {
        Some(b) => x.apply_op2(b, Fused::BiasGelu),
        None => x.apply_op1(Fused::Gelu),
    }
}

/// [`gelu_tanh`] from Candle's differentiable ops (any dtype and device).
pub fn gelu_tanh_composed(x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        Some(b) => x.broadcast_add(b)?.gelu(),
        None => x.gelu(),
    }
}

/// `x + bias (+ residual)`, bias over the last dimension, residual of x's shape.
pub fn bias_residual(x: &Tensor, bias: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
    let r = residual.map(Tensor::contiguous).transpose()?;
    if !fast(x, Some(bias), r.as_ref().as_slice()) {
        return bias_residual_composed(x, bias, residual);
    }
    match &r {
        Some(r) => x.apply_op3(bias, r, Fused::BiasResidual),
        None => x.apply_op2(bias, Fused::Bias),
    }
}

/// [`bias_residual`] from Candle's differentiable ops (any dtype and device).
pub fn bias_residual_composed(
    x: &Tensor,
    bias: &Tensor,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let y = x.broadcast_add(bias)?;
    match residual {
        Some(r) => y + r,
        None => Ok(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;
    use flash_test_support::{rel_err, Rng};

    /// Random inputs of a few shapes (rows not a multiple of the block, a single column, a wide
    /// row): the fused op in f32 against the composed ops in f64 on the same values, output and
    /// the gradient of every input of `sum(y ⊙ r)` for a random `r`. Input 1 is the bias `(n)`,
    /// the others have the full shape.
    fn check(
        name: &str,
        inputs: usize,
        fused: impl Fn(&[Tensor]) -> Result<Tensor>,
        composed: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<()> {
        let mut rng = Rng::new(11);
        for shape in [vec![3usize, 7, 33], vec![1000, 1], vec![5, 4099]] {
            let n = *shape.last().unwrap();
            let vals = (0..inputs)
                .map(|k| {
                    let s = if k == 1 { vec![n] } else { shape.clone() };
                    rng.normal_tensor(&s, 1.5, DType::F32)
                })
                .collect::<Result<Vec<_>>>()?;
            let r = rng.normal_tensor(&shape, 1.0, DType::F32)?;
            let run = |f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
                       dt: DType|
             -> Result<(Tensor, Vec<Tensor>)> {
                let vars = vals
                    .iter()
                    .map(|v| Var::from_tensor(&v.to_dtype(dt)?))
                    .collect::<Result<Vec<_>>>()?;
                let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
                let y = f(&ts)?;
                let g = (&y * r.to_dtype(dt)?)?.sum_all()?.backward()?;
                let grads = vars.iter().map(|v| g.get(v).cloned().expect("gradient"));
                Ok((y, grads.collect()))
            };
            let (yf, gf) = run(&fused, DType::F32)?;
            let (yc, gc) = run(&composed, DType::F64)?;
            assert_eq!(yf.dtype(), DType::F32);
            let e = rel_err(&yf, &yc);
            assert!(e < 1e-6, "{name} {shape:?}: output rel err {e}");
            for (k, (a, b)) in gf.iter().zip(&gc).enumerate() {
                assert_eq!(a.dims(), b.dims(), "{name}: gradient {k} shape");
                let e = rel_err(a, b);
                assert!(
                    e < 1e-5,
                    "{name} {shape:?}: gradient of input {k} rel err {e}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn bias_gelu_matches_composed() -> Result<()> {
        check(
            "bias+gelu",
            2,
            |t| gelu_tanh(&t[0], Some(&t[1])),
            |t| gelu_tanh_composed(&t[0], Some(&t[1])),
        )
    }

    #[test]
    fn gelu_matches_composed() -> Result<()> {
        check(
            "gelu",
            1,
            |t| gelu_tanh(&t[0], None),
            |t| gelu_tanh_composed(&t[0], None),
        )
    }

    #[test]
    fn bias_residual_matches_composed() -> Result<()> {
        check(
            "bias+residual",
            3,
            |t| bias_residual(&t[0], &t[1], Some(&t[2])),
            |t| bias_residual_composed(&t[0], &t[1], Some(&t[2])),
        )
    }

    #[test]
    fn bias_matches_composed() -> Result<()> {
        check(
            "bias",
            2,
            |t| bias_residual(&t[0], &t[1], None),
            |t| bias_residual_composed(&t[0], &t[1], None),
        )
    }

    /// The f32 CPU inputs above take the fused ops (else the tests would compare the composed
    /// ops with themselves); other dtypes and strided inputs do not.
    #[test]
    fn fast_path_taken() -> Result<()> {
        let mut rng = Rng::new(3);
        let x = rng.normal_tensor(&[4, 8], 1.0, DType::F32)?;
        let b = rng.normal_tensor(&[8], 1.0, DType::F32)?;
        assert!(fast(&x, Some(&b), &[&x]));
        assert!(!fast(&x.to_dtype(DType::F64)?, Some(&b), &[]));
        assert!(!fast(&x.t()?, None, &[]));
        assert!(!fast(&x, Some(&x), &[]));
        Ok(())
    }
}
