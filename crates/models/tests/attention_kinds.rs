//! Same weights, same input: the three attention kinds give the same logits and the same
//! parameter gradients, for GPT-2 (causal) and BERT (padded batch), in eval and in training
//! (dropout masks are functions of the seed, shared by all kinds); the same with a block-sparse
//! pattern on the configs (naive applies the expanded mask: it is the oracle).

mod common;

use anyhow::Result;
use candle_core::{DType, Tensor};
use common::{gradient_is_zero_by_design, named_vars, randomize, varmap};
use flash_ops_models::{
    generate, generate_batch, AttentionKind, BatchCache, BatchConfig, BertConfig, BertForMaskedLM,
    Gpt2, Gpt2Config, KvCache, Sampling, Sparsity,
};
use flash_test_support::{rel_err, Rng};

const FLASH: [AttentionKind; 2] = [AttentionKind::FlashV1, AttentionKind::FlashV2];

fn gpt2(dtype: DType, seed: u64) -> Result<(candle_nn::VarMap, Gpt2)> {
    gpt2_with(&Gpt2Config::tiny(), dtype, seed)
}

fn gpt2_with(cfg: &Gpt2Config, dtype: DType, seed: u64) -> Result<(candle_nn::VarMap, Gpt2)> {
    let (vm, vb) = varmap(dtype);
    let m = Gpt2::new(cfg, vb, AttentionKind::Naive)?;
    randomize(&vm, seed)?;
    Ok((vm, m))
}

fn bert(dtype: DType, seed: u64) -> Result<(candle_nn::VarMap, BertForMaskedLM)> {
    bert_with(&BertConfig::tiny(), dtype, seed)
}

fn bert_with(
    cfg: &BertConfig,
    dtype: DType,
    seed: u64,
) -> Result<(candle_nn::VarMap, BertForMaskedLM)> {
    let (vm, vb) = varmap(dtype);
    let m = BertForMaskedLM::new(cfg, vb, AttentionKind::Naive)?;
    randomize(&vm, seed)?;
    Ok((vm, m))
}

/// Right-padded ids: row i has `lengths[i]` random tokens, then the pad id 0.
fn padded_ids(rng: &mut Rng, lengths: &[usize], t: usize, vocab: usize) -> Result<Tensor> {
    let mut v = Vec::new();
    for &l in lengths {
        for j in 0..t {
            v.push(if j < l {
                1 + rng.below(vocab - 1) as u32
            } else {
                0
            });
        }
    }
    Ok(Tensor::from_vec(
        v,
        (lengths.len(), t),
        &candle_core::Device::Cpu,
    )?)
}

/// Every parameter's gradient of `sum(out * weights)`, by name.
fn grads_of(
    vm: &candle_nn::VarMap,
    out: &Tensor,
    weights: &Tensor,
) -> Result<Vec<(String, Tensor)>> {
    let g = (out * weights)?.sum_all()?.backward()?;
    named_vars(vm)
        .into_iter()
        .map(|(n, v)| {
            let grad = g
                .get(v.as_tensor())
                .ok_or_else(|| anyhow::anyhow!("no gradient for {n}"))?
                .clone();
            Ok((n, grad))
        })
        .collect()
}

fn norm(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f64>()?
        .sqrt())
}

/// Relative error of one parameter's gradient; a gradient that is zero by design is compared
/// against the scale of all gradients instead of its own (rounding noise).
fn grad_err(name: &str, g: &Tensor, r: &Tensor, all: &[(String, Tensor)]) -> Result<f64> {
    if gradient_is_zero_by_design(name) {
        let scale = all.iter().map(|(_, t)| norm(t)).sum::<Result<f64>>()? / all.len() as f64;
        return Ok(norm(&(g - r)?)?.max(norm(r)?) / scale);
    }
    Ok(rel_err(g, r))
}

