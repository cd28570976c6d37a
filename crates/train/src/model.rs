//! The two trainable models behind one interface, their presets, and the loss of a batch.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use flash_ops_models::{
    AttentionKind, BertConfig, BertForMaskedLM, BertInput, Gpt2, Gpt2Config, Sparsity,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Gpt2,
    Bert,
}

/// `--preset`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// CPU-sized: 4 layers, 4 heads, width 128 (GPT-2 or BERT).
    Tiny,
    /// GPT-2 124M (12 layers, 768 wide).
    Gpt2Small,
    /// GPT-2 350M (24 layers, 1024 wide).
    Gpt2Medium,
    /// GPT-2 774M (36 layers, 1280 wide).
    Gpt2Large,
    /// BERT-base 110M.
    BertBase,
    /// BERT-large 340M.
    BertLarge,
}

/// Size overrides from the command line.
#[derive(Debug, Clone, Default)]
pub struct SizeOverrides {
    pub n_layer: Option<usize>,
    pub n_head: Option<usize>,
    pub n_embd: Option<usize>,
    pub n_positions: Option<usize>,
    pub vocab_size: Option<usize>,
    pub dropout: Option<f32>,
    /// Block-sparse attention pattern (`--sparsity`), saved in the config.
    pub sparsity: Option<Sparsity>,
}

/// The model config (Hugging Face `config.json`) for a preset, the tokenizer's vocabulary and the
/// overrides.
pub fn model_config(
    kind: ModelKind,
    preset: Preset,
    tokenizer_vocab: usize,
    o: &SizeOverrides,
) -> Result<serde_json::Value> {
    let vocab = match o.vocab_size {
        Some(v) if v < tokenizer_vocab => bail!(
            "--vocab-size {v} is smaller than the tokenizer's vocabulary ({tokenizer_vocab} tokens); drop --vocab-size or use a smaller tokenizer (`train tokenizer`)"
        ),
        Some(v) => v,
        None => tokenizer_vocab,
    };
    let check_heads = |embd: usize, heads: usize| -> Result<()> {
        if heads == 0 || !embd.is_multiple_of(heads) {
            bail!("model width {embd} is not a multiple of the head count {heads}; pick --n-embd divisible by --n-head")
        }
        Ok(())
    };
    match kind {
        ModelKind::Gpt2 => {
            let mut c = match preset {
                Preset::Tiny => Gpt2Config {
                    n_positions: 1024,
                    ..sized_gpt2(128, 4, 4)
                },
                Preset::Gpt2Small => Gpt2Config::gpt2_small(),
                Preset::Gpt2Medium => Gpt2Config::gpt2_medium(),
                Preset::Gpt2Large => Gpt2Config::gpt2_large(),
                Preset::BertBase | Preset::BertLarge => bail!(
                    "--preset {preset:?} is a BERT preset; `train gpt2` takes tiny, gpt2-small, gpt2-medium or gpt2-large"
                ),
            };
            c.vocab_size = vocab;
            c.n_layer = o.n_layer.unwrap_or(c.n_layer);
            c.n_head = o.n_head.unwrap_or(c.n_head);
            c.n_embd = o.n_embd.unwrap_or(c.n_embd);
            c.n_positions = o.n_positions.unwrap_or(c.n_positions);
            // llm.c's GPT-2 pretraining recipe: no dropout.
            let p = o.dropout.unwrap_or(0.0);
            (c.resid_pdrop, c.embd_pdrop, c.attn_pdrop) = (p, p, p);
            c.bos_token_id = (vocab.min(50257) - 1) as u32;
            c.eos_token_id = c.bos_token_id;
            c.sparsity = o.sparsity.unwrap_or(c.sparsity);
            check_heads(c.n_embd, c.n_head)?;
            Ok(c.to_hf_json())
        }
        ModelKind::Bert => {
            let mut c = match preset {
                Preset::Tiny => BertConfig {
                    hidden_size: 128,
                    num_hidden_layers: 4,
                    num_attention_heads: 4,
                    intermediate_size: 512,
                    ..BertConfig::bert_base()
                },
                Preset::BertBase => BertConfig::bert_base(),
                Preset::BertLarge => BertConfig::bert_large(),
                _ => bail!(
                    "--preset {preset:?} is a GPT-2 preset; `train bert` takes tiny, bert-base or bert-large"
                ),
            };
            c.vocab_size = vocab;
            c.num_hidden_layers = o.n_layer.unwrap_or(c.num_hidden_layers);
            c.num_attention_heads = o.n_head.unwrap_or(c.num_attention_heads);
            if let Some(h) = o.n_embd {
                c.hidden_size = h;
                c.intermediate_size = 4 * h;
            }
            c.max_position_embeddings = o.n_positions.unwrap_or(c.max_position_embeddings);
            let p = o.dropout.unwrap_or(0.1);
            (c.hidden_dropout_prob, c.attention_probs_dropout_prob) = (p, p);
            c.sparsity = o.sparsity.unwrap_or(c.sparsity);
            check_heads(c.hidden_size, c.num_attention_heads)?;
            Ok(c.to_hf_json("BertForMaskedLM"))
        }
    }
}

fn sized_gpt2(n_embd: usize, n_layer: usize, n_head: usize) -> Gpt2Config {
    Gpt2Config {
        n_embd,
        n_layer,
        n_head,
        ..Gpt2Config::gpt2_small()
    }
}

