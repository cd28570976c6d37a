//! The ListOps generator (`src/listops.rs`) against an independent evaluator: every label is
//! what parsing and evaluating the token string gives, every expression is well formed and
//! within the requested length, depth and argument bounds, and the splits are fixed by the seed.

#[path = "../src/listops.rs"]
#[allow(dead_code)]
mod listops;

use flash_test_support::Rng;
use listops::{splits, Spec};

/// What a token string says, read without the generator's code: its value, its deepest
/// nesting (the root is depth 1) and its widest operator. The median is numpy's (the mean of
/// the middle two for an even count) truncated by `int`, as LRA's `to_value`.
#[derive(Debug, PartialEq)]
struct Parsed {
    value: u8,
    depth: usize,
    widest: usize,
}

fn evaluate(text: &str) -> Result<Parsed, String> {
    let mut stack: Vec<(&str, Vec<f64>)> = Vec::new();
    let (mut result, mut depth, mut widest) = (None, 0, 0);
    for tok in text.split(' ') {
        if result.is_some() {
            return Err(format!("token {tok:?} after the root closed"));
        }
        match tok {
            "[MAX" | "[MIN" | "[MED" | "[SM" => {
                stack.push((tok, Vec::new()));
                depth = depth.max(stack.len());
            }
            "]" => {
                let (op, args) = stack.pop().ok_or("] without an operator")?;
                if args.len() < 2 {
                    return Err(format!("{op} with {} argument(s)", args.len()));
                }
                widest = widest.max(args.len());
                let v = match op {
                    "[MAX" => args.iter().cloned().fold(f64::MIN, f64::max),
                    "[MIN" => args.iter().cloned().fold(f64::MAX, f64::min),
                    "[MED" => {
                        let mut s = args.clone();
                        s.sort_by(|a, b| a.partial_cmp(b).unwrap());
                        let n = s.len();
                        let m = if n % 2 == 1 {
                            s[n / 2]
                        } else {
                            (s[n / 2 - 1] + s[n / 2]) / 2.0
                        };
                        m.trunc()
                    }
                    _ => args.iter().sum::<f64>() % 10.0,
                };
                match stack.last_mut() {
                    Some((_, parent)) => parent.push(v),
                    None => result = Some(v),
                }
            }
            d => {
                let v: u8 = d.parse().map_err(|_| format!("unknown token {d:?}"))?;
                if v > 9 {
                    return Err(format!("{v} is not a digit"));
                }
                let (_, args) = stack.last_mut().ok_or("a digit outside any operator")?;
                args.push(f64::from(v));
                depth = depth.max(stack.len() + 1);
            }
        }
    }
    let value = result.ok_or("unclosed expression")?;
    Ok(Parsed {
        value: value as u8,
        depth,
        widest,
    })
}

fn tokens(text: &str) -> usize {
    text.split(' ').count()
}

#[test]
fn the_evaluator_reads_known_expressions() {
    // LRA's example, and the numpy median of an even count.
    let p = evaluate("[MAX 2 9 [MIN 4 7 ] 0 ]").unwrap();
    assert_eq!((p.value, p.depth, p.widest), (9, 3, 4));
    assert_eq!(evaluate("[MED 1 2 5 8 ]").unwrap().value, 3);
    assert_eq!(evaluate("[SM 9 8 [MED 3 1 2 ] ]").unwrap().value, 9);
    for bad in [
        "[MAX 1 ]",
        "[MAX 1 2",
        "1",
        "[MAX 1 2 ] 3",
        "[MAX 1 x ]",
        "]",
    ] {
        assert!(evaluate(bad).is_err(), "{bad}");
    }
}

