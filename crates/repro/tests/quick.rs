//! `repro run --quick` end to end into a temporary folder: every file is written and parses, and
//! `repro render` re-renders the folder from its JSON alone.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repro() -> Command {
    Command::new(env!("CARGO_BIN_EXE_repro"))
}

/// The `train` binary built beside ours (`cargo test --workspace` builds it); without it the
/// end-to-end table is left out of this test rather than building another crate here.
fn train_bin() -> Option<PathBuf> {
    let me = PathBuf::from(env!("CARGO_BIN_EXE_repro"));
    let t = me
        .parent()?
        .join(format!("train{}", std::env::consts::EXE_SUFFIX));
    t.exists().then_some(t)
}

/// Whether some row of `rows` has `key == value` and passes `has`.
fn any_row(rows: &[Value], (key, value): (&str, &str), has: impl Fn(&Value) -> bool) -> bool {
    rows.iter().any(|r| r[key] == value && has(r))
}

fn is_png(p: &Path) -> bool {
    std::fs::read(p).is_ok_and(|b| b.starts_with(b"\x89PNG\r\n\x1a\n") && b.len() > 1000)
}

#[test]
fn quick_mode_writes_json_markdown_and_plots() {
    let dir = std::env::temp_dir().join(format!("repro-quick-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cmd = repro();
    cmd.args(["run", "--quick", "--out"]).arg(&dir);
    let train = train_bin();
    match &train {
        Some(t) => {
            cmd.arg("--train-bin").arg(t);
        }
        None => {
            eprintln!("no train binary next to repro: skipping the end-to-end table");
            cmd.args(["--only", "attention,fa2,prefix,blocksparse"]);
        }
    }
    let out = cmd.output().expect("run repro");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "repro run --quick failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap()).unwrap();
    assert_eq!(json["meta"]["mode"], "quick");
    let rows = json["attention"]["rows"].as_array().unwrap();
    assert!(any_row(rows, ("variant", "v2"), |r| r["fwd_bwd_ms"].is_f64()));
    // The quick budget is set so that standard attention "runs out" inside the quick range.
    let naive = ("variant", "naive");
    assert!(any_row(rows, naive, |r| r["skipped"].is_string()));
    assert!(any_row(rows, naive, |r| r["fwd_bwd_mem_bytes"].is_u64()));
    assert!(!json["fa2"]["rows"].as_array().unwrap().is_empty());

    // Shared-prefix decoding: both sides measured somewhere, the baseline over budget elsewhere.
    let any = |part: &str, pred: &dyn Fn(&Value) -> bool| {
        json["prefix"][part].as_array().unwrap().iter().any(pred)
    };
    assert!(any("micro", &|r| r["ours_ms"].is_f64()
        && r["baseline_ms"].is_f64()));
    assert!(any("micro", &|r| r["skipped"].is_string()));
    for cache in ["shared", "duplicated"] {
        assert!(any("e2e", &|r| r["cache"] == cache
            && r["tokens_per_s"].is_f64()));
    }

    // Block-sparse: every case measured, the masked rows at the sweep's densities.
    let bs = json["blocksparse"]["rows"].as_array().unwrap();
    for case in [
        "dense-v2",
        "autograd",
        "naive",
        "random",
        "pattern",
        "all-full",
        "all-partial",
    ] {
        assert!(
            any_row(bs, ("case", case), |r| r["fwd_bwd_ms"].is_f64()),
            "blocksparse lacks {case}"
        );
    }
    let sparse = |r: &Value| r["density"].as_f64() < Some(0.2);
    assert!(any_row(bs, ("case", "random"), sparse));

    let md = std::fs::read_to_string(dir.join("tables.md")).unwrap();
    for needle in [
        "## Table 1",
        "## Memory footprint",
        "## Table 2",
        "## Shared-prefix decoding",
        "## Block-sparse attention",
        "Quick mode",
        "paper",
    ] {
        assert!(md.contains(needle), "tables.md lacks {needle:?}");
    }
    // What the command prints is what it wrote.
    assert!(stdout.contains(md.trim()), "stdout differs from tables.md");
    let mut pngs = vec![
        "speedup.png",
        "memory.png",
        "fa2_fwd_bwd.png",
        "fa2_fwd.png",
        "fa2_bwd.png",
        "prefix.png",
        "blocksparse.png",
    ];
    if train.is_some() {
        assert!(md.contains("## Table 3"));
        let runs = json["e2e"]["runs"].as_array().unwrap();
        assert!(
            runs.iter().all(|r| r["report"]["rows"].is_array()),
            "{runs:?}"
        );
        pngs.push("e2e.png");
        quality_sections(&json, &md, &dir);
        pngs.extend(["context.png", "listops.png"]);
    }
    for p in &pngs {
        assert!(is_png(&dir.join(p)), "{p} missing or not a PNG");
    }

    // Re-render from the JSON alone.
    for p in &pngs {
        std::fs::remove_file(dir.join(p)).unwrap();
    }
    std::fs::remove_file(dir.join("tables.md")).unwrap();
    let st = repro().arg("render").arg(&dir).status().unwrap();
    assert!(st.success());
    assert_eq!(std::fs::read_to_string(dir.join("tables.md")).unwrap(), md);
    for p in &pngs {
        assert!(is_png(&dir.join(p)), "{p} not re-rendered");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Issue 14's sections: every context trained and scored on the same held-out tokens, naive
/// timed inside the budget and skipped past it, every ListOps run trained, throughput and
/// test accuracy recorded; the run folders keep their logs and metrics, not their weights.
fn quality_sections(json: &Value, md: &str, dir: &Path) {
    for needle in [
        "## Perplexity vs context length",
        "## Long Range Arena ListOps",
    ] {
        assert!(md.contains(needle), "tables.md lacks {needle:?}");
    }
    let ctx = &json["context"];
    let runs = ctx["runs"].as_array().unwrap();
    let contexts: std::collections::BTreeSet<u64> = runs
        .iter()
        .map(|r| r["context"].as_u64().unwrap())
        .collect();
    assert!(contexts.len() >= 2, "{contexts:?}");
    // The section's own BPE, trained once and used by every run: a unigram entropy above
    // ln(vocab) would mean a run tokenized with something else.
    let vocab = ctx["tokenizer_vocab"]
        .as_u64()
        .expect("a trained tokenizer") as f64;
    assert!(dir.join("context").join("tokenizer.json").exists());
    for r in runs {
        assert!(r["error"].is_null(), "{r}");
        let unigram = r["unigram_loss"].as_f64().unwrap();
        assert!(unigram > 0.0 && unigram <= vocab.ln() + 1e-9, "{r}");
        let (loss, untrained) = (
            r["val_loss"].as_f64().unwrap(),
            r["untrained_loss"].as_f64().unwrap(),
        );
        assert!(loss.is_finite() && loss < untrained, "{r}");
        assert_eq!(
            r["tokens"], ctx["tokens"],
            "every context trains on the same tokens"
        );
        assert!(r["peak_rss_bytes"].as_u64().unwrap() > 1 << 20, "{r}");
        let run = dir
            .join("context")
            .join(format!("ctx{}-seed{}", r["context"], r["seed"]));
        assert!(run.join("metrics.jsonl").exists() && !run.join("checkpoints").exists());
    }
    // Two seeds at the shortest and the longest context.
    for c in [contexts.first(), contexts.last()] {
        let n = runs
            .iter()
            .filter(|r| r["context"].as_u64() == c.copied())
            .count();
        assert_eq!(n, 2, "context {c:?}");
    }
    let bench = ctx["bench"].as_array().unwrap();
    assert!(any_row(bench, ("attn", "naive"), |b| b["us_per_token"].is_f64()));
    assert!(any_row(bench, ("attn", "naive"), |b| b["skipped"].is_string()));
    assert!(bench
        .iter()
        .filter(|b| b["attn"] == "flash2")
        .all(|b| b["us_per_token"].is_f64()));

    let lo = json["listops"]["runs"].as_array().unwrap();
    for kind in ["naive", "flash2"] {
        assert!(
            lo.iter().any(|r| r["kind"] == kind),
            "no {kind} ListOps run"
        );
    }
    for r in lo {
        assert!(r["error"].is_null(), "{r}");
        assert!(r["steps"].as_u64().unwrap() >= 1, "{r}");
        assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0, "{r}");
        let acc = r["test_accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{r}");
        assert!(!r["val_curve"].as_array().unwrap().is_empty(), "{r}");
    }
}

#[test]
fn render_of_a_missing_folder_fails_cleanly() {
    let out = repro()
        .args(["render", "/nonexistent/repro-folder"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("results.json"));
}
