//! `flash-ops-check` reads q, k, v, do from safetensors and writes o, lse, dq, dk, dv that agree
//! with the f64 reference; bad arguments exit non-zero with a message naming them.

use std::collections::HashMap;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use flash_ops::{flash_attn_with_lse, AttnOptions, BlockMask};
use flash_test_support::*;

const BIN: &str = env!("CARGO_BIN_EXE_flash-ops-check");

fn write_inputs(dir: &std::path::Path, with_alibi: bool) -> (Tensor, Tensor, Tensor, Tensor) {
    let mut rng = Rng::new(42);
    let q = rng.tensor(&[2, 37, 4, 32]);
    let k = rng.tensor(&[2, 53, 2, 32]);
    let v = rng.tensor(&[2, 53, 2, 32]);
    let d_out = rng.tensor(&[2, 37, 4, 32]);
    let mut map: HashMap<String, Tensor> = [("q", &q), ("k", &k), ("v", &v), ("do", &d_out)]
        .into_iter()
        .map(|(n, t)| (n.to_string(), t.to_dtype(DType::F32).unwrap()))
        .collect();
    if with_alibi {
        let s = Tensor::new(&[0.5f32, 0.25, 0.125, 0.0625], &Device::Cpu).unwrap();
        map.insert("alibi_slopes".into(), s);
    }
    candle_core::safetensors::save(&map, dir.join("in.safetensors")).unwrap();
    (q, k, v, d_out)
}

