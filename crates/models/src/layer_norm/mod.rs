//! LayerNorm (Ba et al., 2016) with a backward pass.
//!
//! candle-nn's `LayerNorm::forward` takes a fused fast path for contiguous inputs and
//! `ops::layer_norm` is registered without backward, so gradients upstream of them silently
//! vanish. Here the CPU runs [`fused::FusedLayerNorm`], a custom op with its own backward; other
//! devices use the same function built from differentiable primitives (mean, centre, variance,
//! divide). Half-precision inputs are normalised in f32 or better, as PyTorch does.

mod fused;

use candle_core::{DType, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

pub use fused::FusedLayerNorm;

#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// `weight` (ones) and `bias` (zeros) of size `dim` under `vb`.
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", Init::Const(0.0))?,
            eps,
        })
    }

    /// Normalises over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() {
            self.forward_fused(x)
        } else {
            self.forward_composed(x)
        }
    }

    /// The fused custom op (CPU).
    pub fn forward_fused(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?
            .apply_op3(&self.weight, &self.bias, FusedLayerNorm { eps: self.eps })
    }

    /// The same function from differentiable Candle primitives (any device).
    pub fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = match dtype {
            DType::F16 | DType::BF16 => x.to_dtype(DType::F32)?,
            _ => x.clone(),
        };
        let mean = xf.mean_keepdim(D::Minus1)?;
        let centred = xf.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The fused op and the composed formulation agree in value and in all three gradients.
    #[test]
    fn fused_matches_composed_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::F64, DType::F32] {
            let x = Var::from_tensor(
                &(Tensor::randn(0f64, 2.0, (3, 5, 24), &dev)? + 0.7)?.to_dtype(dtype)?,
            )?;
            let w =
                Var::from_tensor(&(Tensor::randn(0f64, 0.5, 24, &dev)? + 1.0)?.to_dtype(dtype)?)?;
            let b = Var::from_tensor(&Tensor::randn(0f64, 0.5, 24, &dev)?.to_dtype(dtype)?)?;
            let ln = LayerNorm {
                weight: w.as_tensor().clone(),
                bias: b.as_tensor().clone(),
                eps: 1e-5,
            };
            let r = Tensor::randn(0f64, 1.0, (3, 5, 24), &dev)?.to_dtype(dtype)?;
            let yf = ln.forward_fused(&x)?;
            let yc = ln.forward_composed(&x)?;
            let gf = (&yf * &r)?.sum_all()?.backward()?;
            let gc = (&yc * &r)?.sum_all()?.backward()?;
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            let rel = |a: &Tensor, b: &Tensor| -> Result<f64> {
                let a = a.to_dtype(DType::F64)?;
                let b = b.to_dtype(DType::F64)?;
                let d = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
                Ok(d / b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt())
            };
            assert!(rel(&yf, &yc)? < tol, "{dtype:?} forward");
            for (name, v) in [("x", &x), ("weight", &w), ("bias", &b)] {
                let (a, c) = (gf.get(v).unwrap(), gc.get(v).unwrap());
                let e = rel(a, c)?;
                assert!(e < tol * 10.0, "{dtype:?} d{name}: rel err {e}");
            }
        }
        Ok(())
    }
}
