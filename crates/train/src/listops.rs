//! ListOps (Nangia & Bowman 2018) as Long Range Arena sets it (Tay et al. 2020, §3.1): nested
//! `MAX`, `MIN`, `MED` (median, the integer part as LRA's `int(np.median)`) and `SM` (sum modulo
//! 10) over the digits 0–9; the answer is a digit, so 10 classes. Our own generator of LRA's
//! recipe: a node below `max_depth` is an operator with probability 1/4 (LRA's `VALUE_P`),
//! else a digit; an operator takes 2..=`max_args` arguments; the root is always an operator; a
//! tree is kept only when its token count lies in `[min_tokens, max_tokens]` (LRA: 500–2000,
//! depth 10, 10 arguments). The token format is LRA's, space-separated: `[MAX 2 9 [MIN 4 7 ] 0 ]`
//! (operators open with `[MAX`, `[MIN`, `[MED`, `[SM`, and `]` closes); LRA's files also carry
//! the parentheses of its binarised trees, which its input pipeline does not feed the model, so
//! they are left out. Splits are drawn from streams seeded by `(seed, split)`, so each split is
//! fixed by the seed alone and does not depend on the other splits' sizes.

use std::collections::HashMap;

use anyhow::{bail, Result};
use flash_ops_models::rng;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::Tokenizer;

/// The operators in LRA's spelling (the opening token of each list).
pub const OPS: [&str; 4] = ["[MAX", "[MIN", "[MED", "[SM"];
pub const CLOSE: &str = "]";
pub const DIGITS: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
/// LRA's `VALUE_P`: below the maximum depth, a node is an operator with this probability.
const OP_P: f64 = 0.25;
/// Salts the split streams apart from the other uses of `--seed`.
const SPLIT_SALT: u64 = 0x1157_0B5E;
/// Gives up after this many trees in a row outside the bounds: bounds that almost no tree
/// meets are an error, not a hang.
const MAX_MISSES: usize = 100_000;

/// The shape of the expressions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spec {
    pub min_tokens: usize,
    pub max_tokens: usize,
    pub max_depth: usize,
    pub max_args: usize,
}

impl Spec {
    /// LRA's bounds for a model of `positions` tokens, two of them `[CLS]` and `[SEP]`: up to
    /// `positions − 2` tokens and at least a quarter of that (LRA's 500 of 2000).
    pub fn for_positions(positions: usize) -> Self {
        let max_tokens = positions.saturating_sub(2);
        Spec {
            min_tokens: max_tokens / 4,
            max_tokens,
            max_depth: 10,
            max_args: 10,
        }
    }

    pub fn check(&self) -> Result<()> {
        if self.max_tokens < 4 {
            bail!(
                "ListOps --listops-max-tokens {} is too short; the smallest expression, `[MAX 1 2 ]`, has 4 tokens",
                self.max_tokens
            )
        }
        if self.min_tokens > self.max_tokens {
            bail!(
                "ListOps --listops-min-tokens {} exceeds --listops-max-tokens {}; lower it",
                self.min_tokens,
                self.max_tokens
            )
        }
        if self.max_depth < 1 || self.max_args < 2 {
            bail!(
                "ListOps needs --listops-max-depth ≥ 1 and --listops-max-args ≥ 2 (got {} and {})",
                self.max_depth,
                self.max_args
            )
        }
        Ok(())
    }
}

/// One expression: its tokens (space-separated) and its value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub text: String,
    pub label: u8,
}

/// Train, validation and test examples.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Splits {
    pub train: Vec<Example>,
    pub validation: Vec<Example>,
    pub test: Vec<Example>,
}

/// Applies operator `op` (an index into [`OPS`]) to its arguments.
fn apply(op: usize, args: &[u8]) -> u8 {
    match op {
        0 => *args.iter().max().expect("an operator has arguments"),
        1 => *args.iter().min().expect("an operator has arguments"),
        2 => {
            let mut s = args.to_vec();
            s.sort_unstable();
            let n = s.len();
            if n % 2 == 1 {
                s[n / 2]
            } else {
                // int(np.median): the mean of the middle two, truncated.
                ((u16::from(s[n / 2 - 1]) + u16::from(s[n / 2])) / 2) as u8
            }
        }
        _ => (args.iter().map(|&v| u32::from(v)).sum::<u32>() % 10) as u8,
    }
}

/// Appends a subtree at `depth` to `out` and returns its value, or `None` once `out` passes
/// `max` tokens (the tree is rejected, so the rest need not be drawn).
fn node(r: &mut ChaCha8Rng, spec: &Spec, depth: usize, out: &mut Vec<&'static str>) -> Option<u8> {
    let is_op = depth == 1 || (depth < spec.max_depth && r.random_bool(OP_P));
    if !is_op {
        let v = r.random_range(0..10u8);
        out.push(DIGITS[v as usize]);
        return (out.len() <= spec.max_tokens).then_some(v);
    }
    let op = r.random_range(0..OPS.len());
    let n = r.random_range(2..=spec.max_args);
    out.push(OPS[op]);
    let mut args = Vec::with_capacity(n);
    for _ in 0..n {
        args.push(node(r, spec, depth + 1, out)?);
    }
    out.push(CLOSE);
    (out.len() <= spec.max_tokens).then(|| apply(op, &args))
}

/// `n` expressions within the bounds from stream `seed`.
pub fn draw(spec: &Spec, n: usize, seed: u64) -> Result<Vec<Example>> {
    spec.check()?;
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n);
    let mut toks = Vec::new();
    let mut misses = 0usize;
    while out.len() < n {
        if misses == MAX_MISSES {
            bail!(
                "ListOps: {misses} trees in a row fell outside {}..={} tokens at depth ≤ {} with ≤ {} arguments ({} of {n} found); widen the bounds",
                spec.min_tokens,
                spec.max_tokens,
                spec.max_depth,
                spec.max_args,
                out.len()
            )
        }
        misses += 1;
        toks.clear();
        let Some(label) = node(&mut r, spec, 1, &mut toks) else {
            continue;
        };
        if toks.len() >= spec.min_tokens {
            misses = 0;
            out.push(Example {
                text: toks.join(" "),
                label,
            });
        }
    }
    Ok(out)
}

/// The three splits, each from its own stream of `seed`.
pub fn splits(spec: &Spec, sizes: [usize; 3], seed: u64) -> Result<Splits> {
    let [train, validation, test] =
        [0, 1, 2].map(|i| draw(spec, sizes[i], rng::derive(seed ^ SPLIT_SALT, i as u64)));
    Ok(Splits {
        train: train?,
        validation: validation?,
        test: test?,
    })
}

/// The special tokens of the ListOps vocabulary, `[PAD]` first (BERT's pad id 0).
pub const SPECIALS: [&str; 4] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"];

/// A word-level tokenizer over the ListOps vocabulary: the specials, the digits, the operators
/// and `]`, split on spaces (19 tokens).
pub fn tokenizer() -> Result<Tokenizer> {
    let vocab: HashMap<String, u32> = SPECIALS
        .iter()
        .chain(&DIGITS)
        .chain(&OPS)
        .chain(&[CLOSE])
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("[UNK]".into())
        .build()
        .map_err(|e| anyhow::anyhow!("building the ListOps vocabulary: {e}"))?;
    let mut tok = Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(WhitespaceSplit));
    Ok(tok)
}
