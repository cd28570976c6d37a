//! Labelled text for `train bert-classify`: JSONL (`{"text": …, "label": …}`), CSV/TSV with a
//! header row, or a folder with one subfolder of text files per label.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::data::entries;

/// One example: its text, its label, and where it came from (for messages).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub text: String,
    pub label: String,
    pub origin: String,
}

/// The names of the text and label fields.
#[derive(clap::Args, Debug, Clone)]
pub struct Columns {
    /// The text field (JSONL) or column (CSV/TSV).
    #[arg(long = "text-column", default_value = "text")]
    pub text: String,
    /// The label field (JSONL) or column (CSV/TSV).
    #[arg(long = "label-column", default_value = "label")]
    pub label: String,
}

/// The examples of every path, in order.
pub fn read(paths: &[PathBuf], cols: &Columns, flag: &str) -> Result<Vec<Example>> {
    if paths.is_empty() {
        bail!("{flag} is required: a .jsonl, .csv or .tsv file, or a folder with one subfolder per label")
    }
    let mut out = Vec::new();
    for p in paths {
        if !p.exists() {
            bail!("{flag} {} does not exist; pass labelled data (.jsonl, .csv, .tsv or a folder per label)", p.display())
        }
        let before = out.len();
        if p.is_dir() {
            read_folders(p, &mut out)?;
        } else {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("{flag} {}: not readable as UTF-8 text", p.display()))?;
            match p.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
                Some("jsonl") | Some("json") => read_jsonl(p, &text, cols, &mut out)?,
                Some("csv") => read_table(p, &text, b',', cols, &mut out)?,
                Some("tsv") => read_table(p, &text, b'\t', cols, &mut out)?,
                _ => bail!(
                    "{flag} {}: unknown format; use .jsonl, .csv, .tsv, or a folder with one subfolder per label",
                    p.display()
                ),
            }
        }
        if out.len() == before {
            bail!("{flag} {} holds no examples", p.display())
        }
    }
    Ok(out)
}

/// `DIR/LABEL/*`: each file is one example of its folder's label.
fn read_folders(dir: &Path, out: &mut Vec<Example>) -> Result<()> {
    let labels = entries(dir, Path::is_dir)?;
    if labels.len() < 2 {
        bail!(
            "{} has {} label folder(s); a folder of labelled data needs one subfolder per label (at least two)",
            dir.display(),
            labels.len()
        )
    }
    for l in labels {
        let label = l
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("?")
            .to_string();
        let files = entries(&l, Path::is_file)?;
        if files.is_empty() {
            bail!(
                "class folder {} is empty; put at least one text file in it or remove it",
                l.display()
            )
        }
        for f in files {
            // Mail and web corpora mix encodings: undecodable bytes become U+FFFD.
            let text = String::from_utf8_lossy(&std::fs::read(&f)?).into_owned();
            out.push(Example {
                text,
                label: label.clone(),
                origin: f.display().to_string(),
            });
        }
    }
    Ok(())
}

/// A JSON label: a string, or a number/boolean spelled as JSON.
fn label_string(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(_) | serde_json::Value::Bool(_) => Some(v.to_string()),
        _ => None,
    }
}

fn read_jsonl(p: &Path, text: &str, cols: &Columns, out: &mut Vec<Example>) -> Result<()> {
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{} line {}", p.display(), i + 1);
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            anyhow::anyhow!("{at} is not a JSON object ({e}); JSONL needs one object per line")
        })?;
        let Some(t) = v.get(&cols.text).and_then(|t| t.as_str()) else {
            bail!(
                "{at} has no string field {:?}; name the text field with --text-column",
                cols.text
            )
        };
        let Some(l) = v.get(&cols.label).and_then(label_string) else {
            bail!(
                "{at} has no field {:?}; name the label field with --label-column",
                cols.label
            )
        };
        out.push(Example {
            text: t.to_string(),
            label: l,
            origin: at,
        });
    }
    Ok(())
}

/// RFC 4180 records: fields separated by `sep`, optionally double-quoted (`""` inside quotes is
/// a quote; quoted fields may span lines).
fn records(text: &str, sep: u8) -> Result<Vec<Vec<String>>> {
    let mut rows = Vec::new();
    let (mut row, mut field) = (Vec::new(), Vec::<u8>::new());
    let (mut quoted, mut at_start) = (false, true);
    let b = text.as_bytes();
    let mut i = 0;
    let take = |f: &mut Vec<u8>| String::from_utf8(std::mem::take(f)).expect("splits at ASCII");
    while i < b.len() {
        let c = b[i];
        if quoted {
            if c == b'"' && b.get(i + 1) == Some(&b'"') {
                field.push(b'"');
                i += 1;
            } else if c == b'"' {
                quoted = false;
            } else {
                field.push(c);
            }
        } else if c == b'"' && at_start {
            quoted = true;
        } else if c == sep {
            row.push(take(&mut field));
            at_start = true;
            i += 1;
            continue;
        } else if c == b'\n' || c == b'\r' {
            if c == b'\r' && b.get(i + 1) == Some(&b'\n') {
                i += 1;
            }
            row.push(take(&mut field));
            if !(row.len() == 1 && row[0].is_empty()) {
                rows.push(std::mem::take(&mut row));
            }
            row.clear();
            at_start = true;
            i += 1;
            continue;
        } else {
            field.push(c);
        }
        at_start = false;
        i += 1;
    }
    if quoted {
        bail!("a quoted field is not closed")
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(take(&mut field));
        rows.push(row);
    }
    Ok(rows)
}