/// What a model config says about its shape.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub vocab: usize,
    pub positions: usize,
    pub layers: usize,
    pub hidden: usize,
}

pub fn kind_of(config: &serde_json::Value) -> Result<ModelKind> {
    match config.get("model_type").and_then(|v| v.as_str()) {
        Some("gpt2") => Ok(ModelKind::Gpt2),
        Some("bert") => Ok(ModelKind::Bert),
        other => bail!(
            "config.json has model_type {other:?}; this tool trains gpt2 and bert checkpoints only"
        ),
    }
}

pub fn dims(config: &serde_json::Value) -> Result<Dims> {
    Ok(match kind_of(config)? {
        ModelKind::Gpt2 => {
            let c: Gpt2Config = serde_json::from_value(config.clone())?;
            Dims {
                vocab: c.vocab_size,
                positions: c.n_positions,
                layers: c.n_layer,
                hidden: c.n_embd,
            }
        }
        ModelKind::Bert => {
            let c: BertConfig = serde_json::from_value(config.clone())?;
            Dims {
                vocab: c.vocab_size,
                positions: c.max_position_embeddings,
                layers: c.num_hidden_layers,
                hidden: c.hidden_size,
            }
        }
    })
}

/// The keys where two configs differ (for "checkpoint from a different config" errors).
pub fn config_diff(a: &serde_json::Value, b: &serde_json::Value) -> Vec<String> {
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return vec!["<whole config>".into()];
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            format!(
                "{k}: {} vs {}",
                a.get(k).map_or("-".into(), |v| v.to_string()),
                b.get(k).map_or("-".into(), |v| v.to_string())
            )
        })
        .collect()
}

pub enum Net {
    Gpt2(Gpt2),
    Bert(BertForMaskedLM),
}

/// One batch: inputs `(b, t)` u32, and the loss targets.
pub enum Batch {
    /// Next-token targets `(b, t)`.
    Causal { inputs: Tensor, targets: Tensor },
    /// Masked positions (flat indices into `b·t`) and their original ids.
    Masked {
        inputs: Tensor,
        lengths: Vec<usize>,
        positions: Tensor,
        labels: Tensor,
    },
}

impl Net {
    /// Builds the model described by `config` with its parameters in `varmap` (dtype `dtype`).
    pub fn build(
        config: &serde_json::Value,
        varmap: &VarMap,
        dtype: DType,
        device: &Device,
        attn: AttentionKind,
    ) -> Result<Self> {
        let vb = VarBuilder::from_varmap(varmap, dtype, device);
        Ok(match kind_of(config)? {
            ModelKind::Gpt2 => {
                let c: Gpt2Config =
                    serde_json::from_value(config.clone()).context("config.json")?;
                Net::Gpt2(Gpt2::new(&c, vb, attn)?)
            }
            ModelKind::Bert => {
                let c: BertConfig =
                    serde_json::from_value(config.clone()).context("config.json")?;
                Net::Bert(BertForMaskedLM::new(&c, vb, attn)?)
            }
        })
    }

    pub fn set_dropout_seed(&self, seed: u64) {
        match self {
            Net::Gpt2(m) => m.set_dropout_seed(seed),
            Net::Bert(m) => m.set_dropout_seed(seed),
        }
    }

    pub fn set_attention(&mut self, attn: AttentionKind) {
        match self {
            Net::Gpt2(m) => m.set_attention(attn),
            Net::Bert(m) => m.set_attention(attn),
        }
    }

    /// Mean cross-entropy (nats per predicted token), computed in f32 through the fused head
    /// (no logits). `train`: dropout on and differentiable; otherwise evaluation.
    pub fn loss(&self, batch: &Batch, train: bool) -> Result<Tensor> {
        match (self, batch) {
            (Net::Gpt2(m), Batch::Causal { inputs, targets }) => {
                Ok(m.loss(inputs, targets, train)?)
            }
            (
                Net::Bert(m),
                Batch::Masked {
                    inputs,
                    lengths,
                    positions,
                    labels,
                },
            ) => Ok(m.masked_lm_loss(
                BertInput::new(inputs, lengths),
                (positions, labels),
                None,
                train,
            )?),
            _ => bail!("internal: batch kind does not match the model"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--sparsity` lands in the saved config (and so in the checkpoint), a dense run's config
    /// has no such key, and resuming with another pattern shows up as a config difference.
    #[test]
    fn sparsity_is_part_of_the_model_config() -> Result<()> {
        for kind in [ModelKind::Gpt2, ModelKind::Bert] {
            let with = |s: Option<&str>| {
                let o = SizeOverrides {
                    sparsity: s.map(|s| s.parse().unwrap()),
                    ..SizeOverrides::default()
                };
                model_config(kind, Preset::Tiny, 1000, &o)
            };
            let dense = with(None)?;
            assert!(dense.get("sparsity").is_none());
            let sparse = with(Some("local:256@64x64"))?;
            assert_eq!(sparse["sparsity"], "local:256@64x64");
            let other = with(Some("butterfly"))?;
            let diff = config_diff(&sparse, &other);
            assert_eq!(diff, ["sparsity: \"local:256@64x64\" vs \"butterfly\""]);
            assert_eq!(config_diff(&dense, &sparse).len(), 1);
            let back: Sparsity = serde_json::from_value(sparse["sparsity"].clone())?;
            assert_eq!(back.to_string(), "local:256@64x64");
        }
        Ok(())
    }
}
