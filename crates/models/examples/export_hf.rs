//! Writes tiny random GPT-2 and BERT (masked LM) checkpoints as Hugging Face model directories
//! (`config.json` + `model.safetensors`), with inputs and our logits in `expected.json`, for
//! `scripts/check_hf_export.py` to load in `transformers` and compare.
//!
//! cargo run -p flash-ops-models --example export_hf -- /tmp/hf-export

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use flash_ops_models::{save_hf_dir, AttentionKind, BertConfig, BertForMaskedLM, Gpt2, Gpt2Config};

/// Non-trivial weights: the initial LayerNorm gains are ones and biases zeros.
fn randomize(vm: &VarMap) -> Result<()> {
    for (name, var) in vm.data().lock().unwrap().iter() {
        let fan = var.dims().last().copied().unwrap_or(1).max(1) as f64;
        let t = if name.contains("LayerNorm.weight")
            || name.contains("ln_") && name.ends_with("weight")
        {
            (Tensor::randn(0f32, 0.2, var.shape(), &Device::Cpu)? + 1.0)?
        } else if var.rank() == 1 {
            Tensor::randn(0f32, 0.1, var.shape(), &Device::Cpu)?
        } else {
            Tensor::randn(0f32, (1.0 / fan.sqrt()) as f32, var.shape(), &Device::Cpu)?
        };
        var.set(&t)?;
    }
    Ok(())
}

/// A model that `build` makes on fresh f32 variables, randomized, then saved as the Hugging Face
/// directory `dir` with `config`.
fn random_export<M>(
    config: &serde_json::Value,
    dir: std::path::PathBuf,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<M>,
) -> Result<M> {
    let vm = VarMap::new();
    let m = build(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    randomize(&vm)?;
    save_hf_dir(&vm, config, dir)?;
    Ok(m)
}

fn main() -> Result<()> {
    let out = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or("/tmp/hf-export".into()));
    let dev = Device::Cpu;
    let ids: Vec<Vec<u32>> = vec![
        (0..20).map(|i| (i * 37 + 5) % 100).collect(),
        (0..20).map(|i| (i * 11 + 3) % 100).collect(),
    ];
    let lengths = vec![20usize, 13];
    let mut padded = ids.clone();
    for (row, &l) in padded.iter_mut().zip(&lengths) {
        row[l..].iter_mut().for_each(|x| *x = 0);
    }
    let t = Tensor::new(ids.clone(), &dev)?;
    let tp = Tensor::new(padded.clone(), &dev)?;

    let gcfg = Gpt2Config::tiny();
    let gpt2 = random_export(&gcfg.to_hf_json(), out.join("gpt2"), |vb| {
        Gpt2::new(&gcfg, vb, AttentionKind::FlashV2)
    })?;
    let glogits = gpt2.forward(&t, false)?.to_vec3::<f32>()?;

    let bcfg = BertConfig::tiny();
    let bert = random_export(
        &bcfg.to_hf_json("BertForMaskedLM"),
        out.join("bert"),
        |vb| BertForMaskedLM::new(&bcfg, vb, AttentionKind::FlashV2),
    )?;
    let blogits = bert.forward(&tp, &lengths, false)?.to_vec3::<f32>()?;

    let expected = serde_json::json!({
        "gpt2": {"input_ids": ids, "logits": glogits},
        "bert": {"input_ids": padded, "lengths": lengths, "logits": blogits},
    });
    std::fs::write(out.join("expected.json"), serde_json::to_string(&expected)?)?;
    println!("wrote {}", out.display());
    Ok(())
}
