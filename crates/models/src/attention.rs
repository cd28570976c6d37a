//! The run-time attention choice shared by both models.
//!
//! Every kind takes the flash layout `(batch, seq, heads, head_dim)` and the same
//! [`AttnOptions`], so the models build their options once and never branch on the kind
//! elsewhere. `Naive` is flash-ops' reference (matmul, written-out softmax, matmul; backward by
//! Candle's autograd); the flash kinds run the fused op with its own backward.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;

use candle_core::{bail, DType, Result, Tensor};
use flash_ops::{flash_attn, reference::naive_attention, Algorithm, AttnOptions, BlockMask};

/// Which attention implementation a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionKind {
    /// Standard attention materialising the `N×N` scores (the baseline).
    Naive,
    /// FlashAttention (Dao et al., 2022).
    FlashV1,
    /// FlashAttention-2 (Dao, 2023).
    #[default]
    FlashV2,
}

impl AttentionKind {
    pub const ALL: [AttentionKind; 3] = [Self::Naive, Self::FlashV1, Self::FlashV2];

    /// Attention over q `(b, sq, hq, d)`, k/v `(b, sk, hk, d)`; returns `(b, sq, hq, d)`.
    /// `opts.algorithm` is overridden by the kind.
    pub fn attend(self, q: &Tensor, k: &Tensor, v: &Tensor, opts: AttnOptions) -> Result<Tensor> {
        match self {
            Self::Naive => naive_attention(q, k, v, &opts),
            Self::FlashV1 | Self::FlashV2 => {
                if q.dtype() == DType::F64 {
                    // The fused kernels run f32/f16/bf16; f64 models (gradient checks) use Naive.
                    bail!("attention {self}: f64 is only supported by the naive attention")
                }
                let algorithm = if self == Self::FlashV1 {
                    Algorithm::V1
                } else {
                    Algorithm::V2
                };
                flash_attn(q, k, v, &opts.algorithm(algorithm))
            }
        }
    }
}

impl fmt::Display for AttentionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Naive => "naive",
            Self::FlashV1 => "flash1",
            Self::FlashV2 => "flash2",
        })
    }
}

impl FromStr for AttentionKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "naive" | "standard" => Ok(Self::Naive),
            "flash1" | "flashv1" | "flash-v1" | "v1" => Ok(Self::FlashV1),
            "flash2" | "flashv2" | "flash-v2" | "v2" | "flash" => Ok(Self::FlashV2),
            other => Err(format!(
                "unknown attention `{other}` (expected naive, flash1 or flash2)"
            )),
        }
    }
}

/// A block-sparse attention pattern (FlashAttention §3.3) that a model applies in every layer,
/// on top of its own rule (GPT-2: causal; BERT: key padding). Every attention kind honours it
/// (naive applies the expanded element mask: it is the oracle).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum SparsePattern {
    /// No block mask.
    #[default]
    Dense,
    /// Block (r, c) iff r == c or r ^ c is a power of two (the pattern FA1 §3.3 trains with).
    Butterfly,
    /// Keys within `window` of the query (left only under a causal model).
    Local { window: usize },
    /// Sparse Transformer's strided pattern with `local = stride` (Child et al. 2019).
    Strided { stride: usize },
    /// Longformer/BigBird: a local window plus `global` tokens at the start.
    LocalGlobal { window: usize, global: usize },
    /// Whole blocks at random, each query block keeping `density` of its key blocks (per head).
    Random { density: f64, seed: u64 },
}

/// A [`SparsePattern`] and its block size `(bq, bk)` (default [`BlockMask::DEFAULT_BLOCK`]).
///
/// Text form: `dense`, `butterfly`, `local:W`, `strided:S`, `local-global:W,G`,
/// `random:DENSITY[:SEED]`, each with an optional `@BQxBK` (or `@B`) block-size suffix.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sparsity {
    pub pattern: SparsePattern,
    pub block: (usize, usize),
}

impl Default for Sparsity {
    fn default() -> Self {
        Self {
            pattern: SparsePattern::Dense,
            block: BlockMask::DEFAULT_BLOCK,
        }
    }
}

impl Sparsity {
    pub fn is_dense(&self) -> bool {
        self.pattern == SparsePattern::Dense
    }

    /// The block mask of self-attention over `len` tokens with `heads` query heads (`None` when
    /// dense). `causal`: the model is causal, so a local window needs no right half.
    pub fn mask(&self, len: usize, heads: usize, causal: bool) -> Result<Option<BlockMask>> {
        let b = self.block;
        Ok(Some(match self.pattern {
            SparsePattern::Dense => return Ok(None),
            SparsePattern::Butterfly => BlockMask::butterfly(len, len, b)?,
            SparsePattern::Local { window } => {
                let right = if causal { 0 } else { window };
                BlockMask::sliding_window(len, len, b, window, right)?
            }
            SparsePattern::Strided { stride } => BlockMask::strided(len, len, b, stride, stride)?,
            SparsePattern::LocalGlobal { window, global } => {
                BlockMask::local_global(len, len, b, window, global)?
            }
            SparsePattern::Random { density, seed } => {
                BlockMask::random(len, len, b, heads, density, seed)?
            }
        }))
    }
}

