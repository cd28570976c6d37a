//! Checkpoints: one directory per save, `OUT/checkpoints/step-NNNNNNN/`, holding
//!
//! * `model.safetensors`: every parameter in f32 under its Hugging Face name (with
//!   `config.json` and `tokenizer.json` next to it the directory opens in `transformers`),
//! * `optimizer.safetensors`: AdamW's `exp_avg.NAME` / `exp_avg_sq.NAME`, with the training state
//!   (step, tokens seen, data position, seed, loss scale, the run's settings) as JSON in the
//!   safetensors metadata under `train_state`,
//! * `config.json`, `tokenizer.json`.
//!
//! A save writes everything into a hidden temporary directory, syncs it, and renames it into
//! place, then rewrites `OUT/checkpoints/latest` (temp file + rename): a crash at any moment leaves
//! the previous checkpoint and pointer intact.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

use crate::data::DataPos;
use crate::optim::AdamW;
use crate::recipe::Schedule;
use crate::DTypeArg;

pub const FORMAT: &str = "flash-ops-train/1";

/// Writes `bytes` to `path` atomically (sibling temp file, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let res = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if res.is_err() {
        std::fs::remove_file(&tmp).ok();
    }
    res.with_context(|| format!("writing {}", path.display()))
}

/// Everything besides tensors that a resumed run needs.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainState {
    pub format: String,
    pub step: u64,
    pub tokens_seen: u64,
    pub data_pos: DataPos,
    /// The run's seed: data order, masking and dropout are counter-based functions of
    /// `(seed, step, micro-batch)`, so with `step` and `data_pos` this is the full RNG state.
    pub seed: u64,
    pub loss_scale: f64,
    pub elapsed_s: f64,
    /// The run's settings (`RunSettings`), compared on resume.
    pub settings: serde_json::Value,
}

impl TrainState {
    /// A run at step 0; `settings` are the run's (compared on resume).
    pub fn fresh(settings: serde_json::Value, seed: u64, dtype: DTypeArg) -> Self {
        Self {
            format: FORMAT.into(),
            step: 0,
            tokens_seen: 0,
            data_pos: DataPos {
                epoch: 0,
                cursor: 0,
            },
            seed,
            // f16's dynamic loss scaling starts high and halves on overflow.
            loss_scale: if dtype == DTypeArg::F16 { 65536.0 } else { 1.0 },
            elapsed_s: 0.0,
            settings,
        }
    }
}

/// Refuses to resume a checkpoint whose model config differs from the run's; `fix` says which
/// flags to repeat.
pub fn check_config(
    dir: &Path,
    then: &serde_json::Value,
    now: &serde_json::Value,
    fix: &str,
) -> Result<()> {
    let diff = crate::model::config_diff(then, now);
    if !diff.is_empty() {
        bail!(
            "checkpoint {} is from a different model config ({}); resume with {fix}, or start a new --out",
            dir.display(),
            diff.join(", ")
        )
    }
    Ok(())
}

/// Refuses to resume when a flag that fixes the data order differs from the checkpoint's run:
/// `extra` `(flag, then, now)`, then the batch shape and seed of the schedules.
pub fn check_same(then: &Schedule, now: &Schedule, extra: &[(&str, u64, u64)]) -> Result<()> {
    let shape = [
        (
            "--batch-size",
            then.batch_size as u64,
            now.batch_size as u64,
        ),
        (
            "--grad-accum",
            then.grad_accum as u64,
            now.grad_accum as u64,
        ),
        ("--seed", then.seed, now.seed),
    ];
    for (flag, then, now) in extra.iter().chain(&shape) {
        if then != now {
            bail!("the checkpoint's run used {flag} {then}, not {now}; resume with {flag} {then}")
        }
    }
    Ok(())
}

pub struct Checkpoint {
    pub params: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
    pub state: TrainState,
    pub config: serde_json::Value,
}

fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        f.sync_all().ok();
    }
}

/// Saves the optimizer's parameters and moments as a checkpoint of the run in `out` (under
/// `OUT/checkpoints`), keeping the newest `keep`.
pub fn save_run(
    out: &Path,
    opt: &AdamW,
    state: &TrainState,
    config: &serde_json::Value,
    tokenizer: &tokenizers::Tokenizer,
    keep: usize,
) -> Result<PathBuf> {
    let root = out.join("checkpoints");
    save(
        &root,
        &opt.f32_params()?,
        &opt.state()?,
        state,
        config,
        tokenizer,
        keep,
    )
}

