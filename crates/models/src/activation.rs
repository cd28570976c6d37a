//! Hidden activations by their Hugging Face config names. Candle's `gelu` (tanh form) and
//! `gelu_erf` both have backward passes.

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

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
        match self {
            Self::Gelu => x.gelu_erf(),
            Self::GeluNew => x.gelu(),
            Self::Relu => x.relu(),
        }
    }
}
