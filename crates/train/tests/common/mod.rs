//! What the end-to-end tests of the `train` binary share: scratch folders, a small corpus, the
//! tiny model's flags, and running the binary with its one-line errors checked.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const BIN: &str = env!("CARGO_BIN_EXE_train");

pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("train-cli-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// ~60 kB of the corpus: tokenizes in a blink.
pub fn small_text(dir: &Path) -> PathBuf {
    let corpus = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../data/corpus/moby-dick.txt"
    ))
    .unwrap();
    let mut end = 60_000;
    while !corpus.is_char_boundary(end) {
        end += 1;
    }
    let p = dir.join("small.txt");
    std::fs::write(&p, &corpus[..end]).unwrap();
    p
}

/// The tiny model's flags: `n_layer` layers of width 32 with 2 heads, batches of 2 sequences of 32.
pub fn tiny_model(n_layer: &str) -> [&str; 10] {
    [
        "--n-layer",
        n_layer,
        "--n-embd",
        "32",
        "--n-head",
        "2",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
    ]
}

/// `train CMD --out OUT --data DATA --steps STEPS` on the one-layer tiny model, then `extra`.
pub fn tiny_run<'a>(
    cmd: &'a str,
    out: &'a Path,
    data: &'a Path,
    steps: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut v = vec![cmd, "--out", s(out), "--data", s(data), "--steps", steps];
    v.extend(tiny_model("1"));
    v.extend_from_slice(extra);
    v
}

pub fn train(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

/// Fails the test unless `o` exited successfully.
pub fn assert_ok(o: &Output) {
    assert!(o.status.success(), "{}", stderr(o));
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Fails with exit code 1 and a one-line error mentioning every `needles`.
pub fn assert_clean_error(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "missing {n:?} in: {err}");
    }
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The `(step, loss)` records of one `kind` ("train" or "val") in a run's metrics; a last line
/// still being written (or cut by SIGKILL) is left out.
pub fn losses(out: &Path, kind: &str) -> Vec<(u64, f64)> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default();
    let complete = text.rsplit_once('\n').map_or("", |(lines, _)| lines);
    complete
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["kind"] == kind)
        .map(|r| (r["step"].as_u64().unwrap(), r["loss"].as_f64().unwrap()))
        .collect()
}

/// `run`'s latest checkpoint as a plain model directory: config.json and model.safetensors.
pub fn plain_dir(run: &Path, dest: &Path) -> PathBuf {
    let name = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
    let ck = run.join("checkpoints").join(name.trim());
    std::fs::create_dir_all(dest).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(ck.join(f), dest.join(f)).unwrap();
    }
    dest.to_path_buf()
}

/// `train CMD --out OUT --data DATA --init-from DIR`.
pub fn init_from<'a>(cmd: &'a str, out: &'a Path, data: &'a Path, dir: &'a Path) -> Vec<&'a str> {
    vec![
        cmd,
        "--out",
        s(out),
        "--data",
        s(data),
        "--init-from",
        s(dir),
    ]
}
