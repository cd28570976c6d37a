//! Hugging Face safetensors checkpoints in and out of a `VarMap`.
//!
//! The models create their parameters in a `VarMap` under Hugging Face's names, so saving is a
//! dump of the map and loading is a by-name copy. Loading tolerates the spellings found in real
//! files: a missing or extra head prefix (`transformer.`, `bert.`: the `gpt2` repository stores a
//! bare `GPT2Model`, sentence-transformers a bare `BertModel`), legacy `LayerNorm.gamma/beta`,
//! non-parameter buffers (GPT-2's `attn.bias` causal masks, BERT's `position_ids`), and tied
//! copies (`lm_head.weight`, `cls.predictions.decoder.*`), which are checked against what they
//! are tied to rather than loaded.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::Path;

use candle_core::{bail, DType, Device, Result, Tensor};
use candle_nn::VarMap;
use safetensors::tensor::{Dtype as StDtype, View};

/// What a load did, by tensor name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    /// Parameters set from the file (`VarMap` names).
    pub loaded: Vec<String>,
    /// Parameters of the `VarMap` the file does not hold (left as they were).
    pub missing: Vec<String>,
    /// File tensors that match no parameter (ignored).
    pub unexpected: Vec<String>,
    /// File tensors skipped on purpose: buffers and tied copies equal to their source.
    pub skipped: Vec<String>,
}

impl LoadReport {
    /// True when every parameter was loaded and nothing in the file went unused.
    pub fn is_exact(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty()
    }

    /// Fails, naming the tensors, unless every parameter was found.
    pub fn ensure_no_missing(&self) -> Result<()> {
        if !self.missing.is_empty() {
            bail!("checkpoint lacks parameters: {}", self.missing.join(", "))
        }
        Ok(())
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "loaded {} tensors, skipped {}",
            self.loaded.len(),
            self.skipped.len()
        )?;
        if !self.missing.is_empty() {
            write!(f, "; missing: {}", self.missing.join(", "))?;
        }
        if !self.unexpected.is_empty() {
            write!(f, "; unexpected: {}", self.unexpected.join(", "))?;
        }
        Ok(())
    }
}

const HEAD_PREFIXES: [&str; 2] = ["transformer.", "bert."];

/// Spellings under which parameter `name` may appear in a file, best first.
fn candidates(name: &str) -> Vec<String> {
    let mut names = vec![name.to_string()];
    for p in HEAD_PREFIXES {
        match name.strip_prefix(p) {
            Some(rest) => names.push(rest.to_string()),
            None => names.push(format!("{p}{name}")),
        }
    }
    let legacy: Vec<String> = names
        .iter()
        .filter_map(|n| {
            n.strip_suffix("LayerNorm.weight")
                .map(|s| format!("{s}LayerNorm.gamma"))
                .or_else(|| {
                    n.strip_suffix("LayerNorm.bias")
                        .map(|s| format!("{s}LayerNorm.beta"))
                })
        })
        .collect();
    names.extend(legacy);
    names
}

/// Non-parameter buffers some exporters include.
fn is_buffer(file_name: &str) -> bool {
    file_name.ends_with(".attn.bias")
        || file_name.ends_with(".attn.masked_bias")
        || file_name.ends_with("position_ids")
}

/// The parameter a tied copy duplicates (`VarMap` spelling, before prefix aliasing).
fn tie_source(file_name: &str) -> Option<&'static str> {
    match file_name {
        "lm_head.weight" => Some("transformer.wte.weight"),
        "cls.predictions.decoder.weight" => Some("bert.embeddings.word_embeddings.weight"),
        "cls.predictions.decoder.bias" => Some("cls.predictions.bias"),
        _ => None,
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?.to_device(&Device::Cpu)?;
    let b = b.to_dtype(DType::F64)?.to_device(&Device::Cpu)?;
    (a - b)?.abs()?.max_all()?.to_scalar::<f64>()
}

/// Copies the tensors of the safetensors file at `path` into the `VarMap`'s parameters (by name,
/// converting dtype and device). Fails only on unreadable files and shape mismatches; what
/// did not match either way is in the report.
pub fn load_hf_safetensors(varmap: &VarMap, path: impl AsRef<Path>) -> Result<LoadReport> {
    let path = path.as_ref();
    let file = candle_core::safetensors::load(path, &Device::Cpu)?;
    load_tensors(varmap, &file)
}

