//! Every CPU kernel path this machine can run, forced through `FLASH_OPS_CPU_ISA`, against the
//! f64 reference over the shared option table (output, log-sum-exp, dq, dk, dv). The choice is
//! made once per process, so the parent test reruns this binary's `sweep_on_the_chosen_path`
//! once per path with the variable set.

use std::process::Command;

use candle_core::DType;
use flash_ops::simd::{Isa, ISA_VAR};
use flash_ops::{flash_attn_with_lse, Algorithm, AttnOptions};
use flash_test_support::*;

const F32_TOL: f64 = 1e-5;
const HALF_TOL: f64 = 2e-2;

/// Runs this test binary's test `name` alone with `FLASH_OPS_CPU_ISA=value`; its output.
fn rerun(name: &str, value: &str) -> (bool, String) {
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(ISA_VAR, value)
        .output()
        .expect("the test binary reruns");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success() && text.contains("1 passed"), text)
}

/// `(b, sq, sk, hk, group, d)`: ragged tiles, GQA, more queries than keys and the reverse.
const SHAPES: [(usize, usize, usize, usize, usize, usize); 3] = [
    (2, 150, 200, 2, 2, 40),
    (3, 131, 70, 1, 3, 64),
    (1, 37, 260, 2, 1, 80),
];

fn check(rng: &mut Rng, shape: (usize, usize, usize, usize, usize, usize), dtype: DType) -> f64 {
    let (b, sq, sk, hk, group, d) = shape;
    let hq = hk * group;
    let [q, k, v, d_out] = rng.attn_inputs((b, sq, sk, hq, hk, d));
    let tol = if dtype == DType::F32 {
        F32_TOL
    } else {
        HALF_TOL
    };
    let mut worst = 0f64;
    let plain = ("plain", AttnOptions::new());
    for (name, opts) in option_cases(b, sk, hq).into_iter().chain([plain]) {
        let want = oracle(&q, &k, &v, &d_out, &opts);
        for alg in [Algorithm::V1, Algorithm::V2] {
            // The table's V1 cases name their schedule; the others run both.
            let opts = if name.starts_with("v1") {
                opts.clone()
            } else {
                opts.clone().algorithm(alg)
            };
            let got = run_with_grads(&q, &k, &v, &d_out, dtype, |q, k, v| {
                flash_attn_with_lse(q, k, v, &opts)
            })
            .unwrap();
            let e = got.errors(&want);
            let errs = [e[0], e[1], e[2], e[3], lse_err(&got.lse, &want.lse)];
            for (what, x) in ["out", "dq", "dk", "dv", "lse"].iter().zip(errs) {
                assert!(
                    x <= tol && x.is_finite(),
                    "{name} {alg:?} {dtype:?} {shape:?}: {what} relative error {x:e} > {tol:e}"
                );
                worst = worst.max(x);
            }
        }
    }
    worst
}

/// The sweep on whatever path this process chose (the detected one, or the one forced).
#[test]
fn sweep_on_the_chosen_path() {
    let isa = Isa::active().expect("a path this CPU runs");
    if let Ok(v) = std::env::var(ISA_VAR) {
        assert_eq!(isa.name(), v, "the forced path is the one taken");
    }
    let mut rng = Rng::new(0x15A);
    let mut worst = SHAPES.map(|s| check(&mut rng, s, DType::F32));
    let half = [DType::F16, DType::BF16].map(|t| check(&mut rng, SHAPES[0], t));
    worst.sort_by(f64::total_cmp);
    println!(
        "path {}: f32 worst relative error {:.2e}; f16 {:.2e}, bf16 {:.2e}",
        isa.name(),
        worst[2],
        half[0],
        half[1]
    );
}

#[test]
fn every_runnable_path_matches_the_reference() {
    let mut ran = Vec::new();
    for isa in Isa::ALL {
        if !isa.supported() {
            println!("{}: this CPU cannot run it, not tested here", isa.name());
            continue;
        }
        let (ok, text) = rerun("sweep_on_the_chosen_path", isa.name());
        assert!(ok, "path {}:\n{text}", isa.name());
        let tag = format!("path {}:", isa.name());
        let Some(line) = text.lines().find_map(|l| l.find(&tag).map(|i| &l[i..])) else {
            panic!("the rerun did not take path {}:\n{text}", isa.name())
        };
        println!("{line}");
        ran.push(isa);
    }
    assert!(ran.contains(&Isa::detected()) && ran.contains(&Isa::Portable));
}

/// On the chosen path the op runs; with a bad `FLASH_OPS_CPU_ISA` forward says why.
#[test]
fn the_choice_is_checked() {
    let mut rng = Rng::new(3);
    let [q, k, v, _] = rng
        .attn_inputs((1, 9, 9, 2, 2, 16))
        .map(|t| t.to_dtype(DType::F32).unwrap());
    let r = flash_attn_with_lse(&q, &k, &v, &AttnOptions::new());
    let valid = match std::env::var(ISA_VAR) {
        Err(_) => true,
        Ok(v) => Isa::ALL.iter().any(|i| i.name() == v && i.supported()),
    };
    match r {
        Ok(_) => assert!(valid, "a bad {ISA_VAR} was accepted"),
        Err(e) => assert!(!valid && e.to_string().contains(ISA_VAR), "{e}"),
    }
}

#[test]
fn unknown_or_unrunnable_paths_are_refused() {
    let mut bad = vec!["sse9".to_string()];
    bad.extend(
        Isa::ALL
            .iter()
            .filter(|i| !i.supported())
            .map(|i| i.name().to_string()),
    );
    for value in bad {
        let (ok, text) = rerun("the_choice_is_checked", &value);
        assert!(ok, "{ISA_VAR}={value}:\n{text}");
    }
}
