//! Helpers shared by the model tests: random parameters, parameter maps (the random source and
//! the relative error are flash-test-support's).
#![allow(dead_code)]

use candle_core::{DType, Device, Result, Var};
use candle_nn::{VarBuilder, VarMap};
use flash_ops_models::{AttentionKind, Gpt2, Gpt2Config};
use flash_test_support::Rng;

/// A fresh `VarMap` and a `VarBuilder` creating parameters in it.
pub fn varmap(dtype: DType) -> (VarMap, VarBuilder<'static>) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, dtype, &Device::Cpu);
    (vm, vb)
}

/// A model that `build` makes on fresh variables of `dtype`, then [`randomize`]d with `seed`.
pub fn random_model<M>(
    dtype: DType,
    seed: u64,
    build: impl FnOnce(VarBuilder<'static>) -> Result<M>,
) -> Result<(VarMap, M)> {
    let (vm, vb) = varmap(dtype);
    let m = build(vb)?;
    randomize(&vm, seed)?;
    Ok((vm, m))
}

/// The tiny GPT-2 in f32 with [`randomize`]d parameters (the `VarMap` keeps them alive).
pub fn tiny_gpt2(attn: AttentionKind, seed: u64) -> Result<(VarMap, Gpt2)> {
    random_model(DType::F32, seed, |vb| {
        Gpt2::new(&Gpt2Config::tiny(), vb, attn)
    })
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
    let mut rng = Rng::new(seed);
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