impl fmt::Display for Sparsity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pattern {
            SparsePattern::Dense => f.write_str("dense")?,
            SparsePattern::Butterfly => f.write_str("butterfly")?,
            SparsePattern::Local { window } => write!(f, "local:{window}")?,
            SparsePattern::Strided { stride } => write!(f, "strided:{stride}")?,
            SparsePattern::LocalGlobal { window, global } => {
                write!(f, "local-global:{window},{global}")?
            }
            SparsePattern::Random { density, seed } => write!(f, "random:{density}:{seed}")?,
        }
        if self.block != BlockMask::DEFAULT_BLOCK && !self.is_dense() {
            write!(f, "@{}x{}", self.block.0, self.block.1)?
        }
        Ok(())
    }
}

impl FromStr for Sparsity {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        const EXPECTED: &str = "expected dense, butterfly, local:W, strided:S, local-global:W,G or random:DENSITY[:SEED], optionally @BQxBK";
        let bad = |why: &str| format!("sparsity `{s}`: {why} ({EXPECTED})");
        let (pattern, block) = match s.split_once('@') {
            Some((p, b)) => (p, Some(b)),
            None => (s, None),
        };
        let int = |v: &str, what: &str| -> std::result::Result<usize, String> {
            v.trim()
                .parse()
                .map_err(|_| bad(&format!("{what} `{v}` is not a non-negative integer")))
        };
        let block = match block {
            None => BlockMask::DEFAULT_BLOCK,
            Some(b) => {
                let (bq, bk) = b.split_once(['x', 'X', ',']).unwrap_or((b, b));
                let block = (int(bq, "block size")?, int(bk, "block size")?);
                if block.0 == 0 || block.1 == 0 {
                    return Err(bad("block sizes must be positive"));
                }
                block
            }
        };
        let (name, arg) = pattern.split_once(':').unwrap_or((pattern, ""));
        let pattern = match (name.to_ascii_lowercase().as_str(), arg) {
            ("dense" | "none", "") => SparsePattern::Dense,
            ("butterfly", "") => SparsePattern::Butterfly,
            ("local" | "window", w) if !w.is_empty() => SparsePattern::Local {
                window: int(w, "window")?,
            },
            ("strided", st) if !st.is_empty() => match int(st, "stride")? {
                0 => return Err(bad("the stride must be positive")),
                stride => SparsePattern::Strided { stride },
            },
            ("local-global", a) => {
                let (w, g) = a
                    .split_once(',')
                    .ok_or_else(|| bad("local-global takes WINDOW,GLOBAL"))?;
                SparsePattern::LocalGlobal {
                    window: int(w, "window")?,
                    global: int(g, "global")?,
                }
            }
            ("random", a) if !a.is_empty() => {
                let (d, seed) = a.split_once(':').unwrap_or((a, "0"));
                let density: f64 = d
                    .parse()
                    .map_err(|_| bad(&format!("density `{d}` is not a number")))?;
                if !(density > 0.0 && density <= 1.0) {
                    return Err(bad("the density must be in (0, 1]"));
                }
                let seed = seed
                    .parse()
                    .map_err(|_| bad(&format!("seed `{seed}` is not an integer")))?;
                SparsePattern::Random { density, seed }
            }
            _ => return Err(bad("unknown pattern or missing argument")),
        };
        Ok(Self { pattern, block })
    }
}

// Configs carry the pattern as its text form; a dense config omits the field, so HF files and
// ours stay the same as before.
impl serde::Serialize for Sparsity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Sparsity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A model's block masks, built once per (query length, key length) and shared by its layers.
///
/// Every mask is the top-left corner of the pattern at the model's context length, so what a
/// position sees never depends on the length of the call: the positional patterns are their own
/// corners (built directly at `n`); random blocks are drawn once at the context length. A call
/// with fewer queries than keys (decoding with a KV cache: the queries are the last `q` of the
/// `k` positions) takes the matching rows of the length-`k` mask, so a model decodes with the
/// pattern it trained with.
#[derive(Debug)]
pub(crate) struct MaskCache {
    sparsity: Sparsity,
    heads: usize,
    causal: bool,
    context: usize,
    masks: Mutex<HashMap<(usize, usize), BlockMask>>,
}

/// Bounds the cache under long generations (one decode mask per length).
const MAX_CACHED_MASKS: usize = 512;

impl MaskCache {
    /// Checks the pattern on one block's length (block sizes, density) so a bad config fails
    /// when the model is built, not at its first forward.
    pub(crate) fn new(
        sparsity: Sparsity,
        heads: usize,
        causal: bool,
        context: usize,
    ) -> Result<Self> {
        let (bq, bk) = sparsity.block;
        if let Err(e) = sparsity.mask(bq.max(bk), heads, causal) {
            bail!("sparsity `{sparsity}`: {e}")
        }
        Ok(Self {
            sparsity,
            heads,
            causal,
            context,
            masks: Mutex::new(HashMap::new()),
        })
    }

