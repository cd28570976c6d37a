//! GPT-2: configuration, model with KV cache, and sampling.

mod config;
pub mod decode;
mod generate;
mod model;
mod shared_cache;

pub use config::Gpt2Config;
pub use generate::{
    generate, generate_batch, sample_seed, BatchCache, BatchConfig, Generated, Sampling,
};
pub use model::{Gpt2, KvCache};
pub use shared_cache::SharedPrefixCache;
