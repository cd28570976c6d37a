//! End-to-end tests of the `train` binary: bad input gives a one-line error and a non-zero exit,
//! a run SIGKILLed or stopped by Ctrl-C resumes to the same losses as an uninterrupted one, and the
//! other commands (sample, eval, plot, bench, tokenizer, encode, bert) run on a tiny model.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

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
    assert_ok(&train(&["encode", "--data", s(&txt), "--out", s(&toks)]));
    let tj = d.join("tok.json");
    assert_ok(&train(&[
        "tokenizer",
        "--kind",
        "bpe",
        "--vocab-size",
        "500",
        "--data",
        s(&txt),
        "--out",
        s(&tj),
    ]));
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
    assert_ok(&train(&tiny_run("gpt2", &run, &txt, "1", &[])));
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
    // A model directory of a 500-token model without its tokenizer.json falls back to GPT-2's
    // 50257 tokens, which do not fit; with it, the run starts.
    let small = d.join("small");
    let with_tok = tiny_run("gpt2", &small, &txt, "1", &["--tokenizer", s(&tj)]);
    assert_ok(&train(&with_tok));
    let plain = plain_dir(&small, &d.join("plain"));
    let out = d.join("never");
    let init = init_from("gpt2", &out, &txt, &plain);
    assert_clean_error(
        &train(&init),
        &["50257 tokens", "embeds only 500", "--tokenizer"],
    );
    assert!(!out.exists());
    std::fs::copy(&tj, plain.join("tokenizer.json")).unwrap();
    let ok = tiny_run("gpt2", &out, &txt, "1", &["--init-from", s(&plain)]);
    assert_ok(&train(&ok));
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn checkpoint_from_different_config() {
    let d = tmpdir("diffcfg");
    let txt = small_text(&d);
    let out = d.join("run");
    let a = tiny_run("gpt2", &out, &txt, "2", &[]);
    assert_ok(&train(&a));
    let ckpts = out.join("checkpoints");
    let before: Vec<_> = std::fs::read_dir(&ckpts)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    // Same folder, two layers instead of one.
    let mut b = vec![
        "gpt2",
        "--out",
        s(&out),
        "--data",
        s(&txt),
        "--steps",
        "4",
        "--resume",
    ];
    b.extend(tiny_model("2"));
    let o = train(&b);
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

fn latest_checkpoint(out: &Path) -> Option<String> {
    let name = std::fs::read_to_string(out.join("checkpoints/latest")).ok()?;
    Some(name.trim().to_string())
}

/// Runs `child` in slices of 5 ms, stopped (SIGSTOP) in between, until `ready()` holds when
/// checked while it is stopped, and returns with it stopped. A slice is far shorter than the
/// optimizer steps left after `ready`, so the test catches the run mid-way without a hook in the
/// trainer that slows it down.
fn stop_when(child: &Child, ready: impl Fn() -> bool) {
    let pid = child.id() as libc::pid_t;
    let t0 = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(5));
        let mut status = 0;
        // SAFETY: plain syscalls on our own child; waitpid(WUNTRACED) returns once it is
        // stopped (or has ended), without reaping a stopped child.
        unsafe {
            assert_eq!(libc::kill(pid, libc::SIGSTOP), 0);
            assert_eq!(libc::waitpid(pid, &mut status, libc::WUNTRACED), pid);
        }
        assert!(
            libc::WIFSTOPPED(status),
            "the run ended before the test stopped it"
        );
        if ready() {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "not ready in 300 s"
        );
        // SAFETY: as above.
        unsafe { assert_eq!(libc::kill(pid, libc::SIGCONT), 0) };
    }
}

/// The same losses, step for step, and the same final validation loss.
fn assert_same_run(a: &Path, b: &Path) {
    let (la, lb) = (losses(a, "train"), losses(b, "train"));
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
    let (va, vb) = (losses(a, "val"), losses(b, "val"));
    let (fa, fb) = (va.last().unwrap(), vb.last().unwrap());
    assert_eq!((fa.0, fb.0), (12, 12));
    assert!((fa.1 - fb.1).abs() <= 1e-5 * fa.1, "{fa:?} vs {fb:?}");
    // And the loss did move.
    assert!(la[11].1 < la[0].1, "{la:?}");
}

