//! Hidden activations by their Hugging Face config names. Candle's `gelu` (tanh form) and
//! `gelu_erf` both have backward passes; the tanh form, with the bias before it, runs as one
//! fused pass on the CPU ([`crate::elementwise::gelu_tanh`]).

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::elementwise;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Activation {
    /// Exact GELU, `x·Φ(x)` (BERT's `"gelu"`).
    #[serde(rename = "gelu")]
    #[default]
    Gelu,
    /// Tanh approximation (GPT-2's `"gelu_new"`, also `"gelu_pytorch_tanh"`).
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluNew,
    #[serde(rename = "relu")]
    Relu,
}

impl Activation {
    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        self.forward_biased(x, None)
    }

    /// The activation of `x + bias` (bias over the last dimension).
    pub fn forward_biased(self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        match (self, bias) {
            (Self::GeluNew, b) => elementwise::gelu_tanh(x, b),
            (act, Some(b)) => act.forward(&x.broadcast_add(b)?),
            (Self::Gelu, None) => x.gelu_erf(),
            (Self::Relu, None) => x.relu(),
        }
    }
}