fn read_table(p: &Path, text: &str, sep: u8, cols: &Columns, out: &mut Vec<Example>) -> Result<()> {
    let rows = records(text, sep).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    let Some((header, body)) = rows.split_first() else {
        bail!(
            "{} is empty; it needs a header row naming the columns",
            p.display()
        )
    };
    let col = |name: &str, flag: &str| -> Result<usize> {
        header.iter().position(|h| h.trim() == name).ok_or_else(|| {
            anyhow::anyhow!(
                "{} has no column {name:?} (its header: {}); name it with {flag}",
                p.display(),
                header.join(", ")
            )
        })
    };
    let (tc, lc) = (
        col(&cols.text, "--text-column")?,
        col(&cols.label, "--label-column")?,
    );
    for (i, r) in body.iter().enumerate() {
        let at = format!("{} row {}", p.display(), i + 2);
        if r.len() != header.len() {
            bail!(
                "{at} has {} fields, the header {}; quote fields that contain the separator",
                r.len(),
                header.len()
            )
        }
        out.push(Example {
            text: r[tc].clone(),
            label: r[lc].trim().to_string(),
            origin: at,
        });
    }
    Ok(())
}

/// The label set: `given` (a classifier's own labels) or the sorted labels of `train`; every
/// example's label must be in it and every label must have a training example.
pub fn label_set(
    given: Option<Vec<String>>,
    train: &[Example],
    val: &[Example],
) -> Result<Vec<String>> {
    let seen: BTreeSet<&str> = train.iter().map(|e| e.label.as_str()).collect();
    let labels = given.unwrap_or_else(|| seen.iter().map(|s| s.to_string()).collect());
    if labels.len() < 2 {
        bail!(
            "the training data has {} label(s) ({}); classification needs at least two",
            labels.len(),
            labels.join(", ")
        )
    }
    for e in train.iter().chain(val) {
        if !labels.contains(&e.label) {
            bail!(
                "{} has label {:?}, which is not in the label set [{}]; fix the label or start from a model with that label",
                e.origin,
                e.label,
                labels.join(", ")
            )
        }
    }
    if let Some(empty) = labels.iter().find(|l| !seen.contains(l.as_str())) {
        bail!(
            "label {empty:?} has no training examples (labels: {}); add examples of it",
            labels.join(", ")
        )
    }
    Ok(labels)
}

/// Holds out `fraction` of each label's examples (at least one where a label has two or more)
/// for validation, chosen by `seed`: `(train, validation)`.
pub fn split(all: Vec<Example>, fraction: f64, seed: u64) -> Result<(Vec<Example>, Vec<Example>)> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut by_label: BTreeMap<String, Vec<Example>> = BTreeMap::new();
    for e in all {
        by_label.entry(e.label.clone()).or_default().push(e);
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (_, mut xs) in by_label {
        xs.shuffle(&mut rng);
        let n_val = if xs.len() >= 2 {
            ((xs.len() as f64 * fraction).round() as usize).clamp(1, xs.len() - 1)
        } else {
            0
        };
        val.extend(xs.drain(..n_val));
        train.extend(xs);
    }
    if val.is_empty() {
        bail!("too few examples to hold out a validation split; add examples or pass --validation")
    }
    Ok((train, val))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_records_with_quotes() {
        let r = records("text,label\n\"a, \"\"b\"\"\nc\",1\r\nplain,0\n", b',').unwrap();
        assert_eq!(
            r,
            vec![
                vec!["text".to_string(), "label".into()],
                vec!["a, \"b\"\nc".into(), "1".into()],
                vec!["plain".into(), "0".into()],
            ]
        );
        assert!(records("a\n\"open", b',').is_err());
        let t = records("x\ty\n1\t2", b'\t').unwrap();
        assert_eq!(t[1], vec!["1".to_string(), "2".into()]);
    }

    #[test]
    fn labels_and_split() {
        let ex = |t: &str, l: &str| Example {
            text: t.into(),
            label: l.into(),
            origin: t.into(),
        };
        let all: Vec<Example> = (0..20)
            .map(|i| ex(&format!("t{i}"), if i % 4 == 0 { "b" } else { "a" }))
            .collect();
        let (train, val) = split(all.clone(), 0.2, 3).unwrap();
        assert_eq!((train.len(), val.len()), (16, 4));
        assert_eq!(val.iter().filter(|e| e.label == "b").count(), 1);
        assert_eq!(split(all, 0.2, 3).unwrap().1, val);
        assert_eq!(label_set(None, &train, &val).unwrap(), vec!["a", "b"]);
        let e = label_set(Some(vec!["a".into(), "c".into()]), &train, &val).unwrap_err();
        assert!(e.to_string().contains("not in the label set"), "{e}");
        let e = label_set(Some(vec!["a".into(), "b".into(), "z".into()]), &train, &val);
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("\"z\" has no training examples"));
    }
}
