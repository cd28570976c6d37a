//! Autoregressive generation with the KV cache: the prompt is encoded once, then each step feeds
//! a single token through the same attention kind the model was built with. [`generate_batch`]
//! draws several samples of one prompt in one batch, the prompt's K/V shared by all of them.

use std::time::{Duration, Instant};

use candle_core::{bail, DType, Result, Tensor};

use super::model::{Gpt2, KvCache};
use super::shared_cache::SharedPrefixCache;
use crate::rng::{self, CounterRng};

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

/// How [`generate_batch`] caches the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BatchCache {
    /// The prompt's K/V once, attended with shared-prefix attention (Hydragen). A block-sparse
    /// model decodes with `Duplicated` instead (shared-prefix attention takes no block mask).
    #[default]
    SharedPrefix,
    /// Per-sample caches each holding a copy of the prompt, attended with flash decoding (the
    /// baseline).
    Duplicated,
}

/// What [`generate_batch`] generates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchConfig {
    pub num_samples: usize,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Sample `i` draws from its own stream, [`sample_seed`]`(seed, i)`.
    pub seed: u64,
    /// A sample that draws this token stops after it (the others go on).
    pub stop: Option<u32>,
    pub cache: BatchCache,
}

/// The samples of [`generate_batch`] and where the time went.
#[derive(Debug, Clone)]
pub struct Generated {
    /// Prompt + continuation, one per sample.
    pub sequences: Vec<Vec<u32>>,
    /// Encoding the prompt (once) and drawing every sample's first token.
    pub prefill: Duration,
    /// The batched decoding steps after it.
    pub decode: Duration,
}

impl Generated {
    /// Tokens generated over all samples.
    pub fn new_tokens(&self, prompt_len: usize) -> usize {
        self.sequences.iter().map(|s| s.len() - prompt_len).sum()
    }
}

/// The seed of sample `i` of a batch seeded `seed`: sample 0 is `generate(…, seed)` itself, and
/// each sample's stream is its own, whatever the batch around it.
pub fn sample_seed(seed: u64, i: usize) -> u64 {
    rng::offset(seed, i as u64)
}

enum Decoder {
    Shared(SharedPrefixCache),
    Duplicated(KvCache),
}

impl Decoder {
    fn step(&mut self, model: &Gpt2, ids: &Tensor) -> Result<Tensor> {
        match self {
            Decoder::Shared(c) => model.forward_with_shared_cache(ids, c),
            Decoder::Duplicated(c) => model.forward_with_cache(ids, c),
        }
    }

    fn retain(&mut self, rows: &[usize]) -> Result<()> {
        match self {
            Decoder::Shared(c) => c.retain(rows),
            Decoder::Duplicated(c) => c.retain(rows),
        }
    }
}

/// `cfg.num_samples` continuations of `prompt`, decoded in one batch: the prompt is encoded
/// once, every sample draws its first token from those logits with its own RNG stream, then each
/// step feeds one token per unfinished sample. Sample `i` is exactly what
/// `generate(model, prompt, cfg.max_new_tokens, cfg.sampling, sample_seed(cfg.seed, i))` returns,
/// cut after its first `cfg.stop` token; samples that stop leave the batch.
pub fn generate_batch(model: &Gpt2, prompt: &[u32], cfg: &BatchConfig) -> Result<Generated> {
    if prompt.is_empty() {
        bail!("generate_batch: the prompt must hold at least one token")
    }
    if cfg.num_samples == 0 {
        bail!("generate_batch: num_samples must be at least 1")
    }
    let n_ctx = model.config().n_positions;
    if prompt.len() > n_ctx {
        bail!(
            "generate_batch: prompt of {} tokens exceeds n_positions = {n_ctx}",
            prompt.len()
        )
    }
    let n = cfg.num_samples;
    let steps = cfg.max_new_tokens.min(n_ctx - prompt.len());
    let mut sequences = vec![prompt.to_vec(); n];
    let mut rngs: Vec<CounterRng> = (0..n)
        .map(|i| CounterRng::new(sample_seed(cfg.seed, i)))
        .collect();
    let t0 = Instant::now();
    if steps == 0 {
        return Ok(Generated {
            sequences,
            prefill: t0.elapsed(),
            decode: Duration::ZERO,
        });
    }
    let mut cache = KvCache::default();
    let ids = Tensor::new(prompt, model.device())?.unsqueeze(0)?;
    let logits = model.prefill(&ids, &mut cache)?;
    let mut rows = vec![last_logits(&logits)?.remove(0)];
    let dense = model.config().sparsity.is_dense();
    let mut decoder = match cfg.cache {
        BatchCache::SharedPrefix if dense => {
            Decoder::Shared(SharedPrefixCache::from_prefix(cache)?)
        }
        BatchCache::SharedPrefix | BatchCache::Duplicated => {
            Decoder::Duplicated(cache.repeat(n, steps)?.with_flash_decoding(true))
        }
    };
    let mut active: Vec<usize> = (0..n).collect();
    let mut prefill = None;
    for step in 0..steps {
        // Step 0 draws every sample from the prompt's one row of logits.
        for (j, &i) in active.iter().enumerate() {
            let row = &rows[if step == 0 { 0 } else { j }];
            let next = choose(row, cfg.sampling, &mut rngs[i])?;
            sequences[i].push(next);
        }
        prefill.get_or_insert_with(|| t0.elapsed());
        if step + 1 == steps {
            break;
        }
        let keep: Vec<usize> = (0..active.len())
            .filter(|&j| Some(*sequences[active[j]].last().unwrap()) != cfg.stop)
            .collect();
        if keep.is_empty() {
            break;
        }
        if keep.len() < active.len() {
            decoder.retain(&keep)?;
            active = keep.iter().map(|&j| active[j]).collect();
        }
        let last: Vec<u32> = active
            .iter()
            .map(|&i| *sequences[i].last().unwrap())
            .collect();
        let ids = Tensor::new(last.as_slice(), model.device())?.unsqueeze(1)?;
        rows = last_logits(&decoder.step(model, &ids)?)?;
    }
    let prefill = prefill.unwrap_or_else(|| t0.elapsed());
    Ok(Generated {
        sequences,
        prefill,
        decode: t0.elapsed() - prefill,
    })
}

/// The last position's logits of each row of `(b, t, vocab)`, as f32.
fn last_logits(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    let t = logits.dim(1)?;
    logits
        .narrow(1, t - 1, 1)?
        .squeeze(1)?
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()
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