/// As [`load_hf_safetensors`], from tensors already in memory (file names as keys).
pub fn load_tensors(varmap: &VarMap, file: &HashMap<String, Tensor>) -> Result<LoadReport> {
    let vars = varmap.data().lock().expect("varmap lock");
    let mut report = LoadReport::default();
    let mut used = HashSet::new();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        let var = &vars[name];
        let Some(src) = candidates(name).into_iter().find(|c| file.contains_key(c)) else {
            report.missing.push(name.clone());
            continue;
        };
        let t = &file[&src];
        if t.dims() != var.dims() {
            bail!(
                "checkpoint tensor `{src}` has shape {:?}, parameter `{name}` expects {:?}",
                t.dims(),
                var.dims()
            )
        }
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        used.insert(src);
        report.loaded.push(name.clone());
    }
    let mut rest: Vec<&String> = file.keys().filter(|k| !used.contains(*k)).collect();
    rest.sort();
    for name in rest {
        if is_buffer(name) {
            report.skipped.push(name.clone());
            continue;
        }
        // A tied copy is fine when it equals what it is tied to (the model uses that one).
        let tied = tie_source(name).and_then(|s| {
            candidates(s)
                .into_iter()
                .find_map(|c| vars.get(&c).map(|v| v.as_tensor().clone()))
        });
        match tied {
            Some(src) if src.dims() == file[name].dims() => {
                let tol = if src.dtype() == DType::F32 || src.dtype() == DType::F64 {
                    1e-6
                } else {
                    1e-2
                };
                if max_abs_diff(&src, &file[name])? <= tol {
                    report.skipped.push(name.clone());
                } else {
                    report.unexpected.push(name.clone());
                }
            }
            _ => report.unexpected.push(name.clone()),
        }
    }
    Ok(report)
}

/// One tensor's bytes for the safetensors writer.
struct Bytes {
    dtype: StDtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Bytes {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The elements of a flat tensor, little-endian.
fn le_bytes<T: candle_core::WithDType, const N: usize>(
    flat: &Tensor,
    to_le: fn(T) -> [u8; N],
) -> Result<Vec<u8>> {
    Ok(flat.to_vec1::<T>()?.into_iter().flat_map(to_le).collect())
}

fn to_bytes(t: &Tensor) -> Result<Bytes> {
    let flat = t.to_device(&Device::Cpu)?.flatten_all()?;
    let (dtype, data) = match t.dtype() {
        DType::F32 => (StDtype::F32, le_bytes(&flat, f32::to_le_bytes)?),
        DType::F64 => (StDtype::F64, le_bytes(&flat, f64::to_le_bytes)?),
        DType::F16 => (StDtype::F16, le_bytes(&flat, half::f16::to_le_bytes)?),
        DType::BF16 => (StDtype::BF16, le_bytes(&flat, half::bf16::to_le_bytes)?),
        other => bail!("save: unsupported parameter dtype {other:?}"),
    };
    Ok(Bytes {
        dtype,
        shape: t.dims().to_vec(),
        data,
    })
}

/// Writes named tensors as safetensors with `{"format": "pt"}` metadata, which `transformers`
/// requires of the files it loads.
pub fn save_tensors(tensors: &BTreeMap<String, Tensor>, path: impl AsRef<Path>) -> Result<()> {
    let bytes: Vec<(String, Bytes)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), to_bytes(t)?)))
        .collect::<Result<_>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize_to_file(
        bytes.iter().map(|(n, b)| (n.as_str(), b)),
        Some(metadata),
        path.as_ref(),
    )
    .map_err(candle_core::Error::wrap)
}

/// Saves every parameter of the `VarMap` under its (Hugging Face) name. Tied weights exist once
/// in the map, so the file has no `lm_head.weight` / `cls.predictions.decoder.weight`, like the
/// files `save_pretrained` writes.
pub fn save_hf_safetensors(varmap: &VarMap, path: impl AsRef<Path>) -> Result<()> {
    let tensors: BTreeMap<String, Tensor> = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    save_tensors(&tensors, path)
}

/// Writes a directory `transformers` can open with `from_pretrained`: `config.json` (e.g.
/// [`crate::Gpt2Config::to_hf_json`]) and `model.safetensors`.
pub fn save_hf_dir(
    varmap: &VarMap,
    config: &serde_json::Value,
    dir: impl AsRef<Path>,
) -> Result<()> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir)?;
    let json = serde_json::to_string_pretty(config).map_err(candle_core::Error::wrap)?;
    std::fs::write(dir.join("config.json"), json)?;
    save_hf_safetensors(varmap, dir.join("model.safetensors"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidate_spellings() {
        let c = candidates("bert.embeddings.LayerNorm.weight");
        assert!(c.contains(&"embeddings.LayerNorm.weight".to_string()));
        assert!(c.contains(&"embeddings.LayerNorm.gamma".to_string()));
        assert!(c.contains(&"bert.embeddings.LayerNorm.gamma".to_string()));
        let c = candidates("transformer.h.0.attn.c_attn.weight");
        assert!(c.contains(&"h.0.attn.c_attn.weight".to_string()));
        let c = candidates("embeddings.word_embeddings.weight");
        assert!(c.contains(&"bert.embeddings.word_embeddings.weight".to_string()));
    }
}
