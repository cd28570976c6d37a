//! Checkpoints: our files round-trip bit for bit, and files in Hugging Face's naming (written
//! here from the key lists of `GPT2LMHeadModel` / `BertForMaskedLM` / `BertModel`, not from our
//! code) load without missing or unexpected tensors, with the values in the right places.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::{DType, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::{random_model, varmap};
use flash_ops_models::{
    load_hf_safetensors, save_hf_dir, save_hf_safetensors, save_tensors, AttentionKind, BertConfig,
    BertForMaskedLM, BertModel, Gpt2, Gpt2Config, LoadReport,
};
use flash_test_support::{scratch_dir, Rng};

fn tmp(name: &str) -> PathBuf {
    scratch_dir("flash-ops-models").join(name)
}

/// `GPT2LMHeadModel` keys and shapes as in the `gpt2` repository's model.safetensors: a bare
/// `GPT2Model` (no `transformer.` prefix), Conv1D weights `(in, out)`, with the `attn.bias`
/// causal-mask buffers and no `lm_head.weight` (tied).
fn hf_gpt2_keys(c: &Gpt2Config) -> Vec<(String, Vec<usize>)> {
    let (e, v, p) = (c.n_embd, c.vocab_size, c.n_positions);
    let mut k = vec![
        ("wte.weight".to_string(), vec![v, e]),
        ("wpe.weight".to_string(), vec![p, e]),
        ("ln_f.weight".to_string(), vec![e]),
        ("ln_f.bias".to_string(), vec![e]),
    ];
    for i in 0..c.n_layer {
        let l = |s: &str| format!("h.{i}.{s}");
        k.extend([
            (l("ln_1.weight"), vec![e]),
            (l("ln_1.bias"), vec![e]),
            (l("attn.bias"), vec![1, 1, p, p]),
            (l("attn.c_attn.weight"), vec![e, 3 * e]),
            (l("attn.c_attn.bias"), vec![3 * e]),
            (l("attn.c_proj.weight"), vec![e, e]),
            (l("attn.c_proj.bias"), vec![e]),
            (l("ln_2.weight"), vec![e]),
            (l("ln_2.bias"), vec![e]),
            (l("mlp.c_fc.weight"), vec![e, 4 * e]),
            (l("mlp.c_fc.bias"), vec![4 * e]),
            (l("mlp.c_proj.weight"), vec![4 * e, e]),
            (l("mlp.c_proj.bias"), vec![e]),
        ]);
    }
    k
}

