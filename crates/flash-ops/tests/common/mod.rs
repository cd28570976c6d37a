//! Shared helpers of the flash-ops integration tests: seeded random tensors, the f64 oracle
//! comparison and relative errors.
#![allow(dead_code)]

use candle_core::{DType, Device, Result, Tensor, Var};
use flash_ops::{reference, AttnOptions};

/// SplitMix64: a seeded, dependency-free source of test data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn tensor(&mut self, dims: &[usize]) -> Tensor {
        let n: usize = dims.iter().product();
        let data: Vec<f64> = (0..n).map(|_| self.normal()).collect();
        Tensor::from_vec(data, dims, &Device::Cpu).unwrap()
    }
}

/// ‖a − b‖₂ / ‖b‖₂, computed in f64 (0 when both are zero).
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let av: Vec<f64> = a.to_vec1().unwrap();
    let bv: Vec<f64> = b.to_vec1().unwrap();
    assert_eq!(av.len(), bv.len());
    let num: f64 = av.iter().zip(&bv).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = bv.iter().map(|y| y * y).sum();
    if den == 0.0 {
        return num.sqrt();
    }
    (num / den).sqrt()
}

/// Output and gradients of one attention implementation for upstream gradient `d_out`.
pub struct Run {
    pub out: Tensor,
    pub lse: Tensor,
    pub dq: Tensor,
    pub dk: Tensor,
    pub dv: Tensor,
}

/// Runs `f` on `(q, k, v)` converted to `dtype`, then backward with `d_out`.
pub fn run_with_grads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    d_out: &Tensor,
    dtype: DType,
    f: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<(Tensor, Tensor)>,
) -> Result<Run> {
    let qv = Var::from_tensor(&q.to_dtype(dtype)?)?;
    let kv = Var::from_tensor(&k.to_dtype(dtype)?)?;
    let vv = Var::from_tensor(&v.to_dtype(dtype)?)?;
    let (out, lse) = f(qv.as_tensor(), kv.as_tensor(), vv.as_tensor())?;
    let loss = (out.to_dtype(DType::F64)? * d_out)?.sum_all()?;
    let grads = loss.backward()?;
    let get = |v: &Var| grads.get(v.as_tensor()).cloned().expect("gradient");
    Ok(Run {
        dq: get(&qv),
        dk: get(&kv),
        dv: get(&vv),
        out,
        lse,
    })
}

/// The f64 oracle on dense inputs.
pub fn oracle(q: &Tensor, k: &Tensor, v: &Tensor, d_out: &Tensor, opts: &AttnOptions) -> Run {
    run_with_grads(q, k, v, d_out, DType::F64, |q, k, v| {
        reference::naive_attention_with_lse(q, k, v, opts)
    })
    .unwrap()
}

/// Relative error of two log-sum-exps; rows that saw no key must be `-inf` in both.
pub fn lse_err(a: &Tensor, b: &Tensor) -> f64 {
    let av: Vec<f64> = a
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let bv: Vec<f64> = b
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(av.len(), bv.len());
    let (mut num, mut den) = (0.0, 0.0);
    for (x, y) in av.iter().zip(&bv) {
        if y.is_infinite() {
            assert_eq!(x, y, "a row that sees no key must have lse = -inf");
            continue;
        }
        num += (x - y) * (x - y);
        den += y * y;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Relative errors of (out, dq, dk, dv) of `got` against `want`.
pub fn errors(got: &Run, want: &Run) -> [f64; 4] {
    [
        rel_err(&got.out, &want.out),
        rel_err(&got.dq, &want.dq),
        rel_err(&got.dk, &want.dk),
        rel_err(&got.dv, &want.dv),
    ]
}
