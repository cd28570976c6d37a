//! Masked-LM batches (BERT): which tokens are predicted and what the model sees in their place.

use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokenizers::Tokenizer;

use crate::model::Batch;

/// `train bert`'s masking flags, saved with the run.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MlmSettings {
    pub mask_prob: f64,
    pub whole_word: bool,
}

/// Special ids masked LM needs.
#[derive(Debug, Clone)]
pub struct MlmIds {
    cls: u32,
    sep: u32,
    mask: u32,
    vocab: u32,
    /// Whether each id continues a word (`##` WordPiece pieces).
    continuation: Vec<bool>,
}

impl MlmIds {
    pub fn new(tok: &Tokenizer, vocab: usize) -> Result<Self> {
        let id = |t: &str| {
            tok.token_to_id(t).ok_or_else(|| {
                anyhow::anyhow!(
                    "the tokenizer has no {t} token; BERT needs a WordPiece tokenizer with [CLS] [SEP] [MASK] (the default, or `train tokenizer --kind wordpiece`)"
                )
            })
        };
        let mut continuation = vec![false; vocab];
        for (t, i) in tok.get_vocab(true) {
            if t.starts_with("##") && (i as usize) < vocab {
                continuation[i as usize] = true;
            }
        }
        Ok(Self {
            cls: id("[CLS]")?,
            sep: id("[SEP]")?,
            mask: id("[MASK]")?,
            vocab: tok.get_vocab_size(true) as u32,
            continuation,
        })
    }
}

/// Builds a masked-LM batch from windows of `seq_len - 2` content tokens: `[CLS] x [SEP]`; of the
/// content, `mask_prob` of tokens (or whole words) are predicted, 80% replaced by [MASK], 10% by
/// a random token, 10% kept (BERT). Deterministic in `rng_seed`.
pub fn mlm_batch(
    windows: &[&[u32]],
    ids: &MlmIds,
    mlm: MlmSettings,
    rng_seed: u64,
    dev: &Device,
) -> Result<Batch> {
    let mut rng = ChaCha8Rng::seed_from_u64(rng_seed);
    let t = windows[0].len() + 2;
    let mut inputs = Vec::with_capacity(windows.len() * t);
    let mut positions = Vec::new();
    let mut labels = Vec::new();
    for (row, w) in windows.iter().enumerate() {
        let base = inputs.len();
        inputs.push(ids.cls);
        inputs.extend_from_slice(w);
        inputs.push(ids.sep);
        // Word starts (a continuation piece joins the word before it).
        let mut chosen = vec![false; w.len()];
        let mut i = 0;
        while i < w.len() {
            let mut j = i + 1;
            if mlm.whole_word {
                while j < w.len() && ids.continuation[w[j] as usize] {
                    j += 1;
                }
            }
            if rng.random::<f64>() < mlm.mask_prob {
                chosen[i..j].iter_mut().for_each(|c| *c = true);
            }
            i = j;
        }
        if !chosen.iter().any(|&c| c) {
            chosen[rng.random_range(0..w.len())] = true;
        }
        for (k, &c) in chosen.iter().enumerate() {
            if !c {
                continue;
            }
            let p = base + 1 + k;
            positions.push(p as u32);
            labels.push(w[k]);
            let r: f64 = rng.random();
            if r < 0.8 {
                inputs[p] = ids.mask;
            } else if r < 0.9 {
                inputs[p] = rng.random_range(0..ids.vocab);
            }
        }
        debug_assert_eq!(inputs.len(), (row + 1) * t);
    }
    let b = windows.len();
    let n = positions.len();
    Ok(Batch::Masked {
        inputs: Tensor::from_vec(inputs, (b, t), dev)?,
        lengths: vec![t; b],
        positions: Tensor::from_vec(positions, n, dev)?,
        labels: Tensor::from_vec(labels, n, dev)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mlm_masking_statistics() {
        let tok = crate::tokenizer::bert_uncased().unwrap();
        let ids = MlmIds::new(&tok, 30522).unwrap();
        let text = &crate::data::DEFAULT_CORPUS[..100_000];
        let t = crate::tokenizer::encode_text(&tok, text).unwrap();
        let windows: Vec<&[u32]> = t.chunks_exact(126).take(100).collect();
        let s = MlmSettings {
            mask_prob: 0.15,
            whole_word: false,
        };
        let Batch::Masked {
            inputs,
            positions,
            labels,
            ..
        } = mlm_batch(&windows, &ids, s, 3, &Device::Cpu).unwrap()
        else {
            panic!()
        };
        let inputs = inputs.flatten_all().unwrap().to_vec1::<u32>().unwrap();
        let pos = positions.to_vec1::<u32>().unwrap();
        let lab = labels.to_vec1::<u32>().unwrap();
        let frac = pos.len() as f64 / (100.0 * 126.0);
        assert!((frac - 0.15).abs() < 0.02, "{frac}");
        let masked = pos
            .iter()
            .filter(|&&p| inputs[p as usize] == ids.mask)
            .count() as f64;
        let kept = pos
            .iter()
            .zip(&lab)
            .filter(|(&p, &l)| inputs[p as usize] == l)
            .count() as f64;
        let n = pos.len() as f64;
        assert!((masked / n - 0.8).abs() < 0.04, "{}", masked / n);
        assert!(kept / n > 0.06 && kept / n < 0.16, "{}", kept / n);
        assert_eq!(inputs[0], ids.cls);
        assert_eq!(inputs[127], ids.sep);
        // Whole-word masking selects every piece of a word together.
        let ww = MlmSettings {
            mask_prob: 0.15,
            whole_word: true,
        };
        let Batch::Masked { positions, .. } =
            mlm_batch(&windows, &ids, ww, 3, &Device::Cpu).unwrap()
        else {
            panic!()
        };
        let chosen: std::collections::HashSet<u32> =
            positions.to_vec1::<u32>().unwrap().into_iter().collect();
        for (row, w) in windows.iter().enumerate() {
            for k in 1..w.len() {
                if ids.continuation[w[k] as usize] {
                    let p = (row * 128 + 1 + k) as u32;
                    assert_eq!(chosen.contains(&p), chosen.contains(&(p - 1)));
                }
            }
        }
    }
}