/// Each flash kind against naive, in eval and in training (same dropout seed): logits and every
/// parameter gradient of `sum(logits · w)`, `w` random. `run(kind, train)` selects the kind,
/// sets the dropout seed and runs the model.
fn agree_across_kinds(
    model: &str,
    vm: &candle_nn::VarMap,
    rng: &mut Rng,
    mut run: impl FnMut(AttentionKind, bool) -> Result<Tensor>,
) -> Result<()> {
    for train in [false, true] {
        let reference = run(AttentionKind::Naive, train)?;
        let w = rng.normal_tensor(reference.dims(), 1.0, DType::F32)?;
        let ref_grads = grads_of(vm, &reference, &w)?;
        for kind in FLASH {
            let out = run(kind, train)?;
            let e = rel_err(&out, &reference);
            println!("{model} train={train} {kind}: logits rel err {e:.2e}");
            assert!(e < 1e-5, "{model} {kind} train={train}: logits rel err {e}");
            let mut worst = 0f64;
            for ((name, g), (_, r)) in grads_of(vm, &out, &w)?.iter().zip(&ref_grads) {
                let e = grad_err(name, g, r, &ref_grads)?;
                assert!(
                    e < 1e-4,
                    "{model} {kind} train={train}: grad {name} rel err {e}"
                );
                worst = worst.max(e);
            }
            println!("{model} train={train} {kind}: worst parameter-gradient rel err {worst:.2e}");
        }
    }
    Ok(())
}

#[test]
fn gpt2_logits_and_gradients_agree_across_kinds() -> Result<()> {
    let (vm, mut m) = gpt2(DType::F32, 1)?;
    let mut rng = Rng::new(10);
    let ids = rng.ids(3, 48, m.config().vocab_size)?;
    agree_across_kinds("gpt2", &vm, &mut rng, |kind, train| {
        m.set_attention(kind);
        m.set_dropout_seed(99);
        Ok(m.forward(&ids, train)?)
    })?;
    // Dropout is really on in training, and a fresh seed per call changes the masks.
    let a = m.forward(&ids, true)?;
    let b = m.forward(&ids, true)?;
    assert!(rel_err(&a, &b) > 1e-3);
    assert!(rel_err(&m.forward(&ids, false)?, &m.forward(&ids, false)?) == 0.0);
    Ok(())
}

#[test]
fn bert_padded_batch_logits_and_gradients_agree_across_kinds() -> Result<()> {
    let (vm, mut m) = bert(DType::F32, 2)?;
    let mut rng = Rng::new(20);
    let lengths = [40, 29, 13];
    let ids = padded_ids(&mut rng, &lengths, 40, m.config().vocab_size)?;
    agree_across_kinds("bert", &vm, &mut rng, |kind, train| {
        m.set_attention(kind);
        m.set_dropout_seed(5);
        Ok(m.forward(&ids, &lengths, train)?)
    })
}

fn sparsity(pattern: &str) -> Result<Sparsity> {
    pattern.parse().map_err(anyhow::Error::msg)
}

/// The pattern changes the output (so the agreement below is not that of two dense models).
fn assert_pattern_applies(pattern: &str, sparse: &Tensor, dense: &Tensor) {
    let changed = rel_err(sparse, dense);
    assert!(
        changed > 1e-3,
        "{pattern}: same output as dense ({changed})"
    );
}

