//! `OUT/metrics.jsonl`: one JSON object per line, `{"kind": "train"|"val", "step", ...}`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Creates `dir` and proves a file can be written in it.
pub fn ensure_writable_dir(dir: &Path) -> Result<()> {
    let fail = |e: std::io::Error| {
        anyhow::anyhow!(
            "cannot write to output directory {} ({e}); pass a writable --out",
            dir.display()
        )
    };
    std::fs::create_dir_all(dir).map_err(fail)?;
    let probe = dir.join(format!(".write-test-{}", std::process::id()));
    std::fs::write(&probe, b"ok").map_err(fail)?;
    std::fs::remove_file(&probe).map_err(fail)?;
    Ok(())
}

/// `ensure_writable_dir` for the folder a file goes into.
pub fn ensure_writable_parent(file: &Path) -> Result<()> {
    match file.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(p) => ensure_writable_dir(p),
        None => Ok(()),
    }
}

pub struct Metrics {
    path: PathBuf,
}

impl Metrics {
    pub fn path(out: &Path) -> PathBuf {
        out.join("metrics.jsonl")
    }

    /// Opens the metrics of a run; `keep_until` drops records after that step (a resumed run
    /// continues from its checkpoint, so later records of the killed run are replaced).
    pub fn open(out: &Path, keep_until: Option<u64>) -> Result<Self> {
        let path = Self::path(out);
        match keep_until {
            None => {
                std::fs::write(&path, b"")
                    .with_context(|| format!("creating {}", path.display()))?;
            }
            Some(step) => {
                let kept: Vec<serde_json::Value> = read(&path)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|r| {
                        r.get("step")
                            .and_then(|s| s.as_u64())
                            .is_some_and(|s| s <= step)
                    })
                    .collect();
                let mut text = String::new();
                for r in kept {
                    text.push_str(&r.to_string());
                    text.push('\n');
                }
                crate::checkpoint::write_atomic(&path, text.as_bytes())?;
            }
        }
        Ok(Self { path })
    }

    pub fn append(&self, record: &serde_json::Value) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))?;
        writeln!(f, "{record}")?;
        Ok(())
    }
}

/// Reads a metrics file (unparseable lines, e.g. one cut by a crash, are skipped).
pub fn read(path: &Path) -> Result<Vec<serde_json::Value>> {
    if !path.exists() {
        bail!(
            "{} does not exist; pass a run folder written by `train gpt2`/`train bert`",
            path.display()
        )
    }
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}
