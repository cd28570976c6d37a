//! Every parameter receives its true gradient: autograd against central finite differences in
//! f64 (naive attention, the only kind that runs f64), on tiny GPT-2 and BERT models, in eval and
//! in training mode (dropout masks are fixed by the seed, so the loss is a smooth function of
//! the parameters). Each parameter tensor is checked along a random direction (covers the whole
//! tensor) and at two random coordinates, and its gradient must be non-zero.
//! That the flash kinds give the same gradients as naive is in `attention_kinds.rs`.

mod common;

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::{gradient_is_zero_by_design, named_vars, random_model};
use flash_ops_models::{
    AttentionKind, BertConfig, BertForMaskedLM, BertForSequenceClassification, BertInput, Gpt2,
    Gpt2Config,
};
use flash_test_support::Rng;

const EPS: f64 = 1e-5;
/// Candle's GELU backward uses 6-digit constants (relative error ~1e-6); anything wrong or
/// missing is off by O(1).
const TOL: f64 = 1e-4;

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_scalar::<f64>()?)
}

/// Checks every parameter's gradient of `loss(train)` in eval and in training mode.
fn check_gradients(name: &str, vm: &VarMap, loss: &dyn Fn(bool) -> Result<Tensor>) -> Result<()> {
    for train in [false, true] {
        check_gradients_of(&format!("{name} train={train}"), vm, &|| loss(train))?;
    }
    Ok(())
}

fn check_gradients_of(name: &str, vm: &VarMap, loss: &dyn Fn() -> Result<Tensor>) -> Result<()> {
    let grads = loss()?.backward()?;
    let mut rng = Rng::new(7);
    let vars = named_vars(vm);
    let mut worst = 0f64;
    let mut all = Vec::new();
    for (pname, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .ok_or_else(|| anyhow::anyhow!("{name}: `{pname}` received no gradient"))?
            .clone();
        let norm = scalar(&g.sqr()?.sum_all()?)?.sqrt();
        all.push((g, norm));
    }
    let max_norm = all.iter().map(|(_, n)| *n).fold(0.0, f64::max);
    for ((pname, var), (g, norm)) in vars.iter().zip(all) {
        if gradient_is_zero_by_design(pname) {
            // Exactly zero in exact arithmetic: only rounding noise may remain.
            ensure!(
                norm <= 1e-9 * max_norm,
                "{name}: `{pname}` should have a zero gradient, norm {norm:.3e}"
            );
        } else {
            ensure!(
                norm > 1e-6 * max_norm,
                "{name}: `{pname}` has a (near) zero gradient, norm {norm:.3e}"
            );
        }
        let orig = var.as_tensor().copy()?;
        let probe = |dir: &Tensor| -> Result<(f64, f64)> {
            var.set(&(&orig + (dir * EPS)?)?)?;
            let lp = scalar(&loss()?)?;
            var.set(&(&orig - (dir * EPS)?)?)?;
            let lm = scalar(&loss()?)?;
            var.set(&orig)?;
            Ok(((lp - lm) / (2.0 * EPS), scalar(&(&g * dir)?.sum_all()?)?))
        };
        // A random direction, then two single coordinates.
        let mut dirs = vec![rng.normal_tensor(var.dims(), 1.0, DType::F64)?];
        let n = var.elem_count();
        for _ in 0..2 {
            let mut e = vec![0f64; n];
            e[rng.below(n)] = 1.0;
            dirs.push(Tensor::from_vec(e, var.dims(), &candle_core::Device::Cpu)?);
        }
        for (i, dir) in dirs.iter().enumerate() {
            let (fd, an) = probe(dir)?;
            // Relative to the directional scale so that tiny coordinates do not fail on noise.
            let scale = fd.abs().max(an.abs()).max(1e-3 * norm.max(1e-3 * max_norm));
            let e = (fd - an).abs() / scale;
            worst = worst.max(e);
            ensure!(
                e < TOL,
                "{name}: `{pname}` probe {i}: finite difference {fd:.8e} vs autograd {an:.8e} (rel {e:.2e})"
            );
        }
    }
    println!(
        "{name}: {} parameter tensors, worst rel err {worst:.2e}",
        vars.len()
    );
    Ok(())
}

