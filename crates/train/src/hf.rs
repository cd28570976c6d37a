//! Hugging Face model directories: `config.json` with `model.safetensors` (or a sharded
//! `model.safetensors.index.json` and its shards), and `tokenizer.json` when present. The
//! starting point of `--init-from` and what `train sample`/`train eval` read as `--checkpoint`;
//! the checkpoints `train` writes are such directories too.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use flash_ops_models::{BertConfig, Gpt2Config};

use crate::model::{self, ModelKind, SizeOverrides};

pub const INDEX: &str = "model.safetensors.index.json";
const EXPECTED: &str = "a Hugging Face model directory (config.json + model.safetensors, or model.safetensors.index.json and its shards)";

/// An opened model directory; `flag` is the argument it came from, for messages.
pub struct HfDir {
    pub dir: PathBuf,
    pub config: serde_json::Value,
    flag: &'static str,
    weights: Vec<PathBuf>,
}

/// Whether `dir` looks like a model directory (it has a `config.json`).
pub fn is_model_dir(dir: &Path) -> bool {
    dir.join("config.json").is_file()
}

impl HfDir {
    pub fn open(dir: &Path, flag: &'static str) -> Result<Self> {
        let d = dir.display();
        if !dir.is_dir() {
            bail!("{flag} {d} is not a directory; pass {EXPECTED}")
        }
        let cfg_path = dir.join("config.json");
        if !cfg_path.is_file() {
            bail!("{flag} {d} has no config.json; pass {EXPECTED}")
        }
        let text = std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("{flag}: reading {}", cfg_path.display()))?;
        let config: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{flag} {d}: config.json is not valid JSON ({e}); re-save the model with save_pretrained"
            )
        })?;
        let weights = if dir.join("model.safetensors").is_file() {
            vec![dir.join("model.safetensors")]
        } else if dir.join(INDEX).is_file() {
            shards(dir, flag)?
        } else {
            bail!(
                "{flag} {d} has a config.json but no weights (model.safetensors or {INDEX}); pytorch_model.bin is not read, so re-save the model with save_pretrained(..., safe_serialization=True)"
            )
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            flag,
            weights,
        })
    }

    pub fn kind(&self) -> Result<ModelKind> {
        model::kind_of(&self.config)
            .with_context(|| format!("{} {}", self.flag, self.dir.display()))
    }

    /// `architectures[0]` of the config, for messages.
    fn architecture(&self) -> &str {
        self.config["architectures"][0].as_str().unwrap_or("?")
    }

    /// Fails unless the directory holds a `kind` model.
    pub fn expect_kind(&self, kind: ModelKind) -> Result<()> {
        let found = self.kind()?;
        if found != kind {
            bail!(
                "{} {} holds a {} model ({}), not a {}; pass a {} directory or use `train {}`",
                self.flag,
                self.dir.display(),
                kind_name(found),
                self.architecture(),
                kind_name(kind),
                kind_name(kind),
                kind_name(found)
            )
        }
        Ok(())
    }

    /// Every tensor of every weight file, on the CPU, by file name.
    fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut all = HashMap::new();
        for p in &self.weights {
            let t = candle_core::safetensors::load(p, &Device::Cpu).map_err(|e| {
                anyhow::anyhow!(
                    "{} {}: {} is unreadable ({}); download or export it again",
                    self.flag,
                    self.dir.display(),
                    p.display(),
                    e.to_string().lines().next().unwrap_or_default()
                )
            })?;
            all.extend(t);
        }
        Ok(all)
    }

    /// Sets the `VarMap`'s parameters from the weights; refuses when any parameter but the
    /// `fresh` ones (a task head the directory cannot have) is missing. Returns a line saying
    /// what it did.
    pub fn load_weights(&self, varmap: &VarMap, fresh: impl Fn(&str) -> bool) -> Result<String> {
        let d = self.dir.display();
        let report = flash_ops_models::load_tensors(varmap, &self.tensors()?).map_err(|e| {
            // Candle appends its backtrace (under RUST_BACKTRACE) on further lines.
            let e = e.to_string();
            anyhow::anyhow!(
                "{} {d} does not fit its config.json ({}); the weights and config.json disagree, re-export the directory",
                self.flag,
                e.lines().next().unwrap_or_default()
            )
        })?;
        let (new, missing): (Vec<&String>, Vec<&String>) =
            report.missing.iter().partition(|n| fresh(n));
        if !missing.is_empty() {
            bail!(
                "{} {d} ({}) lacks {} of the model's {} parameters ({}); it holds another model or head, so pass a matching directory{}",
                self.flag,
                self.architecture(),
                missing.len(),
                report.loaded.len() + report.missing.len(),
                list(&missing),
                if missing.iter().any(|n| n.starts_with("cls.")) {
                    " (a bare BertModel has no masked-LM head: fine-tune it with `train bert-classify --init-from`)"
                } else {
                    ""
                }
            )
        }
        let mut line = format!(
            "{} {d}: loaded {} tensors ({} files)",
            self.flag,
            report.loaded.len(),
            self.weights.len()
        );
        if !new.is_empty() {
            line += &format!("; newly initialised: {}", list(&new));
        }
        if !report.unexpected.is_empty() {
            let u: Vec<&String> = report.unexpected.iter().collect();
            line += &format!("; unused tensors: {}", list(&u));
        }
        Ok(line)
    }

    /// The run's config: the directory's, re-serialised for `architecture`, with `--dropout`
    /// applied; size flags that disagree with it are refused (the weights fix the shape), and so
    /// is a tokenizer with more tokens than the embedding has rows.
    pub fn run_config(
        &self,
        kind: ModelKind,
        architecture: &str,
        tok_vocab: usize,
        o: &SizeOverrides,
    ) -> Result<serde_json::Value> {
        self.expect_kind(kind)?;
        let bad = |e: serde_json::Error| {
            anyhow::anyhow!(
                "{} {}: config.json is not a valid {} config ({e})",
                self.flag,
                self.dir.display(),
                kind_name(kind)
            )
        };
        let (json, shape) = match kind {
            ModelKind::Gpt2 => {
                let mut c: Gpt2Config = serde_json::from_value(self.config.clone()).map_err(bad)?;
                if let Some(p) = o.dropout {
                    (c.resid_pdrop, c.embd_pdrop, c.attn_pdrop) = (p, p, p);
                }
                c.sparsity = o.sparsity.unwrap_or(c.sparsity);
                let shape = [
                    ("--n-layer", "n_layer", c.n_layer, o.n_layer),
                    ("--n-head", "n_head", c.n_head, o.n_head),
                    ("--n-embd", "n_embd", c.n_embd, o.n_embd),
                    ("--n-positions", "n_positions", c.n_positions, o.n_positions),
                    ("--vocab-size", "vocab_size", c.vocab_size, o.vocab_size),
                ];
                (c.to_hf_json(), shape)
            }
            ModelKind::Bert => {
                let mut c: BertConfig = serde_json::from_value(self.config.clone()).map_err(bad)?;
                if let Some(p) = o.dropout {
                    (c.hidden_dropout_prob, c.attention_probs_dropout_prob) = (p, p);
                }
                c.sparsity = o.sparsity.unwrap_or(c.sparsity);
                let shape = [
                    (
                        "--n-layer",
                        "num_hidden_layers",
                        c.num_hidden_layers,
                        o.n_layer,
                    ),
                    (
                        "--n-head",
                        "num_attention_heads",
                        c.num_attention_heads,
                        o.n_head,
                    ),
                    ("--n-embd", "hidden_size", c.hidden_size, o.n_embd),
                    (
                        "--n-positions",
                        "max_position_embeddings",
                        c.max_position_embeddings,
                        o.n_positions,
                    ),
                    ("--vocab-size", "vocab_size", c.vocab_size, o.vocab_size),
                ];
                (c.to_hf_json(architecture), shape)
            }
        };
        for (flag, key, have, want) in shape {
            if let Some(w) = want.filter(|&w| w != have) {
                bail!(
                    "{flag} {w} conflicts with {key} = {have} in {}/config.json; drop {flag} (with {} the weights fix the model's shape)",
                    self.dir.display(),
                    self.flag
                )
            }
        }
        let vocab = model::dims(&json)?.vocab;
        if tok_vocab > vocab {
            bail!(
                "the tokenizer has {tok_vocab} tokens but the model in {} embeds only {vocab}; pass the model's own tokenizer with --tokenizer (or put its tokenizer.json in the directory)",
                self.dir.display()
            )
        }
        Ok(json)
    }
}

