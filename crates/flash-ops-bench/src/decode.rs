//! One decoding step: a single query row per head against a long KV cache, forward only. It
//! reads every key and value once and does 4·sk·d FLOPs per query head, so its roof is memory
//! bandwidth: the time to read K and V at [`read_bandwidth`](crate::read_bandwidth).

use candle_core::{DType, Device, Result, Tensor};
use flash_ops::{flash_attn, AttnOptions};

use crate::measure::median_ms;

/// `(1, 1, hq, d)` queries against `(1, sk, hk, d)` keys and values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeWorkload {
    pub sk: usize,
    pub heads_q: usize,
    pub heads_k: usize,
    pub d: usize,
}

impl DecodeWorkload {
    /// Bytes of K and V in `dtype`: what one step must read.
    pub fn kv_bytes(&self, dtype: DType) -> usize {
        2 * self.sk * self.heads_k * self.d * dtype.size_in_bytes()
    }
}

/// Median forward time (ms, after a warm-up) of flash-ops V2 on one decode step.
pub fn measure_decode(w: &DecodeWorkload, reps: usize, dtype: DType) -> Result<f64> {
    let dev = Device::Cpu;
    let t = |s: usize, h: usize| Tensor::randn(0f32, 1.0, (1, s, h, w.d), &dev)?.to_dtype(dtype);
    let (q, k, v) = (t(1, w.heads_q)?, t(w.sk, w.heads_k)?, t(w.sk, w.heads_k)?);
    let opts = AttnOptions::new();
    let step = || flash_attn(&q, &k, &v, &opts).map(drop);
    step()?;
    median_ms(&dev, reps, step)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_bytes_count_keys_and_values() -> Result<()> {
        let w = DecodeWorkload {
            sk: 4096,
            heads_q: 32,
            heads_k: 8,
            d: 128,
        };
        assert_eq!(w.kv_bytes(DType::F32), 2 * 4096 * 8 * 128 * 4);
        assert_eq!(w.kv_bytes(DType::BF16), 2 * 4096 * 8 * 128 * 2);
        assert!(measure_decode(&DecodeWorkload { sk: 300, ..w }, 1, DType::F32)? > 0.0);
        Ok(())
    }
}