/// A run SIGKILLed after its step-8 checkpoint and resumed, and a run stopped by Ctrl-C (SIGINT)
/// mid-way and resumed, reach the same losses, step for step, as the same run uninterrupted.
#[test]
fn killed_or_interrupted_runs_resume_to_the_uninterrupted_losses() {
    let d = tmpdir("resume");
    let txt = small_text(&d);
    let flags = [
        "--ckpt-every",
        "4",
        "--val-every",
        "6",
        "--val-tokens",
        "512",
        "--lr",
        "1e-2",
        "--warmup-steps",
        "2",
    ];
    let (a, b, c) = (d.join("a"), d.join("b"), d.join("c"));
    let spawn = |out: &Path| {
        Command::new(BIN)
            .args(tiny_run("gpt2", out, &txt, "12", &flags))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let resume = |out: &Path| {
        let resumed = [&flags[..], &["--resume"]].concat();
        let o = train(&tiny_run("gpt2", out, &txt, "12", &resumed));
        assert_ok(&o);
        assert!(stdout(&o).contains("resumed from"), "{}", stdout(&o));
    };
    assert_ok(&train(&tiny_run("gpt2", &a, &txt, "12", &flags)));

    // SIGKILL right after the step-8 checkpoint.
    let mut child = spawn(&b);
    stop_when(&child, || {
        latest_checkpoint(&b).as_deref() == Some("step-00000008")
    });
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let killed_at = losses(&b, "train").last().unwrap().0;
    assert!((8..12).contains(&killed_at), "killed at step {killed_at}");
    resume(&b);
    assert_eq!(losses(&a, "val").len(), losses(&b, "val").len());
    assert_same_run(&a, &b);

    // Ctrl-C after step 5: the run ends its step, checkpoints it and exits with 130.
    let child = spawn(&c);
    stop_when(&child, || losses(&c, "train").len() >= 5);
    // SAFETY: signals to our own (stopped) child.
    unsafe {
        assert_eq!(libc::kill(child.id() as libc::pid_t, libc::SIGINT), 0);
        assert_eq!(libc::kill(child.id() as libc::pid_t, libc::SIGCONT), 0);
    }
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(130), "{err}");
    let stopped_at = losses(&c, "train").last().unwrap().0;
    assert!(
        (5..12).contains(&stopped_at),
        "stopped at step {stopped_at}"
    );
    assert!(
        err.contains(&format!("interrupted at step {stopped_at}")) && err.contains("--resume"),
        "{err}"
    );
    assert_eq!(
        latest_checkpoint(&c),
        Some(format!("step-{stopped_at:08}")),
        "the checkpoint is of the last step"
    );
    resume(&c);
    assert_same_run(&a, &c);
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn sample_eval_plot_bench_bert() {
    let d = tmpdir("smoke");
    let txt = small_text(&d);
    let out = d.join("run");
    let o = train(&tiny_run("gpt2", &out, &txt, "3", &["--attn", "naive"]));
    assert_ok(&o);
    assert!(stdout(&o).contains("unigram entropy"), "{}", stdout(&o));
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
    assert_ok(&o);
    assert!(stdout(&o).starts_with("The whale"));

    let o = train(&[
        "eval",
        "--checkpoint",
        s(&ck),
        "--data",
        s(&txt),
        "--seq-len",
        "32",
    ]);
    assert_ok(&o);
    assert!(stdout(&o).contains("perplexity"));

    let png = d.join("cmp.png");
    assert_ok(&train(&[
        "plot",
        "--run",
        s(&out),
        "--run",
        s(&out),
        "--out",
        s(&png),
    ]));
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));

    let bj = d.join("bench.json");
    let mut bench = vec!["bench"];
    bench.extend_from_slice(&tiny_model("1")[..6]);
    bench.extend([
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
    assert_ok(&train(&bench));
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
    assert_ok(&train(&tiny_run(
        "bert",
        &bout,
        &txt,
        "2",
        &["--whole-word"],
    )));
    let o = train(&["sample", "--checkpoint", s(&bout)]);
    assert_clean_error(&o, &["BERT checkpoint"]);
    std::fs::remove_dir_all(&d).ok();
}
