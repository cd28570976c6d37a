//! End-to-end tests of the `train` binary: bad input gives a one-line error and a non-zero exit,
//! a SIGKILLed run resumes to the same losses as an uninterrupted one, and the other commands
//! (sample, eval, plot, bench, tokenizer, encode, bert) run on a tiny model.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_train");

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("train-cli-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// ~60 kB of the corpus: tokenizes in a blink.
fn small_text(dir: &Path) -> PathBuf {
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

const TINY: &[&str] = &[
    "--n-layer",
    "1",
    "--n-embd",
    "32",
    "--n-head",
    "2",
    "--seq-len",
    "32",
    "--batch-size",
    "2",
];

fn train(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Fails with exit code 1 and a one-line error mentioning every `needles`.
fn assert_clean_error(o: &Output, needles: &[&str]) {
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

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn missing_and_empty_data() {
    let d = tmpdir("baddata");
    let o = train(&[
        "gpt2",
        "--out",
        s(&d.join("o1")),
        "--data",
        "/nonexistent/x.txt",
    ]);
    assert_clean_error(&o, &["/nonexistent/x.txt", "does not exist", "--data"]);
    let empty = d.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let o = train(&["gpt2", "--out", s(&d.join("o2")), "--data", s(&empty)]);
    assert_clean_error(&o, &["empty.txt", "is empty"]);
    let bin = d.join("bad.bin");
    std::fs::write(&bin, [0xffu8, 0xfe, 0x00, 0x80]).unwrap();
    let o = train(&["gpt2", "--out", s(&d.join("o3")), "--data", s(&bin)]);
    assert_clean_error(&o, &["bad.bin", "UTF-8"]);
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn seq_len_above_positions() {
    let d = tmpdir("seqlen");
    let txt = small_text(&d);
    let o = train(&[
        "gpt2",
        "--out",
        s(&d.join("o")),
        "--data",
        s(&txt),
        "--n-positions",
        "64",
        "--seq-len",
        "128",
    ]);
    assert_clean_error(&o, &["--seq-len 128", "64 positions", "--n-positions"]);
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn unwritable_output_dir() {
    let d = tmpdir("unwritable");
    let file = d.join("a-file");
    std::fs::write(&file, "x").unwrap();
    // A directory below a regular file cannot be created (even as root).
    let o = train(&["gpt2", "--out", s(&file.join("run")), "--steps", "1"]);
    assert_clean_error(&o, &["cannot write to output directory", "--out"]);
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn tokenizer_vocab_mismatch() {
    let d = tmpdir("tokmismatch");
    let txt = small_text(&d);
    // Token ids beyond the model's vocabulary.
    let toks = d.join("t.bin");
    let o = train(&["encode", "--data", s(&txt), "--out", s(&toks)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let tj = d.join("tok.json");
    let o = train(&[
        "tokenizer",
        "--kind",
        "bpe",
        "--vocab-size",
        "500",
        "--data",
        s(&txt),
        "--out",
        s(&tj),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = train(&[
        "gpt2",
        "--out",
        s(&d.join("o")),
        "--data",
        s(&toks),
        "--tokenizer",
        s(&tj),
    ]);
    assert_clean_error(&o, &["token id", "500 entries", "--tokenizer"]);
    // A checkpoint trained with GPT-2's tokenizer, evaluated with a 500-token one.
    let run = d.join("run");
    let mut a = vec!["gpt2", "--out", s(&run), "--data", s(&txt), "--steps", "1"];
    a.extend_from_slice(TINY);
    let o = train(&a);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = train(&[
        "eval",
        "--checkpoint",
        s(&d.join("run")),
        "--data",
        s(&txt),
        "--tokenizer",
        s(&tj),
        "--seq-len",
        "32",
    ]);
    assert_clean_error(&o, &["500 tokens", "50257", "tokenizer"]);
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn checkpoint_from_different_config() {
    let d = tmpdir("diffcfg");
    let txt = small_text(&d);
    let out = d.join("run");
    let mut a = vec!["gpt2", "--out", s(&out), "--data", s(&txt), "--steps", "2"];
    a.extend_from_slice(TINY);
    let o = train(&a);
    assert!(o.status.success(), "{}", stderr(&o));
    let ckpts = out.join("checkpoints");
    let before: Vec<_> = std::fs::read_dir(&ckpts)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    // Same folder, two layers instead of one.
    let o = train(&[
        "gpt2",
        "--out",
        s(&out),
        "--data",
        s(&txt),
        "--steps",
        "4",
        "--resume",
        "--n-layer",
        "2",
        "--n-embd",
        "32",
        "--n-head",
        "2",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
    ]);
    assert_clean_error(&o, &["different model config", "n_layer: 1 vs 2"]);
    // Starting over in a folder that holds a run is refused too, and nothing was touched.
    let o = train(&a);
    assert_clean_error(&o, &["already holds a run", "--resume"]);
    let after: Vec<_> = std::fs::read_dir(&ckpts)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before, after);
    std::fs::remove_dir_all(&d).ok();
}

fn train_losses(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["kind"] == "train")
        .map(|r| (r["step"].as_u64().unwrap(), r["loss"].as_f64().unwrap()))
        .collect()
}

fn val_losses(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["kind"] == "val")
        .map(|r| (r["step"].as_u64().unwrap(), r["loss"].as_f64().unwrap()))
        .collect()
}

/// A run SIGKILLed after its step-8 checkpoint and resumed reaches the same losses, step for
/// step, as the same run uninterrupted.
#[test]
fn sigkill_then_resume_matches_uninterrupted() {
    let d = tmpdir("resume");
    let txt = small_text(&d);
    let common = |out: &Path| -> Vec<String> {
        let mut v: Vec<String> = [
            "gpt2",
            "--data",
            s(&txt),
            "--steps",
            "12",
            "--ckpt-every",
            "4",
            "--val-every",
            "6",
            "--lr",
            "1e-2",
            "--warmup-steps",
            "2",
            "--out",
            s(out),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        v.extend(TINY.iter().map(|x| x.to_string()));
        v
    };
    let a = d.join("a");
    let o = Command::new(BIN).args(common(&a)).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    let b = d.join("b");
    let mut child = Command::new(BIN)
        .args(common(&b))
        .env("TRAIN_TEST_STEP_DELAY_MS", "400")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let latest = b.join("checkpoints/latest");
    let t0 = Instant::now();
    loop {
        if std::fs::read_to_string(&latest).is_ok_and(|s| s.trim() == "step-00000008") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no step-8 checkpoint"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "run B ended before it was killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let killed_at = train_losses(&b).last().unwrap().0;
    assert!(killed_at < 12, "killed too late ({killed_at})");

    let mut args = common(&b);
    args.push("--resume".into());
    let o = Command::new(BIN).args(&args).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("resumed from"));

    let (la, lb) = (train_losses(&a), train_losses(&b));
    assert_eq!(la.len(), 12);
    assert_eq!(
        la.iter().map(|x| x.0).collect::<Vec<_>>(),
        lb.iter().map(|x| x.0).collect::<Vec<_>>()
    );
    for ((s, x), (_, y)) in la.iter().zip(&lb) {
        assert!(
            (x - y).abs() <= 1e-5 * x.abs().max(1.0),
            "step {s}: {x} vs {y}"
        );
    }
    let (va, vb) = (val_losses(&a), val_losses(&b));
    assert_eq!(va.len(), vb.len());
    let (fa, fb) = (va.last().unwrap(), vb.last().unwrap());
    assert_eq!(fa.0, 12);
    assert!((fa.1 - fb.1).abs() <= 1e-5 * fa.1, "{fa:?} vs {fb:?}");
    // And the loss did move.
    assert!(la[11].1 < la[0].1, "{la:?}");
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn sample_eval_plot_bench_bert() {
    let d = tmpdir("smoke");
    let txt = small_text(&d);
    let out = d.join("run");
    let mut a = vec![
        "gpt2",
        "--out",
        s(&out),
        "--data",
        s(&txt),
        "--steps",
        "3",
        "--attn",
        "naive",
    ];
    a.extend_from_slice(TINY);
    let o = train(&a);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(stdout.contains("unigram entropy"), "{stdout}");
    assert!(out.join("loss.png").exists());
    let ck = out.join("checkpoints/step-00000003");
    for f in [
        "model.safetensors",
        "optimizer.safetensors",
        "config.json",
        "tokenizer.json",
    ] {
        assert!(ck.join(f).exists(), "{f}");
    }

    let o = train(&[
        "sample",
        "--checkpoint",
        s(&out),
        "--prompt",
        "The whale",
        "--max-new-tokens",
        "5",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("The whale"));

    let o = train(&[
        "eval",
        "--checkpoint",
        s(&ck),
        "--data",
        s(&txt),
        "--seq-len",
        "32",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("perplexity"));

    let png = d.join("cmp.png");
    let o = train(&["plot", "--run", s(&out), "--run", s(&out), "--out", s(&png)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));

    let bj = d.join("bench.json");
    let o = train(&[
        "bench",
        "--n-layer",
        "1",
        "--n-embd",
        "32",
        "--n-head",
        "2",
        "--seq-lens",
        "16,32",
        "--tokens-per-step",
        "64",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--out",
        s(&bj),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&bj).unwrap()).unwrap();
    assert_eq!(j["rows"].as_array().unwrap().len(), 6);
    // Same weights and batch: the three attention kinds agree on the loss.
    let probes: Vec<f64> = j["rows"].as_array().unwrap()[..3]
        .iter()
        .map(|r| r["probe_loss"].as_f64().unwrap())
        .collect();
    assert!(
        probes.iter().all(|p| (p - probes[0]).abs() < 1e-3),
        "{probes:?}"
    );

    let bout = d.join("bert");
    let o = train(&[
        "bert",
        "--out",
        s(&bout),
        "--data",
        s(&txt),
        "--steps",
        "2",
        "--whole-word",
        "--n-layer",
        "1",
        "--n-embd",
        "32",
        "--n-head",
        "2",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = train(&["sample", "--checkpoint", s(&bout)]);
    assert_clean_error(&o, &["BERT checkpoint"]);
    std::fs::remove_dir_all(&d).ok();
}
