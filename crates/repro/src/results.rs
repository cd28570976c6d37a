//! The JSON written by a run (`results.json`): everything the markdown and the plots are rendered
//! from, so a committed results folder can be re-rendered without measuring again.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use flash_ops_bench::BWD_PER_FWD_FLOPS;
use serde::{Deserialize, Serialize};

pub const FILE: &str = "results.json";

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Results {
    pub meta: Meta,
    /// Table 1 and the memory table (FlashAttention 2022 protocol).
    pub attention: Option<AttnSection>,
    /// Table 2 (FlashAttention-2 Fig. 4–6 protocol).
    pub fa2: Option<Fa2Section>,
    /// Table 3 (end-to-end training throughput from `train bench`).
    pub e2e: Option<E2eSection>,
    /// Shared-prefix decoding (Hydragen protocol; absent in runs from before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<crate::prefix::PrefixSection>,
    /// Block-sparse attention (FlashAttention §3.3; absent in runs from before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocksparse: Option<crate::blocksparse::BlockSparseSection>,
    /// Perplexity vs context length (issue 14).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<crate::context::ContextSection>,
    /// Long Range Arena ListOps (issue 14).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listops: Option<crate::listops::ListopsSection>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Meta {
    /// `quick`, `full` or `gpu`.
    pub mode: String,
    pub machine: String,
    pub date: String,
    pub device: String,
    pub cpu: String,
    /// The `gemm` micro-kernels the CPU takes (`flash_ops_bench::gemm_path`); absent in runs
    /// from before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gemm_path: Option<String>,
    pub threads: usize,
    pub dtype: String,
    /// A large dense matmul in `dtype` on the device (`flash_ops_bench::gemm_ceiling`),
    /// measured at the start of the run: the roof for GFLOP/s.
    pub gemm_gflops: f64,
    pub git_commit: Option<String>,
    pub command: Vec<String>,
    /// Wall-clock seconds per section and in total.
    pub seconds: BTreeMap<String, f64>,
}

/// One attention measurement (or a skipped one, with the reason).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct AttnRow {
    /// `v1`, `v2`, `naive`, `candle-nn`.
    pub variant: String,
    pub batch: usize,
    pub heads: usize,
    pub n: usize,
    pub d: usize,
    pub causal: bool,
    pub dropout_and_padding: bool,
    pub fwd_ms: Option<f64>,
    pub fwd_bwd_ms: Option<f64>,
    pub fwd_mem_bytes: Option<u64>,
    pub fwd_bwd_mem_bytes: Option<u64>,
    /// 4·N²·d·H·batch, halved when causal (FlashAttention-2's count).
    pub fwd_flops: f64,
    pub reps: usize,
    /// Why this cell was not measured (e.g. predicted to exceed the memory budget).
    pub skipped: Option<String>,
}

impl AttnRow {
    /// Backward time as forward+backward minus forward (how both papers report it).
    pub fn bwd_ms(&self) -> Option<f64> {
        match (self.fwd_bwd_ms, self.fwd_ms) {
            (Some(a), Some(b)) if a > b => Some(a - b),
            _ => None,
        }
    }
    pub fn gflops_fwd(&self) -> Option<f64> {
        self.fwd_ms.map(|t| self.fwd_flops / t / 1e6)
    }
    pub fn gflops_bwd(&self) -> Option<f64> {
        self.bwd_ms()
            .map(|t| BWD_PER_FWD_FLOPS * self.fwd_flops / t / 1e6)
    }
    pub fn gflops_fwd_bwd(&self) -> Option<f64> {
        self.fwd_bwd_ms
            .map(|t| (1.0 + BWD_PER_FWD_FLOPS) * self.fwd_flops / t / 1e6)
    }
}

/// Table 1's protocol (FlashAttention 2022, §4.3 / Appendix E: fixed batch and heads), as
/// planned ([`crate::plan::Plan::t1`]) and as recorded.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct AttnSetup {
    pub batch: usize,
    pub heads: usize,
    pub d: usize,
    pub dropout: f32,
    pub lengths: Vec<usize>,
    /// Lengths measured for the memory table only (flash variants, plain setting, one repeat).
    pub memory_lengths: Vec<usize>,
}

impl AttnSetup {
    /// The memory table's rows: Table 1's lengths, then those measured for memory only.
    pub fn memory_table_lengths(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .lengths
            .iter()
            .chain(&self.memory_lengths)
            .copied()
            .collect();
        v.dedup();
        v
    }
}

/// Table 2's protocol (FlashAttention-2 Fig. 4–6: fixed batch×seq and hidden size), as planned
/// ([`crate::plan::Plan::t2`]) and as recorded.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Fa2Setup {
    /// batch × seq, constant across lengths.
    pub tokens: usize,
    /// heads × d, constant across head dims.
    pub hidden: usize,
    pub lengths: Vec<usize>,
    pub head_dims: Vec<usize>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct AttnSection {
    #[serde(flatten)]
    pub setup: AttnSetup,
    pub memory_budget_bytes: u64,
    pub rows: Vec<AttnRow>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Fa2Section {
    #[serde(flatten)]
    pub setup: Fa2Setup,
    pub memory_budget_bytes: u64,
    pub rows: Vec<AttnRow>,
    /// The PyTorch version of the `torch-sdpa` rows, when measured.
    #[serde(default)]
    pub torch: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct E2eSection {
    pub runs: Vec<E2eRun>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct E2eRun {
    pub label: String,
    /// Arguments given to `train bench`.
    pub args: Vec<String>,
    /// The JSON `train bench` wrote.
    pub report: Option<serde_json::Value>,
    pub error: Option<String>,
}

pub fn write(dir: &Path, r: &Results) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(FILE);
    let tmp = dir.join(format!("{FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_string_pretty(r)? + "\n")?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

pub fn read(dir: &Path) -> Result<Results> {
    let path = dir.join(FILE);
    let s =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&s).with_context(|| format!("parsing {}", path.display()))
}
