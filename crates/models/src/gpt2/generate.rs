//! Autoregressive generation with the KV cache: the prompt is encoded once, then each step feeds
//! a single token through the same attention kind the model was built with.

use candle_core::{bail, DType, Result, Tensor};

use super::model::{Gpt2, KvCache};
use crate::rng::CounterRng;

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The most likely token.
    Greedy,
    /// Sample from `softmax(logits / temperature)`.
    Temperature(f64),
    /// Sample from the `k` most likely tokens, `softmax(logits / temperature)` renormalised.
    TopK { k: usize, temperature: f64 },
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Draws from `softmax(logits[cands] / temperature)`.
fn sample_among(logits: &[f32], cands: &[usize], temperature: f64, rng: &mut CounterRng) -> u32 {
    let max = cands
        .iter()
        .map(|&i| logits[i] as f64)
        .fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = cands
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / temperature).exp())
        .collect();
    let mut r = rng.uniform() * weights.iter().sum::<f64>();
    for (&i, w) in cands.iter().zip(&weights) {
        if r < *w {
            return i as u32;
        }
        r -= w;
    }
    cands[cands.len() - 1] as u32
}

fn choose(logits: &[f32], sampling: Sampling, rng: &mut CounterRng) -> Result<u32> {
    match sampling {
        Sampling::Greedy => Ok(argmax(logits)),
        Sampling::Temperature(t) | Sampling::TopK { temperature: t, .. } if t <= 0.0 => {
            bail!("generate: temperature must be positive, got {t}")
        }
        Sampling::Temperature(t) => {
            let all: Vec<usize> = (0..logits.len()).collect();
            Ok(sample_among(logits, &all, t, rng))
        }
        Sampling::TopK { k, temperature } => {
            if k == 0 {
                bail!("generate: top-k needs k >= 1")
            }
            let mut idx: Vec<usize> = (0..logits.len()).collect();
            idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
            idx.truncate(k);
            Ok(sample_among(logits, &idx, temperature, rng))
        }
    }
}

/// Continues `prompt` by up to `max_new_tokens` tokens and returns prompt + continuation.
/// Generation stops early when the sequence fills the context (`n_positions` tokens). Eval mode (no dropout);
/// `seed` fixes the sampling.
pub fn generate(
    model: &Gpt2,
    prompt: &[u32],
    max_new_tokens: usize,
    sampling: Sampling,
    seed: u64,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        bail!("generate: the prompt must hold at least one token")
    }
    let n_ctx = model.config().n_positions;
    let mut tokens = prompt.to_vec();
    if tokens.len() > n_ctx {
        bail!(
            "generate: prompt of {} tokens exceeds n_positions = {n_ctx}",
            tokens.len()
        )
    }
    let mut rng = CounterRng::new(seed);
    let mut cache = KvCache::default();
    let mut input = Tensor::new(prompt, model.device())?.unsqueeze(0)?;
    for _ in 0..max_new_tokens {
        // Every returned token stays addressable by a position embedding.
        if tokens.len() >= n_ctx {
            break;
        }
        let logits = model.forward_with_cache(&input, &mut cache)?;
        let t = logits.dim(1)?;
        let last = logits
            .narrow(1, t - 1, 1)?
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let next = choose(&last, sampling, &mut rng)?;
        tokens.push(next);
        input = Tensor::new(&[next], model.device())?.unsqueeze(0)?;
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_one_is_greedy_and_sampling_follows_the_distribution() -> Result<()> {
        let logits = [0.5f32, 2.0, -1.0, 1.0];
        let mut rng = CounterRng::new(3);
        for _ in 0..20 {
            let s = Sampling::TopK {
                k: 1,
                temperature: 1.0,
            };
            assert_eq!(choose(&logits, s, &mut rng)?, 1);
        }
        assert_eq!(choose(&logits, Sampling::Greedy, &mut rng)?, 1);
        // Empirical frequencies of softmax sampling.
        let n = 20_000;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            counts[choose(&logits, Sampling::Temperature(1.0), &mut rng)? as usize] += 1;
        }
        let z: f64 = logits.iter().map(|&x| (x as f64).exp()).sum();
        for (i, &c) in counts.iter().enumerate() {
            let p = (logits[i] as f64).exp() / z;
            assert!((c as f64 / n as f64 - p).abs() < 0.015, "token {i}");
        }
        // Top-2 never yields tokens outside the two best.
        for _ in 0..200 {
            let s = Sampling::TopK {
                k: 2,
                temperature: 1.0,
            };
            assert!(matches!(choose(&logits, s, &mut rng)?, 1 | 3));
        }
        Ok(())
    }
}
