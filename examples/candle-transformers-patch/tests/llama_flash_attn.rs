//! candle-transformers' Llama built with its `flash-attn` feature, whose `candle_flash_attn`
//! dependency is patched to flash-ops: the flash path runs (on the CPU, which the original crate
//! cannot) and its logits match the same weights through the model's own matmul-softmax path.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::llama::{Cache, Config, Llama, LlamaEosToks};

fn config(use_flash_attn: bool) -> Config {
    Config {
        hidden_size: 64,
        intermediate_size: 128,
        vocab_size: 97,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2, // grouped-query attention
        use_flash_attn,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        bos_token_id: None,
        eos_token_id: Some(LlamaEosToks::Single(0)),
        rope_scaling: None,
        max_position_embeddings: 64,
        tie_word_embeddings: false,
    }
}

fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let d = (a - b)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    let n = b.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    Ok((d / n).sqrt())
}

#[test]
fn llama_flash_attn_feature_runs_flash_ops_and_matches_the_plain_path() -> Result<()> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    // Same VarMap for both: the second build reuses the parameters the first one created.
    let flash = Llama::load(vb.clone(), &config(true))?;
    let plain = Llama::load(vb, &config(false))?;
    // Random, non-trivial weights (the default init leaves norms at one).
    for var in varmap.all_vars() {
        var.set(&Tensor::randn(0f32, 0.3, var.shape(), &dev)?)?;
    }
    let ids: Vec<u32> = (0..24u32).map(|i| (i * 37 + 11) % 97).collect();
    let input = Tensor::new(ids.as_slice(), &dev)?.unsqueeze(0)?;
    // Prompt processing: seq_len > 1, so the causal flash call is exercised.
    let mut c1 = Cache::new(true, DType::F32, &config(true), &dev)?;
    let mut c2 = Cache::new(true, DType::F32, &config(false), &dev)?;
    let a = flash.forward(&input, 0, &mut c1)?;
    let b = plain.forward(&input, 0, &mut c2)?;
    let e = rel_err(&a, &b)?;
    println!("llama last-token logits, flash-attn (flash-ops) vs plain: rel err {e:.2e}");
    assert!(e < 1e-5, "rel err {e}");
    assert!(a.max(D::Minus1)?.to_vec1::<f32>()?[0].is_finite());
    // One cached decoding step through both paths.
    let next = Tensor::new(&[5u32], &dev)?.unsqueeze(0)?;
    let a = flash.forward(&next, ids.len(), &mut c1)?;
    let b = plain.forward(&next, ids.len(), &mut c2)?;
    let e = rel_err(&a, &b)?;
    println!("llama cached step: rel err {e:.2e}");
    assert!(e < 1e-5, "rel err {e}");
    Ok(())
}