/// Block-sparse patterns (16×16 blocks over 48 tokens: edge blocks partial, some rows with one
/// block) on GPT-2: every kind gives naive's logits and gradients, and the causal LM loss of
/// naive and flash2 agree with every parameter gradient within 1e-5 (f32). The pattern really
/// applies: the logits differ from the dense model's with the same weights.
#[test]
fn gpt2_block_sparse_agrees_across_kinds() -> Result<()> {
    let mut rng = Rng::new(50);
    let ids = rng.ids(2, 48, Gpt2Config::tiny().vocab_size)?;
    let targets = rng.ids(2, 48, Gpt2Config::tiny().vocab_size)?;
    let (_, dense) = gpt2(DType::F32, 6)?;
    let dense_logits = dense.forward(&ids, false)?;
    for pattern in [
        "local:20@16x16",
        "strided:16@16x32",
        "butterfly@16x16",
        "local-global:8,5@32x16",
        "random:0.5:3@16x16",
    ] {
        let (vm, mut m) = gpt2_with(
            &Gpt2Config {
                sparsity: sparsity(pattern)?,
                ..Gpt2Config::tiny()
            },
            DType::F32,
            6,
        )?;
        assert_pattern_applies(pattern, &m.forward(&ids, false)?, &dense_logits);
        agree_across_kinds(&format!("gpt2 {pattern}"), &vm, &mut rng, |kind, train| {
            m.set_attention(kind);
            m.set_dropout_seed(99);
            Ok(m.forward(&ids, train)?)
        })?;
        let mut loss = |kind| -> Result<(f32, Vec<(String, Tensor)>)> {
            m.set_attention(kind);
            m.set_dropout_seed(7);
            let l = m.loss(&ids, &targets, true)?;
            Ok((
                l.to_scalar()?,
                grads_of(&vm, &l, &Tensor::new(1f32, l.device())?)?,
            ))
        };
        let (l_ref, g_ref) = loss(AttentionKind::Naive)?;
        let (l, g) = loss(AttentionKind::FlashV2)?;
        let e = ((l - l_ref) / l_ref).abs();
        assert!(e <= 1e-5, "{pattern}: loss {l} vs naive {l_ref}");
        for ((name, g), (_, r)) in g.iter().zip(&g_ref) {
            let e = grad_err(name, g, r, &g_ref)?;
            assert!(e <= 1e-5, "{pattern}: loss gradient {name} rel err {e}");
        }
    }
    Ok(())
}

/// Decoding with a KV cache applies the rows of the full-length mask: a prompt, then one token
/// at a time, gives the logits of one forward over the whole sequence (each kind, with and
/// without flash decoding, which a sparse model bypasses).
#[test]
fn gpt2_block_sparse_decoding_matches_the_full_forward() -> Result<()> {
    let cfg = Gpt2Config {
        sparsity: sparsity("random:0.5:11@16x16")?,
        ..Gpt2Config::tiny()
    };
    let (_, mut m) = gpt2_with(&cfg, DType::F32, 8)?;
    let ids = Rng::new(70).ids(1, 40, cfg.vocab_size)?;
    for kind in AttentionKind::ALL {
        m.set_attention(kind);
        let full = m.forward(&ids, false)?;
        for split_kv in [false, true] {
            let mut cache = KvCache::default().with_flash_decoding(split_kv);
            let mut parts = vec![m.forward_with_cache(&ids.narrow(1, 0, 21)?, &mut cache)?];
            for t in 21..40 {
                parts.push(m.forward_with_cache(&ids.narrow(1, t, 1)?, &mut cache)?);
            }
            let e = rel_err(&Tensor::cat(&parts, 1)?, &full);
            assert!(e < 1e-5, "{kind} split_kv={split_kv}: rel err {e}");
        }
    }
    // Batched sampling (its default cache is shared-prefix, which takes no block mask): sample 0
    // is what sampling alone gives.
    let sampling = Sampling::TopK {
        k: 20,
        temperature: 1.0,
    };
    let prompt: Vec<u32> = ids.narrow(1, 0, 9)?.flatten_all()?.to_vec1()?;
    let cfg = BatchConfig {
        num_samples: 3,
        max_new_tokens: 12,
        sampling,
        seed: 4,
        stop: None,
        cache: BatchCache::default(),
    };
    let batch = generate_batch(&m, &prompt, &cfg)?;
    assert_eq!(batch.sequences[0], generate(&m, &prompt, 12, sampling, 4)?);
    Ok(())
}

