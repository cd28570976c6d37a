//! The seeded random source of every suite: ChaCha8 (a stream that does not depend on the
//! platform or on the `rand` version's choice of default generator).

use candle_core::{DType, Device, Result, Tensor};
use rand::{Rng as _, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

pub struct Rng(ChaCha8Rng);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(ChaCha8Rng::seed_from_u64(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        self.0.random()
    }

    pub fn normal(&mut self) -> f64 {
        self.0.sample(StandardNormal)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        self.0.random_range(0..n)
    }

    /// Standard normal f64 tensor on the CPU.
    pub fn tensor(&mut self, dims: &[usize]) -> Tensor {
        let n: usize = dims.iter().product();
        let data: Vec<f64> = (0..n).map(|_| self.normal()).collect();
        Tensor::from_vec(data, dims, &Device::Cpu).expect("dims match the data")
    }

    /// A dense attention problem, standard normal f64 drawn in this order: q `(b, sq, hq, d)`,
    /// k and v `(b, sk, hk, d)`, and an upstream gradient shaped like q.
    pub fn attn_inputs(&mut self, dims: (usize, usize, usize, usize, usize, usize)) -> [Tensor; 4] {
        let (b, sq, sk, hq, hk, d) = dims;
        [
            self.tensor(&[b, sq, hq, d]),
            self.tensor(&[b, sk, hk, d]),
            self.tensor(&[b, sk, hk, d]),
            self.tensor(&[b, sq, hq, d]),
        ]
    }

    /// Normal tensor with standard deviation `std`, in `dtype`, on the CPU.
    pub fn normal_tensor(&mut self, dims: &[usize], std: f64, dtype: DType) -> Result<Tensor> {
        (self.tensor(dims) * std)?.to_dtype(dtype)
    }

    /// `(b, t)` u32 token ids below `vocab`.
    pub fn ids(&mut self, b: usize, t: usize, vocab: usize) -> Result<Tensor> {
        let v: Vec<u32> = (0..b * t).map(|_| self.below(vocab) as u32).collect();
        Tensor::from_vec(v, (b, t), &Device::Cpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_other_seed_other_stream() {
        let (mut a, mut b, mut c) = (Rng::new(1), Rng::new(1), Rng::new(2));
        let xa: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        let xb: Vec<u64> = (0..8).map(|_| b.next_u64()).collect();
        let xc: Vec<u64> = (0..8).map(|_| c.next_u64()).collect();
        assert_eq!(xa, xb);
        assert_ne!(xa, xc);
    }

    #[test]
    fn distributions_have_their_moments() {
        let mut r = Rng::new(3);
        let n = 200_000;
        let u: Vec<f64> = (0..n).map(|_| r.uniform()).collect();
        assert!(u.iter().all(|x| (0.0..1.0).contains(x)));
        let mean = u.iter().sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 5e-3, "uniform mean {mean}");
        let z: Vec<f64> = (0..n).map(|_| r.normal()).collect();
        let m = z.iter().sum::<f64>() / n as f64;
        let var = z.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n as f64;
        assert!(
            m.abs() < 1e-2 && (var - 1.0).abs() < 2e-2,
            "normal {m} {var}"
        );
        let mut hits = [0usize; 3];
        for _ in 0..30_000 {
            hits[r.below(3)] += 1;
        }
        assert!(
            hits.iter().all(|&h| (9_000..11_000).contains(&h)),
            "{hits:?}"
        );
    }
}