/// Saves a checkpoint under `root` (= `OUT/checkpoints`) and keeps the newest `keep` ones.
#[allow(clippy::too_many_arguments)]
pub fn save(
    root: &Path,
    params: &BTreeMap<String, Tensor>,
    optimizer: &BTreeMap<String, Tensor>,
    state: &TrainState,
    config: &serde_json::Value,
    tokenizer: &tokenizers::Tokenizer,
    keep: usize,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root)
        .with_context(|| format!("creating checkpoint directory {}", root.display()))?;
    let name = step_dir_name(state.step);
    let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    let write = || -> Result<()> {
        write_model_files(&tmp, params, config, tokenizer)?;
        let opt_meta = HashMap::from([
            ("format".to_string(), "pt".to_string()),
            ("train_state".to_string(), serde_json::to_string(state)?),
        ]);
        safetensors::serialize_to_file(
            optimizer.iter(),
            Some(opt_meta),
            &tmp.join("optimizer.safetensors"),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        sync_all(&tmp)
    };
    if let Err(e) = write() {
        std::fs::remove_dir_all(&tmp).ok();
        return Err(e.context(format!("writing checkpoint into {}", root.display())));
    }
    let dest = root.join(&name);
    replace_dir(&tmp, &dest)?;
    write_atomic(&root.join("latest"), name.as_bytes())?;
    prune(root, keep)?;
    Ok(dest)
}

/// A Hugging Face model directory's files in `dir`: `model.safetensors`, `config.json`,
/// `tokenizer.json`.
fn write_model_files(
    dir: &Path,
    params: &BTreeMap<String, Tensor>,
    config: &serde_json::Value,
    tokenizer: &tokenizers::Tokenizer,
) -> Result<()> {
    let model_meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(
        params.iter(),
        Some(model_meta),
        &dir.join("model.safetensors"),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(config)?,
    )?;
    tokenizer
        .save(dir.join("tokenizer.json"), false)
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Syncs every file of `dir`, then `dir`.
fn sync_all(dir: &Path) -> Result<()> {
    for f in std::fs::read_dir(dir)? {
        std::fs::File::open(f?.path())?.sync_all()?;
    }
    sync_dir(dir);
    Ok(())
}

/// Renames the finished directory `tmp` to `dest`, moving an existing `dest` aside first (the
/// same step saved again after a resume, or a better model replacing the best).
fn replace_dir(tmp: &Path, dest: &Path) -> Result<()> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    if dest.exists() {
        let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("dir");
        let old = parent.join(format!(".old-{name}-{}", std::process::id()));
        std::fs::rename(dest, &old)?;
        std::fs::rename(tmp, dest)?;
        std::fs::remove_dir_all(&old).ok();
    } else {
        std::fs::rename(tmp, dest)?;
    }
    sync_dir(parent);
    Ok(())
}

