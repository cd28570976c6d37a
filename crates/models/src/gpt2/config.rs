//! GPT-2 hyper-parameters under Hugging Face's `config.json` field names, so a downloaded
//! `config.json` deserialises directly and ours loads in `transformers`.

use serde::{Deserialize, Serialize};

use crate::activation::Activation;
use crate::attention::Sparsity;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    /// Context length (learned position embeddings).
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// MLP width; `None` means `4 * n_embd`.
    pub n_inner: Option<usize>,
    pub activation_function: Activation,
    /// Dropout on each residual branch (attention and MLP outputs).
    pub resid_pdrop: f32,
    /// Dropout on the summed token + position embeddings.
    pub embd_pdrop: f32,
    /// Dropout on the attention probabilities.
    pub attn_pdrop: f32,
    pub layer_norm_epsilon: f64,
    pub initializer_range: f64,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
    /// Block-sparse attention pattern in every layer (ours, not Hugging Face's: omitted when
    /// dense), combined with the causal mask.
    #[serde(skip_serializing_if = "Sparsity::is_dense")]
    pub sparsity: Sparsity,
}

impl Default for Gpt2Config {
    fn default() -> Self {
        Self::gpt2_small()
    }
}

impl Gpt2Config {
    fn sized(n_embd: usize, n_layer: usize, n_head: usize) -> Self {
        Self {
            vocab_size: 50257,
            n_positions: 1024,
            n_embd,
            n_layer,
            n_head,
            n_inner: None,
            activation_function: Activation::GeluNew,
            resid_pdrop: 0.1,
            embd_pdrop: 0.1,
            attn_pdrop: 0.1,
            layer_norm_epsilon: 1e-5,
            initializer_range: 0.02,
            bos_token_id: 50256,
            eos_token_id: 50256,
            sparsity: Sparsity::default(),
        }
    }

    /// GPT-2 small, 124M parameters.
    pub fn gpt2_small() -> Self {
        Self::sized(768, 12, 12)
    }

    /// GPT-2 medium, 350M parameters.
    pub fn gpt2_medium() -> Self {
        Self::sized(1024, 24, 16)
    }

    /// GPT-2 large, 774M parameters.
    pub fn gpt2_large() -> Self {
        Self::sized(1280, 36, 20)
    }

    /// GPT-2 XL, 1.5B parameters.
    pub fn gpt2_xl() -> Self {
        Self::sized(1600, 48, 25)
    }

    /// A few-thousand-parameter model for tests and CPU demos (byte-level vocabulary).
    pub fn tiny() -> Self {
        Self {
            vocab_size: 256,
            n_positions: 64,
            bos_token_id: 0,
            eos_token_id: 0,
            ..Self::sized(32, 2, 4)
        }
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    pub fn inner_dim(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    /// `config.json` as `transformers` writes it (with `model_type` and `architectures`).
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("config serialises");
        v["model_type"] = "gpt2".into();
        v["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
        v["tie_word_embeddings"] = true.into();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_hf_config_json() {
        // An excerpt of the `gpt2` repository's config.json.
        let json = r#"{"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
            "attn_pdrop": 0.1, "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256,
            "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "gpt2",
            "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024,
            "resid_pdrop": 0.1, "vocab_size": 50257}"#;
        let cfg: Gpt2Config = serde_json::from_str(json).unwrap();
        assert_eq!(cfg, Gpt2Config::gpt2_small());
        let back: Gpt2Config = serde_json::from_value(cfg.to_hf_json()).unwrap();
        assert_eq!(back, cfg);
    }
}