/// `BertModel` keys (what sentence-transformers checkpoints hold), with `prefix` `"bert."` for
/// the task models.
fn hf_bert_keys(c: &BertConfig, prefix: &str, pooler: bool) -> Vec<(String, Vec<usize>)> {
    let (h, i_, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let n = |s: &str| format!("{prefix}{s}");
    let mut k = vec![
        (n("embeddings.word_embeddings.weight"), vec![v, h]),
        (
            n("embeddings.position_embeddings.weight"),
            vec![c.max_position_embeddings, h],
        ),
        (
            n("embeddings.token_type_embeddings.weight"),
            vec![c.type_vocab_size, h],
        ),
        (n("embeddings.LayerNorm.weight"), vec![h]),
        (n("embeddings.LayerNorm.bias"), vec![h]),
    ];
    for l in 0..c.num_hidden_layers {
        let p = |s: &str| n(&format!("encoder.layer.{l}.{s}"));
        for lin in [
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        ] {
            k.push((p(&format!("{lin}.weight")), vec![h, h]));
            k.push((p(&format!("{lin}.bias")), vec![h]));
        }
        k.extend([
            (p("attention.output.LayerNorm.weight"), vec![h]),
            (p("attention.output.LayerNorm.bias"), vec![h]),
            (p("intermediate.dense.weight"), vec![i_, h]),
            (p("intermediate.dense.bias"), vec![i_]),
            (p("output.dense.weight"), vec![h, i_]),
            (p("output.dense.bias"), vec![h]),
            (p("output.LayerNorm.weight"), vec![h]),
            (p("output.LayerNorm.bias"), vec![h]),
        ]);
    }
    if pooler {
        k.push((n("pooler.dense.weight"), vec![h, h]));
        k.push((n("pooler.dense.bias"), vec![h]));
    }
    k
}

fn random_file(keys: &[(String, Vec<usize>)], seed: u64) -> Result<BTreeMap<String, Tensor>> {
    let mut rng = Rng::new(seed);
    keys.iter()
        .map(|(n, s)| Ok((n.clone(), rng.normal_tensor(s, 0.5, DType::F32)?)))
        .collect()
}

fn param(vm: &VarMap, name: &str) -> Tensor {
    vm.data().lock().unwrap()[name].as_tensor().clone()
}

/// A fresh f32 model that `build` makes, loaded from `path`: its variables, the model and the
/// load report.
fn load_into<M>(
    path: &Path,
    build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<M>,
) -> Result<(VarMap, M, LoadReport)> {
    let (vm, vb) = varmap(DType::F32);
    let m = build(vb)?;
    let report = load_hf_safetensors(&vm, path)?;
    Ok((vm, m, report))
}

/// `file` saved as `name`, then loaded into a fresh model that `build` makes: its variables and
/// the load report.
fn load_file<M>(
    file: &BTreeMap<String, Tensor>,
    name: &str,
    build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<M>,
) -> Result<(VarMap, LoadReport)> {
    let path = tmp(name);
    save_tensors(file, &path)?;
    let (vm, _, report) = load_into(&path, build)?;
    Ok((vm, report))
}

/// A random f32 model that `build` makes, written by `save` (which returns the weights' file),
/// and a second one that `build` makes, loaded from that file: both, and the load report.
fn round_trip<M>(
    seed: u64,
    build: impl Fn(VarBuilder<'static>) -> candle_core::Result<M>,
    save: impl FnOnce(&VarMap) -> Result<PathBuf>,
) -> Result<(M, M, LoadReport)> {
    let (vm, m) = random_model(DType::F32, seed, &build)?;
    let path = save(&vm)?;
    let (_, m2, report) = load_into(&path, build)?;
    Ok((m, m2, report))
}

fn assert_same_values(a: &Tensor, b: &Tensor) -> Result<()> {
    assert_eq!(
        a.flatten_all()?.to_vec1::<f32>()?,
        b.flatten_all()?.to_vec1::<f32>()?
    );
    Ok(())
}

#[test]
fn gpt2_save_load_round_trip_is_exact() -> Result<()> {
    let cfg = Gpt2Config::tiny();
    let path = tmp("gpt2.safetensors");
    let (m, m2, report) = round_trip(
        1,
        |vb| Gpt2::new(&cfg, vb, AttentionKind::FlashV2),
        |vm| {
            save_hf_safetensors(vm, &path)?;
            Ok(path.clone())
        },
    )?;
    assert!(report.is_exact(), "{report}");
    assert!(report.skipped.is_empty());
    let ids = Rng::new(2).ids(2, 20, cfg.vocab_size)?;
    assert_same_values(&m.forward(&ids, false)?, &m2.forward(&ids, false)?)?;
    // Our file has exactly the HF GPT2LMHeadModel keys (prefixed, no buffers, no lm_head).
    let file = candle_core::safetensors::load(&path, &candle_core::Device::Cpu)?;
    let mut ours: Vec<String> = file.keys().cloned().collect();
    ours.sort();
    let mut hf: Vec<String> = hf_gpt2_keys(&cfg)
        .into_iter()
        .filter(|(n, _)| !n.ends_with(".attn.bias"))
        .map(|(n, _)| format!("transformer.{n}"))
        .collect();
    hf.sort();
    assert_eq!(ours, hf);
    Ok(())
}

#[test]
fn bert_save_load_round_trip_is_exact() -> Result<()> {
    let cfg = BertConfig::tiny();
    let dir = tmp("bert-dir");
    let (m, m2, report) = round_trip(
        3,
        |vb| BertForMaskedLM::new(&cfg, vb, AttentionKind::FlashV1),
        |vm| {
            save_hf_dir(vm, &cfg.to_hf_json("BertForMaskedLM"), &dir)?;
            Ok(dir.join("model.safetensors"))
        },
    )?;
    // The directory's config is the model's, so the reloaded model is the one `build` makes.
    let cfg2: BertConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    assert_eq!(cfg2, cfg);
    assert!(report.is_exact(), "{report}");
    let ids = Rng::new(4).ids(2, 16, cfg.vocab_size)?;
    assert_same_values(
        &m.forward(&ids, &[16, 9], false)?,
        &m2.forward(&ids, &[16, 9], false)?,
    )
}

#[test]
fn hf_gpt2_file_loads_without_missing_or_unexpected() -> Result<()> {
    let cfg = Gpt2Config::tiny();
    let file = random_file(&hf_gpt2_keys(&cfg), 5)?;
    let (vm, report) = load_file(&file, "hf-gpt2.safetensors", |vb| {
        Gpt2::new(&cfg, vb, AttentionKind::Naive)
    })?;
    assert!(report.is_exact(), "{report}");
    assert_eq!(report.loaded.len(), 4 + 12 * cfg.n_layer);
    assert_eq!(report.skipped.len(), cfg.n_layer, "the attn.bias buffers");
    // Values land in place, Conv1D weights untransposed.
    for name in [
        "wte.weight",
        "h.1.attn.c_attn.weight",
        "h.0.mlp.c_proj.bias",
    ] {
        assert_same_values(&param(&vm, &format!("transformer.{name}")), &file[name])?;
    }
    Ok(())
}

#[test]
fn hf_bert_mlm_file_with_tied_decoder_and_legacy_names_loads() -> Result<()> {
    let cfg = BertConfig::tiny();
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let mut keys = hf_bert_keys(&cfg, "bert.", false);
    keys.extend([
        ("cls.predictions.bias".to_string(), vec![v]),
        (
            "cls.predictions.transform.dense.weight".to_string(),
            vec![h, h],
        ),
        ("cls.predictions.transform.dense.bias".to_string(), vec![h]),
        (
            "cls.predictions.transform.LayerNorm.weight".to_string(),
            vec![h],
        ),
        (
            "cls.predictions.transform.LayerNorm.bias".to_string(),
            vec![h],
        ),
    ]);
    let mut file = random_file(&keys, 6)?;
    // Older BertForMaskedLM files carry the tied decoder weight and bias (copies), and the
    // original Google conversion spells LayerNorm parameters gamma/beta.
    let word = file["bert.embeddings.word_embeddings.weight"].clone();
    file.insert("cls.predictions.decoder.weight".into(), word);
    let bias = file["cls.predictions.bias"].clone();
    file.insert("cls.predictions.decoder.bias".into(), bias);
    let g = file.remove("bert.embeddings.LayerNorm.weight").unwrap();
    file.insert("bert.embeddings.LayerNorm.gamma".into(), g.clone());
    file.insert(
        "bert.embeddings.position_ids".into(),
        Tensor::arange(0u32, 64, &candle_core::Device::Cpu)?.to_dtype(DType::F32)?,
    );
    let (vm, report) = load_file(&file, "hf-bert.safetensors", |vb| {
        BertForMaskedLM::new(&cfg, vb, AttentionKind::Naive)
    })?;
    assert!(report.is_exact(), "{report}");
    assert_eq!(
        report.skipped.len(),
        3,
        "decoder weight, decoder bias, position_ids"
    );
    assert_eq!(
        param(&vm, "bert.embeddings.LayerNorm.weight").to_vec1::<f32>()?,
        g.to_vec1::<f32>()?
    );
    // A decoder weight that differs from the embeddings is an untied head we cannot represent.
    let other = (file["cls.predictions.decoder.weight"].clone() + 1.0)?;
    file.insert("cls.predictions.decoder.weight".into(), other);
    let path = tmp("hf-bert.safetensors");
    save_tensors(&file, &path)?;
    let report = load_hf_safetensors(&vm, &path)?;
    assert_eq!(
        report.unexpected,
        vec!["cls.predictions.decoder.weight".to_string()]
    );
    Ok(())
}

#[test]
fn bare_bert_model_file_loads_into_bert_model() -> Result<()> {
    // sentence-transformers layout: `BertModel` keys without prefix, pooler included.
    let cfg = BertConfig::tiny();
    let file = random_file(&hf_bert_keys(&cfg, "", true), 7)?;
    let (_, report) = load_file(&file, "hf-bertmodel.safetensors", |vb| {
        BertModel::new(&cfg, vb, AttentionKind::FlashV2, true)
    })?;
    assert!(report.is_exact(), "{report}");
    Ok(())
}

#[test]
fn missing_and_unexpected_are_reported_by_name() -> Result<()> {
    let cfg = Gpt2Config::tiny();
    let mut file = random_file(&hf_gpt2_keys(&cfg), 8)?;
    file.remove("ln_f.bias");
    file.insert(
        "h.0.attn.q_norm.weight".into(),
        Tensor::ones(4, DType::F32, &candle_core::Device::Cpu)?,
    );
    let (vm, report) = load_file(&file, "hf-gpt2-bad.safetensors", |vb| {
        Gpt2::new(&cfg, vb, AttentionKind::Naive)
    })?;
    assert_eq!(report.missing, vec!["transformer.ln_f.bias".to_string()]);
    assert_eq!(
        report.unexpected,
        vec!["h.0.attn.q_norm.weight".to_string()]
    );
    assert!(report.ensure_no_missing().is_err());
    // A shape mismatch is an error naming the tensor.
    file.insert(
        "wpe.weight".into(),
        Tensor::zeros((3, 3), DType::F32, &candle_core::Device::Cpu)?,
    );
    let path = tmp("hf-gpt2-bad.safetensors");
    save_tensors(&file, &path)?;
    let err = load_hf_safetensors(&vm, &path).unwrap_err().to_string();
    assert!(err.contains("wpe.weight"), "{err}");
    Ok(())
}
