//! Windows of the token stream → model batches: next-token targets for GPT-2, masked positions
//! for BERT.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use tokenizers::Tokenizer;

use crate::masking::{mlm_batch, MlmIds, MlmSettings};
use crate::model::{Batch, ModelKind};

/// A causal-LM batch from windows of `seq_len + 1` tokens.
pub fn causal_batch(windows: &[&[u32]], dev: &Device) -> Result<Batch> {
    let b = windows.len();
    let t = windows[0].len() - 1;
    let mut x = Vec::with_capacity(b * t);
    let mut y = Vec::with_capacity(b * t);
    for w in windows {
        x.extend_from_slice(&w[..t]);
        y.extend_from_slice(&w[1..]);
    }
    Ok(Batch::Causal {
        inputs: Tensor::from_vec(x, (b, t), dev)?,
        targets: Tensor::from_vec(y, (b, t), dev)?,
    })
}

/// Content tokens per window: BERT spends two positions on [CLS]/[SEP].
pub fn content_len(kind: ModelKind, seq_len: usize) -> usize {
    match kind {
        ModelKind::Gpt2 => seq_len,
        ModelKind::Bert => seq_len - 2,
    }
}

/// The token between documents of the stream: GPT-2's `<|endoftext|>`, BERT's [SEP].
pub fn document_separator(kind: ModelKind, tok: &Tokenizer) -> Option<u32> {
    match kind {
        ModelKind::Gpt2 => tok.token_to_id(crate::tokenizer::GPT2_EOT),
        ModelKind::Bert => tok.token_to_id("[SEP]"),
    }
}

/// Builds the batches of one model kind on one device.
pub struct Batcher {
    /// BERT's special ids and masking flags; none for GPT-2.
    mlm: Option<(MlmIds, MlmSettings)>,
    dev: Device,
}

impl Batcher {
    /// `mlm` is required for BERT and ignored for GPT-2.
    pub fn new(
        kind: ModelKind,
        tok: &Tokenizer,
        vocab: usize,
        mlm: Option<MlmSettings>,
        dev: &Device,
    ) -> Result<Self> {
        let mlm = match (kind, mlm) {
            (ModelKind::Gpt2, _) => None,
            (ModelKind::Bert, Some(s)) => Some((MlmIds::new(tok, vocab)?, s)),
            (ModelKind::Bert, None) => bail!("internal: BERT without MLM settings"),
        };
        Ok(Self {
            mlm,
            dev: dev.clone(),
        })
    }

    /// The batch of `windows` (`content_len + 1` tokens each); BERT's masking is a function of
    /// `seed`.
    pub fn batch(&self, windows: &[&[u32]], seed: u64) -> Result<Batch> {
        match &self.mlm {
            None => causal_batch(windows, &self.dev),
            Some((ids, s)) => {
                // Windows carry one extra token (the causal target); BERT does not need it.
                let trimmed: Vec<&[u32]> = windows.iter().map(|w| &w[..w.len() - 1]).collect();
                mlm_batch(&trimmed, ids, *s, seed, &self.dev)
            }
        }
    }
}
