//! LayerNorm as one Candle custom op over `(x, weight, bias)`, with a backward pass.
//!
//! Forward is a single pass per row on the CPU (no intermediate tensors, so the autograd graph
//! keeps only the inputs). Backward recomputes the row statistics and applies the closed form
//! (Ba et al., 2016), with `x̂ = (x − μ)·r`, `r = 1/sqrt(σ² + ε)`, `g = dy ⊙ w`:
//! `dx = r·(g − mean(g) − x̂·mean(g ⊙ x̂))`, `dw = Σ_rows dy ⊙ x̂`, `db = Σ_rows dy`.
//! Statistics accumulate in f64; half-precision backward runs in f32.

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use half::{bf16, f16};

pub struct FusedLayerNorm {
    pub eps: f64,
}

fn forward_rows<T: Copy>(
    x: &[T],
    w: &[T],
    b: &[T],
    dim: usize,
    eps: f64,
    to: impl Fn(T) -> f64,
    from: impl Fn(f64) -> T,
) -> Vec<T> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(dim) {
        let mean = row.iter().map(|&v| to(v)).sum::<f64>() / dim as f64;
        let var = row.iter().map(|&v| (to(v) - mean).powi(2)).sum::<f64>() / dim as f64;
        let r = 1.0 / (var + eps).sqrt();
        out.extend(
            row.iter()
                .zip(w.iter().zip(b))
                .map(|(&v, (&wi, &bi))| from((to(v) - mean) * r * to(wi) + to(bi))),
        );
    }
    out
}

fn contiguous<'a, T>(s: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => bail!("fused layer norm: `{what}` must be contiguous"),
    }
}

impl CustomOp3 for FusedLayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dim = *l1.dims().last().unwrap_or(&0);
        if dim == 0 || l2.dims() != [dim] || l3.dims() != [dim] {
            bail!(
                "fused layer norm: x {:?} needs weight and bias of shape [{dim}], got {:?} {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            )
        }
        let eps = self.eps;
        macro_rules! run {
            ($x:expr, $w:expr, $b:expr, $to:expr, $from:expr) => {
                forward_rows(
                    contiguous($x, l1, "x")?,
                    contiguous($w, l2, "weight")?,
                    contiguous($b, l3, "bias")?,
                    dim,
                    eps,
                    $to,
                    $from,
                )
            };
        }
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => {
                CpuStorage::F32(run!(x, w, b, |v: f32| v as f64, |v| v as f32))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => {
                CpuStorage::F64(run!(x, w, b, |v: f64| v, |v| v))
            }
            (CpuStorage::F16(x), CpuStorage::F16(w), CpuStorage::F16(b)) => {
                CpuStorage::F16(run!(x, w, b, |v: f16| v.to_f64(), f16::from_f64))
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(w), CpuStorage::BF16(b)) => {
                CpuStorage::BF16(run!(x, w, b, |v: bf16| v.to_f64(), bf16::from_f64))
            }
            _ => bail!("fused layer norm: x, weight and bias must share a float dtype"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dtype = x.dtype();
        let cdt = match dtype {
            DType::F16 | DType::BF16 => DType::F32,
            d => d,
        };
        let dim = x.dim(D::Minus1)?;
        let rows = x.elem_count() / dim;
        let x = x.to_dtype(cdt)?.reshape((rows, dim))?;
        let dy = dy.to_dtype(cdt)?.reshape((rows, dim))?;
        let w = w.to_dtype(cdt)?;
        let mean = x.mean_keepdim(1)?;
        let centred = x.broadcast_sub(&mean)?;
        let r = (centred.sqr()?.mean_keepdim(1)? + self.eps)?
            .sqrt()?
            .recip()?;
        let xhat = centred.broadcast_mul(&r)?;
        let g = dy.broadcast_mul(&w)?;
        let dx = g
            .broadcast_sub(&g.mean_keepdim(1)?)?
            .sub(&xhat.broadcast_mul(&(&g * &xhat)?.mean_keepdim(1)?)?)?
            .broadcast_mul(&r)?;
        let dw = (&dy * &xhat)?.sum(0)?;
        let db = dy.sum(0)?;
        Ok((
            Some(dx.to_dtype(dtype)?.reshape(y.shape())?),
            Some(dw.to_dtype(dtype)?),
            Some(db.to_dtype(dtype)?),
        ))
    }
}