#[test]
fn check_binary_matches_reference() {
    let dir = std::env::temp_dir().join(format!("flash-ops-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (q, k, v, d_out) = write_inputs(&dir, true);
    let inp = dir.join("in.safetensors");
    let out = dir.join("out.safetensors");
    for alg in ["v1", "v2"] {
        let status = Command::new(BIN)
            .args([
                "--input",
                inp.to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
            ])
            .args([
                "--causal",
                "--scale",
                "0.3",
                "--window-left",
                "20",
                "--window-right",
                "-1",
            ])
            .args(["--softcap", "8", "--algorithm", alg, "--dtype", "f32"])
            .status()
            .unwrap();
        assert!(status.success());
        let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
        let slopes = Tensor::new(&[0.5f32, 0.25, 0.125, 0.0625], &Device::Cpu).unwrap();
        let opts = AttnOptions::new()
            .causal(true)
            .softmax_scale(0.3)
            .window(Some(20), None)
            .softcap(8.0)
            .alibi_slopes(slopes);
        let want = oracle(&q, &k, &v, &d_out, &opts);
        let pairs = [
            ("o", &want.out),
            ("dq", &want.dq),
            ("dk", &want.dk),
            ("dv", &want.dv),
        ];
        for (name, w) in pairs {
            let e = rel_err(&got[name], w);
            assert!(e < 1e-5, "{alg} {name}: relative error {e}");
        }
        assert!(lse_err(&got["lse"], &want.lse) < 1e-5);
        assert_eq!(got["lse"].dims(), &[2, 4, 37]);
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn check_binary_rejects_bad_arguments() {
    let dir = std::env::temp_dir().join(format!("flash-ops-check-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_inputs(&dir, false);
    let inp = dir.join("in.safetensors");
    let inp = inp.to_str().unwrap();
    let run = |args: &[&str]| {
        let o = Command::new(BIN).args(args).output().unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let (ok, err) = run(&[
        "--input",
        inp,
        "--output",
        "/tmp/x.safetensors",
        "--window-left",
        "-3",
    ]);
    assert!(
        !ok && err.contains("--window-left") && err.contains("-1"),
        "{err}"
    );
    let (ok, err) = run(&[
        "--input",
        inp,
        "--output",
        "/tmp/x.safetensors",
        "--algorithm",
        "v3",
    ]);
    assert!(!ok && err.contains("--algorithm"), "{err}");
    let (ok, err) = run(&["--output", "/tmp/x.safetensors"]);
    assert!(!ok && err.contains("--input"), "{err}");
    let (ok, err) = run(&[
        "--input",
        "/nonexistent.safetensors",
        "--output",
        "/tmp/x.safetensors",
    ]);
    assert!(!ok && err.contains("nonexistent"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Runs the binary from `inp` to `out` with `extra` flags.
fn check(inp: &std::path::Path, out: &std::path::Path, extra: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(["--input", inp.to_str().unwrap()])
        .args(["--output", out.to_str().unwrap()])
        .args(extra)
        .output()
        .unwrap()
}

/// With `prefix_k`/`prefix_v` (1, sp, hk, d): shared-prefix attention, equal to dense attention
/// over `[prefix; k]` per sequence, the prefix gradients summed over the batch.
#[test]
fn check_binary_shared_prefix() {
    let dir = std::env::temp_dir().join(format!("flash-ops-check-prefix-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = Rng::new(43);
    let (b, sq, sp, ss) = (3, 5, 41, 7);
    let q = rng.tensor(&[b, sq, 4, 32]);
    let pk = rng.tensor(&[1, sp, 2, 32]);
    let pv = rng.tensor(&[1, sp, 2, 32]);
    let k = rng.tensor(&[b, ss, 2, 32]);
    let v = rng.tensor(&[b, ss, 2, 32]);
    let d_out = rng.tensor(&[b, sq, 4, 32]);
    let tensors = [
        ("q", &q),
        ("k", &k),
        ("v", &v),
        ("do", &d_out),
        ("prefix_k", &pk),
        ("prefix_v", &pv),
    ];
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_dtype(DType::F32).unwrap()))
        .collect();
    let (inp, out) = (dir.join("in.safetensors"), dir.join("out.safetensors"));
    candle_core::safetensors::save(&map, &inp).unwrap();
    let o = check(&inp, &out, &["--causal", "--softcap", "6"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();

    let cat = |p: &Tensor, s: &Tensor| {
        Tensor::cat(&[&p.broadcast_as((b, sp, 2, 32)).unwrap(), s], 1).unwrap()
    };
    let (kc, vc) = (cat(&pk, &k), cat(&pv, &v));
    let want = oracle(
        &q,
        &kc,
        &vc,
        &d_out,
        &AttnOptions::new().causal(true).softcap(6.0),
    );
    let prefix_grad = |g: &Tensor| g.narrow(1, 0, sp).unwrap().sum_keepdim(0).unwrap();
    let suffix_grad = |g: &Tensor| g.narrow(1, sp, ss).unwrap();
    let pairs = [
        ("o", want.out.clone()),
        ("dq", want.dq.clone()),
        ("dk", suffix_grad(&want.dk)),
        ("dv", suffix_grad(&want.dv)),
        ("dprefix_k", prefix_grad(&want.dk)),
        ("dprefix_v", prefix_grad(&want.dv)),
    ];
    for (name, w) in pairs {
        assert_eq!(got[name].dims(), w.dims(), "{name}");
        let e = rel_err(&got[name], &w);
        assert!(e < 1e-5, "{name}: relative error {e}");
    }
    assert!(lse_err(&got["lse"], &want.lse) < 1e-5);

    // Half a prefix is an error naming both tensors.
    let mut half = map.clone();
    half.remove("prefix_v");
    candle_core::safetensors::save(&half, &inp).unwrap();
    let o = check(&inp, &out, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("`prefix_k` and `prefix_v`"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A `block_mask` layout with `--block-size` gives what the library gives with
/// `BlockMask::from_block_layout` of it (and the f64 reference with the same mask), both
/// schedules, per-head layouts with an empty query block; half of the pair is an error.
#[test]
fn check_binary_block_mask() {
    let dir = std::env::temp_dir().join(format!("flash-ops-check-mask-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (q, k, v, d_out) = write_inputs(&dir, false);
    let (inp, out) = (dir.join("in.safetensors"), dir.join("out.safetensors"));
    let mut map = candle_core::safetensors::load(&inp, &Device::Cpu).unwrap();
    // q 37 rows, k 53 keys, 4 query heads; blocks 16 x 32: (3, 2) blocks per head.
    let (block, (qb, kb)) = ((16, 32), (3, 2));
    let mut rng = Rng::new(44);
    let mut bits: Vec<u8> = (0..4 * qb * kb).map(|_| (rng.below(2)) as u8).collect();
    bits[0..kb].fill(0); // head 0, query block 0 sees nothing
    bits[kb..2 * kb].fill(1);
    let layout = Tensor::from_vec(bits, (4, qb, kb), &Device::Cpu).unwrap();
    map.insert("block_mask".into(), layout.clone());
    candle_core::safetensors::save(&map, &inp).unwrap();
    let mask = BlockMask::from_block_layout(&layout, 37, 53, block).unwrap();
    for alg in ["v1", "v2"] {
        let o = check(
            &inp,
            &out,
            &["--causal", "--block-size", "16,32", "--algorithm", alg],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
        let algorithm = if alg == "v1" {
            flash_ops::Algorithm::V1
        } else {
            flash_ops::Algorithm::V2
        };
        let opts = AttnOptions::new()
            .causal(true)
            .algorithm(algorithm)
            .block_mask(mask.clone());
        let lib = run_with_grads(&q, &k, &v, &d_out, DType::F32, |q, k, v| {
            flash_attn_with_lse(q, k, v, &opts)
        })
        .unwrap();
        let want = oracle(&q, &k, &v, &d_out, &opts);
        let pairs = [
            ("o", &lib.out, &want.out),
            ("dq", &lib.dq, &want.dq),
            ("dk", &lib.dk, &want.dk),
            ("dv", &lib.dv, &want.dv),
        ];
        for (name, l, w) in pairs {
            let e = rel_err(&got[name], l);
            assert!(
                e < 1e-6,
                "{alg} {name}: relative error {e} to the library call"
            );
            let e = rel_err(&got[name], w);
            assert!(
                e < 1e-5,
                "{alg} {name}: relative error {e} to the reference"
            );
        }
        assert!(lse_err(&got["lse"], &lib.lse) < 1e-6);
        assert!(lse_err(&got["lse"], &want.lse) < 1e-5);
        // The empty query block: zero output rows.
        let rows = got["o"].narrow(1, 0, 16).unwrap().narrow(2, 0, 1).unwrap();
        let max = rows.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        assert_eq!(max.to_scalar::<f32>().unwrap(), 0.0);
    }
    let err = |o: std::process::Output| {
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let e = err(check(&inp, &out, &[]));
    assert!(e.contains("--block-size"), "{e}");
    let e = err(check(&inp, &out, &["--block-size", "16"]));
    assert!(e.contains("BQ,BK"), "{e}");
    let e = err(check(&inp, &out, &["--block-size", "16,16"]));
    assert!(e.contains("block_mask"), "{e}"); // layout shape (3, 2) is not (3, 4)
    map.remove("block_mask");
    candle_core::safetensors::save(&map, &inp).unwrap();
    let e = err(check(&inp, &out, &["--block-size", "16,32"]));
    assert!(e.contains("block_mask"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}
