//! BERT hyper-parameters under Hugging Face's `config.json` field names.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::activation::Activation;
use crate::attention::Sparsity;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: Activation,
    /// Dropout on embeddings and on each sublayer output before its residual add.
    pub hidden_dropout_prob: f32,
    /// Dropout on the attention probabilities.
    pub attention_probs_dropout_prob: f32,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub initializer_range: f64,
    pub layer_norm_eps: f64,
    pub pad_token_id: u32,
    /// Only `"absolute"` (learned positions) is implemented.
    pub position_embedding_type: String,
    /// Dropout before the classification head; `None` means `hidden_dropout_prob`.
    pub classifier_dropout: Option<f32>,
    /// Labels of the sequence-classification head (their number is the head's width).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id2label: Option<BTreeMap<String, String>>,
    /// Block-sparse attention pattern in every layer (ours, not Hugging Face's: omitted when
    /// dense), combined with the key-padding mask.
    #[serde(skip_serializing_if = "Sparsity::is_dense")]
    pub sparsity: Sparsity,
}

impl Default for BertConfig {
    fn default() -> Self {
        Self::bert_base()
    }
}

impl BertConfig {
    fn sized(hidden: usize, layers: usize, heads: usize, intermediate: usize) -> Self {
        Self {
            vocab_size: 30522,
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            intermediate_size: intermediate,
            hidden_act: Activation::Gelu,
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            initializer_range: 0.02,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
            position_embedding_type: "absolute".into(),
            classifier_dropout: None,
            id2label: None,
            sparsity: Sparsity::default(),
        }
    }

    /// BERT-base (110M parameters), `bert-base-uncased`'s vocabulary.
    pub fn bert_base() -> Self {
        Self::sized(768, 12, 12, 3072)
    }

    /// BERT-large (340M parameters).
    pub fn bert_large() -> Self {
        Self::sized(1024, 24, 16, 4096)
    }

    /// A small model for tests and CPU demos.
    pub fn tiny() -> Self {
        Self {
            vocab_size: 128,
            max_position_embeddings: 64,
            ..Self::sized(32, 2, 4, 64)
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Width of the sequence-classification head (2 when no labels are named, as in HF).
    pub fn num_labels(&self) -> usize {
        self.id2label.as_ref().map_or(2, |m| m.len())
    }

    /// Names `n` labels `LABEL_0..` (HF's default naming).
    pub fn with_num_labels(mut self, n: usize) -> Self {
        self.id2label = Some(
            (0..n)
                .map(|i| (i.to_string(), format!("LABEL_{i}")))
                .collect(),
        );
        self
    }

    /// `config.json` as `transformers` writes it, for the given architecture
    /// (`"BertForMaskedLM"`, `"BertForSequenceClassification"` or `"BertModel"`).
    pub fn to_hf_json(&self, architecture: &str) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("config serialises");
        v["model_type"] = "bert".into();
        v["architectures"] = serde_json::json!([architecture]);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_hf_config_json() {
        // bert-base-uncased's config.json.
        let json = r#"{"architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1,
            "gradient_checkpointing": false, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
            "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
            "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert",
            "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 0,
            "position_embedding_type": "absolute", "transformers_version": "4.6.0.dev0",
            "type_vocab_size": 2, "use_cache": true, "vocab_size": 30522}"#;
        let cfg: BertConfig = serde_json::from_str(json).unwrap();
        assert_eq!(cfg, BertConfig::bert_base());
        let back: BertConfig = serde_json::from_value(cfg.to_hf_json("BertModel")).unwrap();
        assert_eq!(back, cfg);
    }
}
