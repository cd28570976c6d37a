//! Seeded dropout for the residual and embedding streams.
//!
//! The mask is a pure function of `(seed, element index)` through Philox4x32-10, the generator
//! the attention op uses for its own dropout. So a training forward is reproducible from its seed,
//! and the three attention kinds see identical masks everywhere (the attention dropout of the
//! naive reference and of the fused op also agree for a given seed), which is what lets the
//! tests compare them in training mode too.

use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{bail, Device, Result, Tensor};
use flash_ops::dropout::philox4x32_10;

use crate::rng::splitmix64;

/// The dropout state of one forward pass: off in eval, otherwise one base seed from which every
/// dropout site (embedding, each layer's attention probabilities and residual branches) derives
/// its own stream.
#[derive(Debug, Clone, Copy)]
pub struct DropoutCtx {
    pub train: bool,
    pub seed: u64,
}

impl DropoutCtx {
    pub fn eval() -> Self {
        Self {
            train: false,
            seed: 0,
        }
    }

    /// The seed of dropout site `site` (distinct per layer and per use within a layer).
    pub fn site_seed(&self, site: u64) -> u64 {
        splitmix64(self.seed ^ splitmix64(site))
    }

    /// Whether dropout with probability `p` is active.
    pub fn active(&self, p: f32) -> bool {
        self.train && p > 0.0
    }

    /// Inverted dropout of `x` at site `site` (identity in eval or when `p == 0`).
    pub fn apply(&self, x: &Tensor, p: f32, site: u64) -> Result<Tensor> {
        if !self.active(p) {
            return Ok(x.clone());
        }
        let mask = keep_mask(x.elem_count(), p, self.site_seed(site))?
            .reshape(x.shape())?
            .to_dtype(x.dtype())?
            .to_device(x.device())?;
        x * mask
    }
}

/// `1/(1-p)` for kept elements, 0 for dropped ones, as an f32 vector on the CPU.
fn keep_mask(n: usize, p: f32, seed: u64) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        bail!("dropout probability must be in [0, 1), got {p}")
    }
    let rule = flash_ops::Dropout { p, seed };
    let (threshold, keep) = (rule.threshold(), rule.keep_scale());
    let key = [seed as u32, (seed >> 32) as u32];
    let mut out = vec![0f32; n];
    for (block, chunk) in out.chunks_mut(4).enumerate() {
        let b = block as u64;
        let draws = philox4x32_10([b as u32, (b >> 32) as u32, 0x5EED, 0], key);
        for (o, &d) in chunk.iter_mut().zip(draws.iter()) {
            *o = if d >= threshold { keep } else { 0.0 };
        }
    }
    Tensor::from_vec(out, n, &Device::Cpu)
}

/// Per-model seed counter: each training forward takes the next seed, so masks differ between
/// steps; `set` makes a run reproducible.
#[derive(Debug, Default)]
pub struct SeedCounter(AtomicU64);

impl SeedCounter {
    pub fn new(seed: u64) -> Self {
        Self(AtomicU64::new(seed))
    }

    pub fn set(&self, seed: u64) {
        self.0.store(seed, Ordering::Relaxed)
    }

    /// The context of one forward pass; consumes a seed only in training.
    pub fn ctx(&self, train: bool) -> DropoutCtx {
        if !train {
            return DropoutCtx::eval();
        }
        DropoutCtx {
            train,
            seed: splitmix64(self.0.fetch_add(1, Ordering::Relaxed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_rate_and_scale() -> Result<()> {
        let n = 40_000;
        let m = keep_mask(n, 0.3, 7)?.to_vec1::<f32>()?;
        let kept = m.iter().filter(|&&x| x > 0.0).count() as f64 / n as f64;
        assert!((kept - 0.7).abs() < 0.01, "kept fraction {kept}");
        assert!(m.iter().all(|&x| x == 0.0 || (x - 1.0 / 0.7).abs() < 1e-6));
        // Deterministic in the seed, different across seeds.
        assert_eq!(m, keep_mask(n, 0.3, 7)?.to_vec1::<f32>()?);
        assert_ne!(m, keep_mask(n, 0.3, 8)?.to_vec1::<f32>()?);
        Ok(())
    }
}
