//! LayerNorm (Ba et al., 2016) with a backward pass.
//!
//! candle-nn's `LayerNorm::forward` takes a fused fast path for contiguous inputs and
//! `ops::layer_norm` is registered without backward, so gradients upstream of them silently
//! vanish. Here the CPU runs [`fused::FusedLayerNorm`], a custom op with its own backward; other
//! devices use candle-nn's `ops::layer_norm_slow`, the same function composed of differentiable
//! primitives (mean, centre, variance, divide). Half-precision inputs are normalised in f32 or
//! better, as PyTorch does.

mod fused;

use candle_core::{Result, Tensor};
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

    /// The same function from differentiable Candle primitives (any device): candle-nn's
    /// `layer_norm_slow` (f16/bf16 normalised in f32). Its `eps` is an f32: rounding GPT-2's 1e-5
    /// moves it by 2.5e-13, the outputs by ~1e-13 relative at unit variance.
    pub fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, self.eps as f32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// The fused op and the composed formulation agree in value and in all three gradients, on
    /// one block of rows and on several (the parallel split and its dw/db partials).
    #[test]
    fn fused_matches_composed_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        for ((b0, t, dim), dtype) in [(3, 5, 24), (2, 700, 40)]
            .into_iter()
            .flat_map(|s| [(s, DType::F64), (s, DType::F32)])
        {
            let x = Var::from_tensor(
                &(Tensor::randn(0f64, 2.0, (b0, t, dim), &dev)? + 0.7)?.to_dtype(dtype)?,
            )?;
            let w =
                Var::from_tensor(&(Tensor::randn(0f64, 0.5, dim, &dev)? + 1.0)?.to_dtype(dtype)?)?;
            let b = Var::from_tensor(&Tensor::randn(0f64, 0.5, dim, &dev)?.to_dtype(dtype)?)?;
            let ln = LayerNorm {
                weight: w.as_tensor().clone(),
                bias: b.as_tensor().clone(),
                eps: 1e-5,
            };
            let r = Tensor::randn(0f64, 1.0, (b0, t, dim), &dev)?.to_dtype(dtype)?;
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