/// The same on BERT with a padded batch: the pattern and the key padding both apply.
#[test]
fn bert_block_sparse_padded_batch_agrees_across_kinds() -> Result<()> {
    let mut rng = Rng::new(60);
    let lengths = [48, 37, 9];
    let ids = padded_ids(&mut rng, &lengths, 48, BertConfig::tiny().vocab_size)?;
    let (_, dense) = bert(DType::F32, 7)?;
    let dense_out = dense.forward(&ids, &lengths, false)?;
    for pattern in [
        "local:12@16x16",
        "local-global:8,4@16x16",
        "random:0.4:9@16x16",
    ] {
        let cfg = BertConfig {
            sparsity: sparsity(pattern)?,
            ..BertConfig::tiny()
        };
        let (vm, mut m) = bert_with(&cfg, DType::F32, 7)?;
        assert_pattern_applies(pattern, &m.forward(&ids, &lengths, false)?, &dense_out);
        agree_across_kinds(&format!("bert {pattern}"), &vm, &mut rng, |kind, train| {
            m.set_attention(kind);
            m.set_dropout_seed(5);
            Ok(m.forward(&ids, &lengths, train)?)
        })?;
    }
    Ok(())
}

/// Padding really is masked: the valid positions of a padded row equal the same sequence run
/// alone without padding, whatever the padded tokens are.
#[test]
fn bert_padding_does_not_leak() -> Result<()> {
    let (_vm, mut m) = bert(DType::F32, 3)?;
    let mut rng = Rng::new(30);
    let vocab = m.config().vocab_size;
    let ids = rng.ids(1, 20, vocab)?;
    for kind in AttentionKind::ALL {
        m.set_attention(kind);
        let alone = m.forward(&ids.narrow(1, 0, 12)?, &[12], false)?;
        // Garbage (not pad) tokens after the valid 12.
        let padded = m.forward(&ids, &[12], false)?.narrow(1, 0, 12)?;
        let e = rel_err(&padded, &alone);
        assert!(
            e < 1e-5,
            "{kind}: padded row differs from unpadded, rel err {e}"
        );
        // Without the length, the extra tokens do change the output (the test can fail).
        let unmasked = m.forward(&ids, &[20], false)?.narrow(1, 0, 12)?;
        assert!(rel_err(&unmasked, &alone) > 1e-3);
    }
    Ok(())
}

/// Half precision: each kind in f16/bf16 against the f32 model, within the dtype's tolerance.
#[test]
fn half_precision_within_dtype_tolerance() -> Result<()> {
    let (vm32, m32) = gpt2(DType::F32, 4)?;
    let (bvm32, b32) = bert(DType::F32, 5)?;
    let mut rng = Rng::new(40);
    let ids = rng.ids(2, 32, m32.config().vocab_size)?;
    let lengths = [32, 21];
    let bids = padded_ids(&mut rng, &lengths, 32, b32.config().vocab_size)?;
    let g_ref = m32.forward(&ids, false)?;
    let b_ref = b32.forward(&bids, &lengths, false)?;
    for (dtype, tol) in [(DType::F16, 5e-3), (DType::BF16, 4e-2)] {
        let (vm, vb) = varmap(dtype);
        let mut g = Gpt2::new(m32.config(), vb, AttentionKind::Naive)?;
        common::copy_params(&vm32, &vm)?;
        let (bvm, bvb) = varmap(dtype);
        let mut b = BertForMaskedLM::new(b32.config(), bvb, AttentionKind::Naive)?;
        common::copy_params(&bvm32, &bvm)?;
        for kind in AttentionKind::ALL {
            g.set_attention(kind);
            b.set_attention(kind);
            let eg = rel_err(&g.forward(&ids, false)?, &g_ref);
            let eb = rel_err(&b.forward(&bids, &lengths, false)?, &b_ref);
            println!("{dtype:?} {kind}: gpt2 rel err {eg:.2e}, bert rel err {eb:.2e}");
            assert!(
                eg < tol && eb < tol,
                "{dtype:?} {kind}: {eg} {eb} (tol {tol})"
            );
        }
    }
    Ok(())
}