/// The shard files named by `model.safetensors.index.json`.
fn shards(dir: &Path, flag: &str) -> Result<Vec<PathBuf>> {
    let p = dir.join(INDEX);
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p)?).map_err(|e| {
            anyhow::anyhow!("{flag} {}: {INDEX} is not valid JSON ({e})", dir.display())
        })?;
    let Some(map) = index["weight_map"].as_object() else {
        bail!(
            "{flag} {}: {INDEX} has no weight_map object; re-save the model with save_pretrained",
            dir.display()
        )
    };
    let files: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
    if files.is_empty() {
        bail!("{flag} {}: {INDEX} names no shard files", dir.display())
    }
    files
        .into_iter()
        .map(|f| {
            let s = dir.join(f);
            if !s.is_file() {
                bail!(
                    "{flag} {}: shard {f} named in {INDEX} is missing; download every shard",
                    dir.display()
                )
            }
            Ok(s)
        })
        .collect()
}

/// At most five names, then how many more.
fn list(names: &[&String]) -> String {
    let mut s = names
        .iter()
        .take(5)
        .map(|n| n.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > 5 {
        s += &format!(" and {} more", names.len() - 5);
    }
    s
}

pub fn kind_name(kind: ModelKind) -> &'static str {
    match kind {
        ModelKind::Gpt2 => "gpt2",
        ModelKind::Bert => "bert",
    }
}
