//! # flash-ops-models: GPT-2 and BERT that train, with a drop-in attention choice
//!
//! Both models run their attention through flash-ops, picked at run time by [`AttentionKind`]
//! (the naive matmul–softmax–matmul reference, FlashAttention, or FlashAttention-2), and every
//! parameter gets its true gradient: LayerNorm and softmax are built from differentiable
//! primitives instead of candle-nn's fused ops, which have no backward.
//!
//! Parameters live in a `candle_nn::VarMap` under Hugging Face's names and layouts
//! (`GPT2LMHeadModel`, `BertForMaskedLM`, ...), so [`load_hf_safetensors`] reads downloaded
//! checkpoints and [`save_hf_safetensors`] writes files `transformers` loads.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use flash_ops_models::{generate, AttentionKind, Gpt2, Gpt2Config, Sampling};
//!
//! # fn main() -> candle_core::Result<()> {
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let model = Gpt2::new(&Gpt2Config::tiny(), vb, AttentionKind::FlashV2)?;
//! let ids = Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu)?;
//! let logits = model.forward(&ids, true)?; // (1, 4, vocab), dropout on
//! assert_eq!(logits.dims(), &[1, 4, 256]);
//! let tokens = generate(&model, &[1, 2, 3], 5, Sampling::TopK { k: 10, temperature: 0.8 }, 42)?;
//! assert_eq!(tokens.len(), 8);
//! # Ok(())
//! # }
//! ```

mod activation;
mod attention;
pub mod bert;
mod checkpoint;
mod dropout;
mod elementwise;
mod embedding;
pub mod gpt2;
mod layer_norm;
mod linear;
pub mod loss;
pub mod rng;

pub use activation::Activation;
pub use attention::{AttentionKind, SparsePattern, Sparsity};
pub use bert::{BertConfig, BertForMaskedLM, BertForSequenceClassification, BertInput, BertModel};
pub use checkpoint::{
    load_hf_safetensors, load_tensors, save_hf_dir, save_hf_safetensors, save_tensors, LoadReport,
};
pub use dropout::DropoutCtx;
pub use gpt2::{
    generate, generate_batch, BatchCache, BatchConfig, Gpt2, Gpt2Config, KvCache, Sampling,
    SharedPrefixCache,
};
pub use layer_norm::LayerNorm;
pub use linear::Linear;
pub use loss::{linear_cross_entropy, CeOptions};
