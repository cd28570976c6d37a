//! Validation loss: during training, and `train eval` of a checkpoint (loaded here for `train
//! sample` too).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use candle_nn::VarMap;
use flash_ops_models::{rng, AttentionKind};
use tokenizers::Tokenizer;

use crate::batching::{content_len, document_separator, Batcher};
use crate::checkpoint::{self, TrainState};
use crate::data;
use crate::hf::HfDir;
use crate::masking::MlmSettings;
use crate::model::{self, ModelKind, Net};
use crate::trainer::RunSettings;
use crate::EvalArgs;

/// Salts the validation masking seeds apart from the training ones.
const VAL_MASK_SALT: u64 = 0x5EED_F7A1;

/// Mean loss over fixed validation windows (eval mode; BERT masks from a fixed seed).
pub fn evaluate(
    net: &Net,
    windows: &[&[u32]],
    batch_size: usize,
    batcher: &Batcher,
    seed: u64,
) -> Result<f64> {
    let mut total = 0f64;
    let mut n = 0usize;
    for (i, chunk) in windows.chunks(batch_size).enumerate() {
        let batch = batcher.batch(chunk, rng::derive(seed ^ VAL_MASK_SALT, i as u64))?;
        let loss = net.loss(&batch, false)?.to_scalar::<f32>()? as f64;
        total += loss * chunk.len() as f64;
        n += chunk.len();
    }
    Ok(total / n.max(1) as f64)
}

/// A checkpoint loaded for sampling or evaluation.
pub struct Loaded {
    pub net: Net,
    pub tokenizer: Tokenizer,
    pub config: serde_json::Value,
    pub dir: PathBuf,
    pub settings: Option<RunSettings>,
}

pub fn load_for_inference(
    path: &Path,
    tokenizer: Option<&Path>,
    dev: &Device,
    attn: AttentionKind,
) -> Result<Loaded> {
    let dir = checkpoint::resolve(path)?;
    let hf = HfDir::open(&dir, "--checkpoint")?;
    let config = hf.config.clone();
    let kind = hf.kind()?;
    let dims = model::dims(&config)?;
    let (tok, tok_desc) = crate::trainer::pick_tokenizer(kind, tokenizer, Some(&dir))?;
    let tv = crate::tokenizer::vocab_size(&tok);
    if tv > dims.vocab || dims.vocab - tv >= 128 {
        bail!(
            "tokenizer {tok_desc} has {tv} tokens but the model's vocabulary has {}; pass the tokenizer the model was trained with (--tokenizer, or a tokenizer.json in {})",
            dims.vocab,
            dir.display()
        )
    }
    let varmap = VarMap::new();
    let net = Net::build(&config, &varmap, DType::F32, dev, attn)?;
    hf.load_weights(&varmap, |_| false)?;
    let settings = std::fs::read(dir.join("optimizer.safetensors"))
        .ok()
        .and_then(|b| {
            let (_, meta) = safetensors::SafeTensors::read_metadata(&b).ok()?;
            let st: TrainState =
                serde_json::from_str(meta.metadata().as_ref()?.get("train_state")?).ok()?;
            serde_json::from_value(st.settings).ok()
        });
    Ok(Loaded {
        net,
        tokenizer: tok,
        config,
        dir,
        settings,
    })
}

/// `train eval`.
pub fn run_eval(a: EvalArgs) -> Result<()> {
    let dev = crate::device(a.device)?;
    let loaded = load_for_inference(&a.checkpoint, a.tokenizer.as_deref(), &dev, a.attn)?;
    let kind = model::kind_of(&loaded.config)?;
    let dims = model::dims(&loaded.config)?;
    if a.seq_len > dims.positions {
        bail!(
            "--seq-len {} exceeds the model's {} positions; lower --seq-len",
            a.seq_len,
            dims.positions
        )
    }
    let sources = data::read_sources(&a.data)?;
    let sep = document_separator(kind, &loaded.tokenizer);
    let tokens = data::tokenize_sources(&sources, &loaded.tokenizer, sep, dims.vocab)?;
    let (_, val) = data::split(&tokens, content_len(kind, a.seq_len))?;
    let windows = data::val_windows(&val, content_len(kind, a.seq_len), a.max_tokens);
    let mlm = loaded
        .settings
        .as_ref()
        .and_then(|s| s.mlm)
        .unwrap_or(MlmSettings {
            mask_prob: 0.15,
            whole_word: false,
        });
    let batcher = Batcher::new(kind, &loaded.tokenizer, dims.vocab, Some(mlm), &dev)?;
    let t0 = Instant::now();
    let loss = evaluate(&loaded.net, &windows, a.batch_size.max(1), &batcher, a.seed)?;
    let n: usize = windows.len() * content_len(kind, a.seq_len);
    println!(
        "{}: validation loss {loss:.4} nats/token, perplexity {:.2} ({} tokens of the validation split, seq {}, {:.1}s){}",
        loaded.dir.display(),
        loss.exp(),
        n,
        a.seq_len,
        t0.elapsed().as_secs_f64(),
        if kind == ModelKind::Bert { " [masked-LM loss]" } else { "" }
    );
    Ok(())
}