fn small_gpt2() -> Gpt2Config {
    Gpt2Config {
        vocab_size: 40,
        n_positions: 16,
        n_embd: 16,
        n_head: 2,
        ..Gpt2Config::tiny()
    }
}

fn small_bert() -> BertConfig {
    BertConfig {
        vocab_size: 40,
        hidden_size: 16,
        intermediate_size: 32,
        num_attention_heads: 2,
        max_position_embeddings: 16,
        ..BertConfig::tiny()
    }
}

/// The model `build` makes, in f64 on the naive attention (the only kind that runs f64),
/// with parameters randomized from `seed`, and the inputs' random source, seeded `seed + 1`.
fn f64_model<M>(
    seed: u64,
    build: impl FnOnce(VarBuilder<'static>, AttentionKind) -> candle_core::Result<M>,
) -> Result<(VarMap, M, Rng)> {
    let (vm, m) = random_model(DType::F64, seed, |vb| build(vb, AttentionKind::Naive))?;
    Ok((vm, m, Rng::new(seed + 1)))
}

#[test]
fn gpt2_every_parameter_gradient_matches_finite_differences() -> Result<()> {
    let cfg = small_gpt2();
    let (vm, m, mut rng) = f64_model(11, |vb, attn| Gpt2::new(&cfg, vb, attn))?;
    // Every position index is used, so every row of `wpe` gets a gradient.
    let ids = rng.ids(2, cfg.n_positions, cfg.vocab_size)?;
    let w = rng.normal_tensor(&[2, cfg.n_positions, cfg.vocab_size], 1.0, DType::F64)?;
    check_gradients("gpt2", &vm, &|train| {
        m.set_dropout_seed(3);
        Ok((m.forward(&ids, train)? * &w)?.sum_all()?)
    })
}

#[test]
fn bert_mlm_every_parameter_gradient_matches_finite_differences() -> Result<()> {
    let cfg = small_bert();
    let (vm, m, mut rng) = f64_model(13, |vb, attn| BertForMaskedLM::new(&cfg, vb, attn))?;
    let t = cfg.max_position_embeddings;
    let ids = rng.ids(2, t, cfg.vocab_size)?;
    let tt = rng.ids(2, t, 2)?;
    let lengths = [t, t - 5];
    let w = rng.normal_tensor(&[2, t, cfg.vocab_size], 1.0, DType::F64)?;
    check_gradients("bert-mlm", &vm, &|train| {
        m.set_dropout_seed(4);
        let out = m.forward_with_token_types(
            BertInput::new(&ids, &lengths).with_token_types(&tt),
            train,
        )?;
        Ok((out * &w)?.sum_all()?)
    })
}

#[test]
fn bert_classifier_every_parameter_gradient_matches_finite_differences() -> Result<()> {
    let cfg = small_bert().with_num_labels(3);
    let (vm, m, mut rng) = f64_model(15, |vb, attn| {
        BertForSequenceClassification::new(&cfg, vb, attn)
    })?;
    let t = cfg.max_position_embeddings;
    let ids = rng.ids(3, t, cfg.vocab_size)?;
    let tt = rng.ids(3, t, 2)?;
    let lengths = [t, 9, 4];
    let labels = Tensor::new(&[0u32, 2, 1], &candle_core::Device::Cpu)?;
    check_gradients("bert-cls", &vm, &|train| {
        m.set_dropout_seed(6);
        let logits = m.forward(BertInput::new(&ids, &lengths).with_token_types(&tt), train)?;
        Ok(candle_nn::loss::cross_entropy(&logits, &labels)?)
    })
}
