//! Affine layers in Hugging Face's two weight layouts.
//!
//! `nn.Linear` (BERT) stores `(out, in)` and computes `x·Wᵀ + b`; GPT-2's `Conv1D` stores the
//! transpose, `(in, out)`, and computes `x·W + b`. The matmul is Candle's; the bias, and with
//! it the activation or residual add that follows, is one fused pass on the CPU
//! ([`crate::elementwise`]), each with its backward.

use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::activation::Activation;
use crate::elementwise;

/// Which of the two layouts the weight is stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `(out, in)`, PyTorch `nn.Linear`.
    OutIn,
    /// `(in, out)`, GPT-2's `Conv1D`.
    InOut,
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    layout: Layout,
}

fn weight_init(std: f64) -> Init {
    Init::Randn {
        mean: 0.0,
        stdev: std,
    }
}

impl Linear {
    /// `nn.Linear(in_dim, out_dim)`: `weight (out, in)`, `bias (out)` under `vb`.
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        std: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", weight_init(std))?;
        let bias = bias
            .then(|| vb.get_with_hints(out_dim, "bias", Init::Const(0.0)))
            .transpose()?;
        Ok(Self {
            weight,
            bias,
            layout: Layout::OutIn,
        })
    }

    /// GPT-2's `Conv1D(out_dim, in_dim)`: `weight (in, out)`, `bias (out)` under `vb`.
    pub fn conv1d(in_dim: usize, out_dim: usize, std: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints((in_dim, out_dim), "weight", weight_init(std))?;
        let bias = Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?);
        Ok(Self {
            weight,
            bias,
            layout: Layout::InOut,
        })
    }

    /// `x (..., in)` to `(..., out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_then(x, |y, b| match b {
            Some(b) => elementwise::bias_residual(y, b, None),
            None => Ok(y.clone()),
        })
    }

    /// `act(x·W + b)`, the bias fused into the activation.
    pub fn forward_activation(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        self.forward_then(x, |y, b| act.forward_biased(y, b))
    }

    /// `x·W + b + residual` (residual of the output's shape), bias and residual in one pass.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let r = |rows: usize| residual.reshape((rows, ()));
        self.forward_then(x, |y, b| match b {
            Some(b) => elementwise::bias_residual(y, b, Some(&r(y.dim(0)?)?)),
            None => y + r(y.dim(0)?)?,
        })
    }

    /// `x·W` as `(rows, out)`, then `epilogue(x·W, bias)`, reshaped to `(..., out)`.
    fn forward_then(
        &self,
        x: &Tensor,
        epilogue: impl FnOnce(&Tensor, Option<&Tensor>) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        let rows = x.elem_count() / in_dim.max(1);
        let x2 = x.reshape((rows, in_dim))?;
        let y = match self.layout {
            Layout::OutIn => x2.matmul(&self.weight.t()?)?,
            Layout::InOut => x2.matmul(&self.weight)?,
        };
        let y = epilogue(&y, self.bias.as_ref())?;
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = y.dim(1)?;
        y.reshape(out_dims)
    }
}