#[test]
fn labels_are_what_the_expressions_evaluate_to() {
    let mut r = Rng::new(0x11);
    let mut classes = [0usize; 10];
    for case in 0..40 {
        // LRA-like shapes (8–10 arguments keep long trees common), the bounds varied.
        let max_tokens = 20 + r.below(300);
        let spec = Spec {
            min_tokens: r.below(max_tokens / 4 + 1),
            max_tokens,
            max_depth: 6 + r.below(5),
            max_args: 8 + r.below(3),
        };
        let xs = listops::draw(&spec, 50, case).unwrap();
        for e in &xs {
            let p = evaluate(&e.text).unwrap_or_else(|m| panic!("{spec:?}: {m}: {}", e.text));
            assert_eq!(p.value, e.label, "{spec:?}: {}", e.text);
            assert!(
                p.depth <= spec.max_depth.max(2),
                "{spec:?}: depth {}",
                p.depth
            );
            assert!(
                p.widest <= spec.max_args,
                "{spec:?}: {} arguments",
                p.widest
            );
            classes[e.label as usize] += 1;
        }
    }
    assert!(classes.iter().all(|&c| c > 0), "classes {classes:?}");
}

#[test]
fn lengths_stay_in_the_bounds_and_cover_them() {
    for (positions, n) in [(64, 400), (1024, 300), (2048, 150)] {
        let spec = Spec::for_positions(positions);
        assert_eq!(spec.max_tokens, positions - 2);
        assert_eq!(spec.min_tokens, (positions - 2) / 4);
        let lens: Vec<usize> = listops::draw(&spec, n, 3)
            .unwrap()
            .iter()
            .map(|e| tokens(&e.text))
            .collect();
        assert!(lens
            .iter()
            .all(|l| (spec.min_tokens..=spec.max_tokens).contains(l)));
        // Not bunched at one end: both the lowest and the highest quarter of the range occur.
        let quarter = (spec.max_tokens - spec.min_tokens) / 4;
        assert!(
            lens.iter().any(|&l| l < spec.min_tokens + quarter),
            "{lens:?}"
        );
        assert!(
            lens.iter().any(|&l| l > spec.max_tokens - quarter),
            "{lens:?}"
        );
    }
}

#[test]
fn splits_are_fixed_by_the_seed() {
    let spec = Spec::for_positions(128);
    let a = splits(&spec, [30, 10, 10], 7).unwrap();
    assert_eq!(a, splits(&spec, [30, 10, 10], 7).unwrap());
    let b = splits(&spec, [30, 10, 10], 8).unwrap();
    assert_ne!(a.train, b.train);
    assert_ne!(a.test, b.test);
    // Each split has its own stream: its examples do not depend on the other splits' sizes.
    let c = splits(&spec, [60, 10, 5], 7).unwrap();
    assert_eq!(c.train[..30], a.train[..]);
    assert_eq!(c.validation, a.validation);
    assert_eq!(c.test[..], a.test[..5]);
    // And the splits are not copies of one another.
    assert!(a.train.iter().all(|e| !a.test.contains(e)));
}

#[test]
fn impossible_bounds_are_clear_errors() {
    let bad = |spec: Spec, want: &str| {
        let e = listops::draw(&spec, 1, 0).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    };
    let base = Spec::for_positions(64);
    bad(
        Spec {
            max_tokens: 3,
            min_tokens: 0,
            ..base
        },
        "too short",
    );
    bad(
        Spec {
            min_tokens: 70,
            ..base
        },
        "exceeds",
    );
    bad(
        Spec {
            max_args: 1,
            ..base
        },
        "max-args",
    );
    // A tree of depth 2 with 3 arguments has at most 5 tokens.
    bad(
        Spec {
            min_tokens: 10,
            max_tokens: 20,
            max_depth: 2,
            max_args: 3,
        },
        "widen the bounds",
    );
}

#[test]
fn the_tokenizer_covers_the_vocabulary() {
    let tok = listops::tokenizer().unwrap();
    assert_eq!(tok.get_vocab_size(false), 19);
    assert_eq!(tok.token_to_id("[PAD]"), Some(0));
    let xs = listops::draw(&Spec::for_positions(256), 20, 1).unwrap();
    let unk = tok.token_to_id("[UNK]").unwrap();
    for e in &xs {
        let ids = tok
            .encode(e.text.as_str(), false)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(ids.len(), tokens(&e.text));
        assert!(ids.iter().all(|&i| i != unk && i >= 4), "{}", e.text);
    }
}
