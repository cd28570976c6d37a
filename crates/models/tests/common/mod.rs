//! Helpers shared by the model tests: random parameters and inputs, relative errors.
#![allow(dead_code)]

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

/// `‖a − b‖ / ‖b‖` over all elements, in f64.
pub fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    let num = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let den = b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(num / den.max(1e-300))
}

/// Deterministic pseudo-random stream (SplitMix64) for inputs and parameters.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform().max(1e-300), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn normal_tensor(&mut self, dims: &[usize], std: f64, dtype: DType) -> Result<Tensor> {
        let n: usize = dims.iter().product();
        let v: Vec<f64> = (0..n).map(|_| self.normal() * std).collect();
        Tensor::from_vec(v, dims, &Device::Cpu)?.to_dtype(dtype)
    }
    pub fn ids(&mut self, b: usize, t: usize, vocab: usize) -> Result<Tensor> {
        let v: Vec<u32> = (0..b * t).map(|_| self.below(vocab) as u32).collect();
        Tensor::from_vec(v, (b, t), &Device::Cpu)
    }
}

/// A fresh `VarMap` and a `VarBuilder` creating parameters in it.
pub fn varmap(dtype: DType) -> (VarMap, VarBuilder<'static>) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, dtype, &Device::Cpu);
    (vm, vb)
}

/// Sorted (name, var) pairs of a `VarMap`.
pub fn named_vars(vm: &VarMap) -> Vec<(String, Var)> {
    let mut v: Vec<(String, Var)> = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Replaces every parameter by random values of a scale that makes attention non-uniform and
/// biases, LayerNorm gains and offsets non-trivial (initial values are zeros and ones).
pub fn randomize(vm: &VarMap, seed: u64) -> Result<()> {
    let mut rng = Rng(seed);
    for (name, var) in named_vars(vm) {
        let dims = var.dims().to_vec();
        let t = if name.contains("LayerNorm") || name.contains("ln_") {
            if name.ends_with("weight") || name.ends_with("gamma") {
                (rng.normal_tensor(&dims, 0.2, DType::F64)? + 1.0)?
            } else {
                rng.normal_tensor(&dims, 0.2, DType::F64)?
            }
        } else if name.ends_with("bias") {
            rng.normal_tensor(&dims, 0.1, DType::F64)?
        } else {
            // Fan-in scaled so activations stay O(1) through the layers.
            let fan_in = if dims.len() == 2 {
                dims[1].min(dims[0])
            } else {
                1
            };
            rng.normal_tensor(&dims, 1.2 / (fan_in as f64).sqrt(), DType::F64)?
        };
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// Copies parameter values from `src` into `dst` (same names), converting dtype.
pub fn copy_params(src: &VarMap, dst: &VarMap) -> Result<()> {
    let s = src.data().lock().unwrap();
    for (name, var) in dst.data().lock().unwrap().iter() {
        var.set(&s[name].as_tensor().to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// Parameters whose true gradient is exactly zero: a key bias adds `q·b` to every score of a
/// query row, which softmax cancels (shift invariance). BERT has a separate key bias; GPT-2's is
/// a slice of `c_attn.bias` whose other slices are live.
pub fn gradient_is_zero_by_design(name: &str) -> bool {
    name.ends_with("attention.self.key.bias")
}