    /// Adds the block mask for `q_len` queries against `k_len` keys to `opts` (none when dense).
    pub(crate) fn apply(
        &self,
        opts: AttnOptions,
        q_len: usize,
        k_len: usize,
    ) -> Result<AttnOptions> {
        Ok(match self.get(q_len, k_len)? {
            Some(m) => opts.block_mask(m),
            None => opts,
        })
    }

    fn get(&self, q_len: usize, k_len: usize) -> Result<Option<BlockMask>> {
        if self.sparsity.is_dense() {
            return Ok(None);
        }
        if let Some(m) = self.lock().get(&(q_len, k_len)) {
            return Ok(Some(m.clone()));
        }
        let random = matches!(self.sparsity.pattern, SparsePattern::Random { .. });
        let mask = if q_len == k_len && random && k_len < self.context {
            self.get(self.context, self.context)?
                .map(|m| self.corner(&m, k_len))
                .transpose()?
        } else if q_len == k_len {
            self.sparsity.mask(k_len, self.heads, self.causal)?
        } else {
            let full = self.get(k_len, k_len)?;
            full.map(|full| {
                let past = k_len - q_len;
                BlockMask::from_predicate(
                    q_len,
                    k_len,
                    self.sparsity.block,
                    1,
                    full.heads(),
                    |_, h, i, j| full.visible(0, h, i + past, j),
                )
            })
            .transpose()?
        };
        if let Some(m) = &mask {
            let mut masks = self.lock();
            if masks.len() >= MAX_CACHED_MASKS {
                masks.clear()
            }
            masks.insert((q_len, k_len), m.clone());
        }
        Ok(mask)
    }

    /// The first `n` rows and columns of a mask of whole (full) blocks, as a block layout.
    fn corner(&self, m: &BlockMask, n: usize) -> Result<BlockMask> {
        let (bq, bk) = m.block_size();
        let (qb, kb, heads) = (n.div_ceil(bq), n.div_ceil(bk), m.heads());
        let mut layout = Vec::with_capacity(heads * qb * kb);
        for h in 0..heads {
            for r in 0..qb {
                layout.extend((0..kb).map(|c| m.visible(0, h, r * bq, c * bk) as u8));
            }
        }
        let layout = Tensor::from_vec(layout, (heads, qb, kb), &candle_core::Device::Cpu)?;
        BlockMask::from_block_layout(&layout, n, n, (bq, bk))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(usize, usize), BlockMask>> {
        // The map holds only finished masks: a panic elsewhere leaves it consistent.
        self.masks.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_display_round_trip() {
        for kind in AttentionKind::ALL {
            assert_eq!(kind.to_string().parse::<AttentionKind>().unwrap(), kind);
        }
        assert!("flash3".parse::<AttentionKind>().is_err());
    }

    #[test]
    fn sparsity_parse_display_round_trip() {
        let cases = [
            ("dense", SparsePattern::Dense, (128, 128)),
            ("butterfly", SparsePattern::Butterfly, (128, 128)),
            (
                "local:256",
                SparsePattern::Local { window: 256 },
                (128, 128),
            ),
            (
                "strided:64@64x32",
                SparsePattern::Strided { stride: 64 },
                (64, 32),
            ),
            (
                "local-global:128,16@64x64",
                SparsePattern::LocalGlobal {
                    window: 128,
                    global: 16,
                },
                (64, 64),
            ),
            (
                "random:0.25:7",
                SparsePattern::Random {
                    density: 0.25,
                    seed: 7,
                },
                (128, 128),
            ),
        ];
        for (text, pattern, block) in cases {
            let s: Sparsity = text.parse().unwrap();
            assert_eq!((s.pattern, s.block), (pattern, block), "{text}");
            assert_eq!(s.to_string(), text);
            assert_eq!(s.to_string().parse::<Sparsity>().unwrap(), s);
        }
        let square: Sparsity = "butterfly@64".parse().unwrap();
        assert_eq!(square.block, (64, 64));
        let seedless: Sparsity = "random:0.5".parse().unwrap();
        assert_eq!(
            seedless.pattern,
            SparsePattern::Random {
                density: 0.5,
                seed: 0
            }
        );
        for bad in [
            "",
            "local",
            "local:x",
            "strided:0",
            "random:0",
            "random:1.5",
            "random:0.5:x",
            "local-global:4",
            "butterfly@0x16",
            "butterfly@16xq",
            "diagonal",
        ] {
            let e = bad.parse::<Sparsity>().unwrap_err();
            assert!(
                e.contains("sparsity") && e.contains("expected"),
                "{bad}: {e}"
            );
        }
    }
}
