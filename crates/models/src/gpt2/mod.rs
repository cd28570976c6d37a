//! GPT-2: configuration, model with KV cache, and sampling.

mod config;
mod generate;
mod model;

pub use config::Gpt2Config;
pub use generate::{generate, Sampling};
pub use model::{Gpt2, KvCache};