/// Writes a model directory without optimizer state (`transformers` and `--init-from` open
/// it) to `dest`, atomically, with `extra` files (name, contents) beside the model.
pub fn save_model_dir(
    dest: &Path,
    params: &BTreeMap<String, Tensor>,
    config: &serde_json::Value,
    tokenizer: &tokenizers::Tokenizer,
    extra: &[(&str, String)],
) -> Result<()> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("model");
    let tmp = parent.join(format!(".tmp-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&tmp).ok();
    let write = || -> Result<()> {
        std::fs::create_dir_all(&tmp)?;
        write_model_files(&tmp, params, config, tokenizer)?;
        for (file, text) in extra {
            std::fs::write(tmp.join(file), text)?;
        }
        sync_all(&tmp)?;
        replace_dir(&tmp, dest)
    };
    write().map_err(|e| {
        std::fs::remove_dir_all(&tmp).ok();
        e.context(format!("writing {}", dest.display()))
    })
}

/// The checkpoint directories under `root`, oldest first.
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    if !root.exists() {
        return Ok(out);
    }
    for e in std::fs::read_dir(root)? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some(s) = name.strip_prefix("step-") {
            if let Ok(step) = s.parse::<u64>() {
                if p.join("optimizer.safetensors").exists() {
                    out.push((step, p));
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

fn prune(root: &Path, keep: usize) -> Result<()> {
    let all = list(root)?;
    if keep == 0 || all.len() <= keep {
        return Ok(());
    }
    for (_, p) in &all[..all.len() - keep] {
        std::fs::remove_dir_all(p).ok();
    }
    Ok(())
}

/// The newest checkpoint of a run folder (via `latest`, else the highest step).
pub fn latest(out: &Path) -> Result<Option<PathBuf>> {
    let root = out.join("checkpoints");
    if let Ok(name) = std::fs::read_to_string(root.join("latest")) {
        let p = root.join(name.trim());
        if p.join("optimizer.safetensors").exists() {
            return Ok(Some(p));
        }
    }
    Ok(list(&root)?.pop().map(|(_, p)| p))
}

/// Resolves a `--checkpoint`/`--resume` argument: a checkpoint or Hugging Face model directory
/// (one with a `config.json`), or a run folder (its latest checkpoint).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if crate::hf::is_model_dir(path) {
        return Ok(path.to_path_buf());
    }
    if let Some(p) = latest(path)? {
        return Ok(p);
    }
    bail!(
        "no checkpoint at {}; pass a checkpoint directory (OUT/checkpoints/step-N), a run folder that has one, or a Hugging Face model directory (config.json + model.safetensors)",
        path.display()
    )
}

/// Reads the model config of a checkpoint directory.
pub fn read_config(dir: &Path) -> Result<serde_json::Value> {
    let p = dir.join("config.json");
    let s = std::fs::read_to_string(&p).with_context(|| {
        format!(
            "reading {}; the checkpoint is incomplete, pick another one",
            p.display()
        )
    })?;
    serde_json::from_str(&s).with_context(|| format!("parsing {}", p.display()))
}

impl Checkpoint {
    /// Restores the optimizer (parameters and moments) and continues `state` from this
    /// checkpoint (read from `dir`).
    pub fn restore(&self, dir: &Path, opt: &mut AdamW, state: &mut TrainState) -> Result<()> {
        opt.load(&self.params, &self.optimizer, self.state.step)?;
        if self.params.len() != opt.num_tensors() {
            bail!(
                "checkpoint {} has {} tensors, the model {}; it is from a different model config, so start a new --out",
                dir.display(),
                self.params.len(),
                opt.num_tensors()
            )
        }
        state.step = self.state.step;
        state.tokens_seen = self.state.tokens_seen;
        state.data_pos = self.state.data_pos;
        state.loss_scale = self.state.loss_scale;
        state.elapsed_s = self.state.elapsed_s;
        Ok(())
    }
}

pub fn load(dir: &Path, device: &Device) -> Result<Checkpoint> {
    let corrupt = |e: String| {
        anyhow::anyhow!(
            "checkpoint {} is unreadable ({e}); resume from an older checkpoint in the same folder",
            dir.display()
        )
    };
    let opt_path = dir.join("optimizer.safetensors");
    if !opt_path.exists() {
        bail!(
            "{} has no optimizer.safetensors: it is a model directory, not a training checkpoint; start a new run from it with --init-from instead of resuming",
            dir.display()
        )
    }
    let config = read_config(dir)?;
    let params = candle_core::safetensors::load(dir.join("model.safetensors"), device)
        .map_err(|e| corrupt(e.to_string()))?;
    let bytes = std::fs::read(&opt_path).map_err(|e| corrupt(e.to_string()))?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| corrupt(e.to_string()))?;
    let state_json = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("train_state"))
        .ok_or_else(|| corrupt("no train_state metadata".into()))?;
    let state: TrainState = serde_json::from_str(state_json).map_err(|e| corrupt(e.to_string()))?;
    if state.format != FORMAT {
        bail!(
            "checkpoint {} has format {:?}, this build reads {FORMAT:?}; use the matching version of `train`",
            dir.display(),
            state.format
        )
    }
    let optimizer = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| corrupt(e.to_string()))?;
    Ok(Checkpoint {
        params,
        optimizer,
        state,
        config,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_prune() {
        let root = flash_test_support::scratch_dir("train-ckpt");
        std::fs::remove_dir_all(&root).ok();
        let tok = crate::tokenizer::bert_uncased().unwrap();
        let p = BTreeMap::from([(
            "a.weight".to_string(),
            Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu).unwrap(),
        )]);
        let o = BTreeMap::from([(
            "exp_avg.a.weight".to_string(),
            Tensor::new(&[[0.5f32, 0.], [0., 0.]], &Device::Cpu).unwrap(),
        )]);
        for step in [10, 20, 30] {
            let st = TrainState {
                format: FORMAT.into(),
                step,
                tokens_seen: step * 100,
                data_pos: DataPos {
                    epoch: 1,
                    cursor: step,
                },
                seed: 5,
                loss_scale: 1.0,
                elapsed_s: 1.5,
                settings: serde_json::json!({"x": 1}),
            };
            save(
                &root.join("checkpoints"),
                &p,
                &o,
                &st,
                &serde_json::json!({"n": 1}),
                &tok,
                2,
            )
            .unwrap();
        }
        let steps: Vec<u64> = list(&root.join("checkpoints"))
            .unwrap()
            .iter()
            .map(|x| x.0)
            .collect();
        assert_eq!(steps, vec![20, 30]);
        let dir = resolve(&root).unwrap();
        assert!(dir.ends_with("step-00000030"));
        let c = load(&dir, &Device::Cpu).unwrap();
        assert_eq!(c.state.step, 30);
        assert_eq!(
            c.state.data_pos,
            DataPos {
                epoch: 1,
                cursor: 30
            }
        );
        assert_eq!(
            c.params["a.weight"].to_vec2::<f32>().unwrap(),
            vec![vec![1., 2.], vec![3., 4.]]
        );
        assert!(c.optimizer.contains_key("exp_avg.a.weight"));
        // A torn write (a leftover temp directory) is ignored.
        std::fs::create_dir_all(root.join("checkpoints/.tmp-step-00000040-1")).unwrap();
        assert!(resolve(&root).unwrap().ends_with("step-00000030"));
        std::fs::remove_dir_all(&root).ok();
    }
}
