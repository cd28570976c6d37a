//! BERT: configuration, encoder, masked-LM and sequence-classification heads.

mod config;
mod model;

pub use config::BertConfig;
pub use model::{BertForMaskedLM, BertForSequenceClassification, BertInput, BertModel};
