//! LayerNorm as one Candle custom op over `(x, weight, bias)`, with a backward pass.
//!
//! Forward is a single pass per row on the CPU (no intermediate tensors, so the autograd graph
//! keeps only the inputs). Backward recomputes the row statistics and applies the closed form
//! (Ba et al., 2016), with `x̂ = (x − μ)·r`, `r = 1/sqrt(σ² + ε)`, `g = dy ⊙ w`:
//! `dx = r·(g − mean(g) − x̂·mean(g ⊙ x̂))`, `dw = Σ_rows dy ⊙ x̂`, `db = Σ_rows dy`.
//! Statistics accumulate in f64. Both directions run in parallel over blocks of rows; in f32 and
//! f64 backward is one pass too (`backward_cpu`, dx‖dw‖db in one buffer), with the `dw`
//! and `db` partials of each block (a count fixed by the shape) summed in order, so the bits do
//! not depend on the thread count. Half-precision backward runs in f32 Candle ops.

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, D};
use half::{bf16, f16};
use rayon::prelude::*;

pub struct FusedLayerNorm {
    pub eps: f64,
}

/// Rows per parallel task: about 16K elements, whole rows.
fn block_rows(dim: usize) -> usize {
    (16 * 1024 / dim.max(1)).max(1)
}

/// `(mean, 1/sqrt(var + eps))` of one row, in f64.
fn stats<T: Copy>(row: &[T], eps: f64, to: impl Fn(T) -> f64) -> (f64, f64) {
    let dim = row.len() as f64;
    let mean = row.iter().map(|&v| to(v)).sum::<f64>() / dim;
    let var = row.iter().map(|&v| (to(v) - mean).powi(2)).sum::<f64>() / dim;
    (mean, 1.0 / (var + eps).sqrt())
}

/// The element types; statistics are computed in f64.
trait Elem: Copy + Send + Sync + Default {}
impl<T: Copy + Send + Sync + Default> Elem for T {}

/// Conversions of an element type to and from f64.
#[derive(Clone, Copy)]
struct Conv<T> {
    to: fn(T) -> f64,
    from: fn(f64) -> T,
}

fn forward_rows<T: Elem>([x, w, b]: [&[T]; 3], dim: usize, eps: f64, c: Conv<T>) -> Vec<T> {
    let mut out = vec![T::default(); x.len()];
    let block = block_rows(dim) * dim;
    out.par_chunks_mut(block)
        .zip(x.par_chunks(block))
        .for_each(|(o, x)| {
            for (orow, row) in o.chunks_exact_mut(dim).zip(x.chunks_exact(dim)) {
                let (mean, r) = stats(row, eps, c.to);
                for (((o, &v), &wi), &bi) in orow.iter_mut().zip(row).zip(w).zip(b) {
                    *o = (c.from)(((c.to)(v) - mean) * r * (c.to)(wi) + (c.to)(bi));
                }
            }
        });
    out
}

/// dx (rows·dim), then dw (dim), then db (dim), in one buffer.
fn backward_rows<T: Elem>([x, w, dy]: [&[T]; 3], dim: usize, eps: f64, c: Conv<T>) -> Vec<T> {
    let mut out = vec![T::default(); x.len() + 2 * dim];
    let (dx, dwb) = out.split_at_mut(x.len());
    let block = block_rows(dim) * dim;
    let partials: Vec<Vec<f64>> = dx
        .par_chunks_mut(block)
        .zip(x.par_chunks(block).zip(dy.par_chunks(block)))
        .map(|(dx, (x, dy))| {
            // dw in [..dim], db in [dim..].
            let mut acc = vec![0f64; 2 * dim];
            let mut xhat = vec![0f64; dim];
            let rows = dx
                .chunks_exact_mut(dim)
                .zip(x.chunks_exact(dim).zip(dy.chunks_exact(dim)));
            for (dxr, (xr, dyr)) in rows {
                let (mean, r) = stats(xr, eps, c.to);
                let (mut mg, mut mgx) = (0f64, 0f64);
                for j in 0..dim {
                    xhat[j] = ((c.to)(xr[j]) - mean) * r;
                    let g = (c.to)(dyr[j]) * (c.to)(w[j]);
                    mg += g;
                    mgx += g * xhat[j];
                    acc[j] += (c.to)(dyr[j]) * xhat[j];
                    acc[dim + j] += (c.to)(dyr[j]);
                }
                let (mg, mgx) = (mg / dim as f64, mgx / dim as f64);
                for j in 0..dim {
                    let g = (c.to)(dyr[j]) * (c.to)(w[j]);
                    dxr[j] = (c.from)(r * (g - mg - xhat[j] * mgx));
                }
            }
            acc
        })
        .collect();
    let mut total = vec![0f64; 2 * dim];
    for p in &partials {
        total.iter_mut().zip(p).for_each(|(t, v)| *t += v);
    }
    dwb.iter_mut()
        .zip(total)
        .for_each(|(o, v)| *o = (c.from)(v));
    out
}

/// LayerNorm's backward on the CPU in f32 or f64: dx‖dw‖db as one flat tensor; `None` for
/// other dtypes or devices.
fn backward_cpu(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    let dim = x.dim(D::Minus1)?;
    let dy = dy.contiguous()?;
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (ds, dl) = dy.storage_and_layout();
    let (Storage::Cpu(xs), Storage::Cpu(ws), Storage::Cpu(ds)) = (&*xs, &*ws, &*ds) else {
        return Ok(None);
    };
    let len = x.elem_count() + 2 * dim;
    macro_rules! run {
        ($x:expr, $w:expr, $dy:expr, $to:expr, $from:expr) => {{
            let xwd = contiguous3([($x, xl, "x"), ($w, wl, "weight"), ($dy, dl, "dy")])?;
            let c = Conv {
                to: $to,
                from: $from,
            };
            Tensor::from_vec(backward_rows(xwd, dim, eps, c), len, x.device())?
        }};
    }
    Ok(Some(match (xs, ws, ds) {
        (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(dy)) => {
            run!(x, w, dy, |v: f32| v as f64, |v| v as f32)
        }
        (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(dy)) => {
            run!(x, w, dy, |v: f64| v, |v| v)
        }
        _ => return Ok(None),
    }))
}

fn contiguous<'a, T>(s: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => bail!("fused layer norm: `{what}` must be contiguous"),
    }
}

/// [`contiguous`] of three operands, named in its errors.
fn contiguous3<'a, T>(parts: [(&'a [T], &Layout, &str); 3]) -> Result<[&'a [T]; 3]> {
    let [a, b, c] = parts;
    Ok([
        contiguous(a.0, a.1, a.2)?,
        contiguous(b.0, b.1, b.2)?,
        contiguous(c.0, c.1, c.2)?,
    ])
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
            ($x:expr, $w:expr, $b:expr, $to:expr, $from:expr) => {{
                let xwb = contiguous3([($x, l1, "x"), ($w, l2, "weight"), ($b, l3, "bias")])?;
                forward_rows(
                    xwb,
                    dim,
                    eps,
                    Conv {
                        to: $to,
                        from: $from,
                    },
                )
            }};
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
        if let Some(out) = backward_cpu(x, w, dy, self.eps)? {
            let n = x.elem_count();
            let dim = x.dim(D::Minus1)?;
            return Ok((
                Some(out.narrow(0, 0, n)?.reshape(y.shape())?),
                Some(out.narrow(0, n, dim)?),
                Some(out.narrow(0, n + dim, dim)?),
            ));
        }
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
