//! Shared-prefix attention against dense f64 attention over the concatenated K/V
//! `[levels…; suffix]`: random shapes, 1–3 levels with random groups, ragged and empty suffixes,
//! GQA, causal, softcap, scale; output, log-sum-exp and every gradient of a loss that uses both.

use candle_core::{DType, Device, Result, Tensor, Var};
use flash_ops::reference::naive_attention_with_lse;
use flash_ops::{shared_prefix_attention_with_lse, Algorithm, AttnOptions, PrefixLevel};
use flash_test_support::*;

const F32_TOL: f64 = 1e-5;
const HALF_TOL: f64 = 2e-2;

/// One problem, f64 on the CPU: q, the levels' (k, v, groups), the suffix and the upstream
/// gradients of out and lse.
struct Case {
    q: Tensor,
    levels: Vec<(Tensor, Tensor, Vec<usize>)>,
    suffix_k: Tensor,
    suffix_v: Tensor,
    d_out: Tensor,
    d_lse: Tensor,
    opts: AttnOptions,
}

fn random_case(rng: &mut Rng) -> Case {
    let b = 1 + rng.below(4);
    let sq = if rng.below(2) == 0 {
        1
    } else {
        1 + rng.below(6)
    };
    let (hk, group) = (1 + rng.below(2), 1 + rng.below(3));
    let hq = hk * group;
    let d = [8, 16, 32, 64][rng.below(4)];
    let mut opts = AttnOptions::new();
    opts.causal = rng.below(2) == 0;
    if rng.below(3) == 0 {
        opts.softcap = Some(2.0 + 10.0 * rng.uniform() as f32);
    }
    if rng.below(3) == 0 {
        opts.softmax_scale = Some(0.05 + 0.3 * rng.uniform() as f32);
    }
    if rng.below(2) == 0 {
        opts.algorithm = Algorithm::V1;
    }
    let n_levels = 1 + rng.below(3);
    let levels = (0..n_levels)
        .map(|l| {
            let n_groups = if l == 0 { 1 } else { 1 + rng.below(b) };
            // Level 0 has a key, so every row sees one; deeper levels may be empty.
            let len = if l == 0 { 1 } else { 0 } + rng.below(40);
            let groups = (0..b).map(|_| rng.below(n_groups)).collect();
            (
                rng.tensor(&[n_groups, len, hk, d]),
                rng.tensor(&[n_groups, len, hk, d]),
                groups,
            )
        })
        .collect();
    // Empty suffixes (ss = 0) and ragged ones; causal needs at least sq - 1 keys per sequence.
    let min_len = if opts.causal { sq - 1 } else { 0 };
    let ss = if rng.below(4) == 0 && min_len == 0 {
        0
    } else {
        min_len + rng.below(12)
    };
    if ss > 0 && rng.below(2) == 0 {
        opts.key_lengths = Some(
            (0..b)
                .map(|_| min_len + rng.below(ss - min_len + 1))
                .collect(),
        );
    }
    Case {
        q: rng.tensor(&[b, sq, hq, d]),
        levels,
        suffix_k: rng.tensor(&[b, ss, hk, d]),
        suffix_v: rng.tensor(&[b, ss, hk, d]),
        d_out: rng.tensor(&[b, sq, hq, d]),
        d_lse: rng.tensor(&[b, hq, sq]),
        opts,
    }
}

/// Output, log-sum-exp and the gradients of q, every level's k and v, and the suffix's k and v.
struct Results {
    out: Tensor,
    lse: Tensor,
    grads: Vec<(String, Tensor)>,
}

fn var(t: &Tensor, dtype: DType) -> Var {
    Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
}

/// `L = Σ out·d_out + Σ lse·d_lse` and its gradients.
fn loss_grads(c: &Case, out: &Tensor, lse: &Tensor, vars: &[(String, Var)]) -> Result<Results> {
    let loss = ((out.to_dtype(DType::F64)? * &c.d_out)?.sum_all()?
        + (lse.to_dtype(DType::F64)? * &c.d_lse)?.sum_all()?)?;
    let g = loss.backward()?;
    let grads = vars
        .iter()
        .map(|(n, v)| {
            let t = g.get(v).cloned().unwrap_or(v.zeros_like().unwrap());
            (n.clone(), t.to_dtype(DType::F64).unwrap())
        })
        .collect();
    Ok(Results {
        out: out.to_dtype(DType::F64)?,
        lse: lse.to_dtype(DType::F64)?,
        grads,
    })
}

fn names(c: &Case) -> Vec<String> {
    let mut n = vec!["q".to_string()];
    for l in 0..c.levels.len() {
        n.push(format!("level{l}.k"));
        n.push(format!("level{l}.v"));
    }
    n.push("suffix_k".into());
    n.push("suffix_v".into());
    n
}

fn vars(c: &Case, dtype: DType) -> Vec<(String, Var)> {
    let mut t = vec![&c.q];
    for (k, v, _) in &c.levels {
        t.push(k);
        t.push(v);
    }
    t.push(&c.suffix_k);
    t.push(&c.suffix_v);
    names(c)
        .into_iter()
        .zip(t)
        .map(|(n, t)| (n, var(t, dtype)))
        .collect()
}

fn ours(c: &Case, dtype: DType) -> Result<Results> {
    let vs = vars(c, dtype);
    let n = c.levels.len();
    let levels: Vec<PrefixLevel> = (0..n)
        .map(|l| PrefixLevel::new(&vs[1 + 2 * l].1, &vs[2 + 2 * l].1, c.levels[l].2.clone()))
        .collect();
    let (out, lse) = shared_prefix_attention_with_lse(
        &vs[0].1,
        &levels,
        &vs[1 + 2 * n].1,
        &vs[2 + 2 * n].1,
        &c.opts,
    )?;
    loss_grads(c, &out, &lse, &vs)
}

/// Dense f64 attention over each sequence's `[level 0 group; …; suffix]`, the suffix's padding
/// masked by `key_lengths` offset by the prefix length.
fn dense(c: &Case) -> Result<Results> {
    let vs = vars(c, DType::F64);
    let n = c.levels.len();
    let (mut ks, mut vals, mut prefix) = (Vec::new(), Vec::new(), 0);
    for l in 0..n {
        let groups: Vec<u32> = c.levels[l].2.iter().map(|&g| g as u32).collect();
        let idx = Tensor::new(groups, &Device::Cpu)?;
        ks.push(vs[1 + 2 * l].1.index_select(&idx, 0)?);
        vals.push(vs[2 + 2 * l].1.index_select(&idx, 0)?);
        prefix += c.levels[l].0.dim(1)?;
    }
    ks.push(vs[1 + 2 * n].1.as_tensor().clone());
    vals.push(vs[2 + 2 * n].1.as_tensor().clone());
    let (k, v) = (Tensor::cat(&ks, 1)?, Tensor::cat(&vals, 1)?);
    let mut opts = c.opts.clone();
    let b = c.q.dim(0)?;
    let ss = c.suffix_k.dim(1)?;
    let lens = opts.key_lengths.clone().unwrap_or(vec![ss; b]);
    opts.key_lengths = Some(lens.iter().map(|l| prefix + l).collect());
    let (out, lse) = naive_attention_with_lse(&vs[0].1, &k, &v, &opts)?;
    loss_grads(c, &out, &lse, &vs)
}

fn check(seed: u64, dtype: DType, tol: f64) -> Result<()> {
    let mut rng = Rng::new(seed);
    for case in 0..12 {
        let c = random_case(&mut rng);
        let (got, want) = (ours(&c, dtype)?, dense(&c)?);
        let what = format!(
            "seed {seed} case {case} {dtype:?}: q {:?}, levels {:?}, suffix {:?}, {:?}",
            c.q.dims(),
            c.levels
                .iter()
                .map(|(k, _, g)| (k.dims().to_vec(), g.clone()))
                .collect::<Vec<_>>(),
            c.suffix_k.dims(),
            c.opts
        );
        let e = rel_err(&got.out, &want.out);
        assert!(e < tol, "out {e:.2e}: {what}");
        let e = lse_err(&got.lse, &want.lse);
        assert!(e < tol, "lse {e:.2e}: {what}");
        for ((name, g), (_, w)) in got.grads.iter().zip(&want.grads) {
            let e = rel_err(g, w);
            assert!(e < tol, "d{name} {e:.2e}: {what}");
        }
    }
    Ok(())
}

#[test]
fn matches_dense_attention_f32() -> Result<()> {
    check(11, DType::F32, F32_TOL)
}

#[test]
fn matches_dense_attention_half() -> Result<()> {
    check(12, DType::F16, HALF_TOL)?;
    check(13, DType::BF16, HALF_TOL)
}

/// What does not make sense across the split is refused, naming the argument.
#[test]
fn refused_options_and_bad_levels() {
    let z = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap();
    let (q, pk, sk) = (z(&[2, 3, 2, 8]), z(&[1, 5, 1, 8]), z(&[2, 4, 1, 8]));
    let shared = [PrefixLevel::shared(&pk, &pk, 2)];
    let err = |levels: &[PrefixLevel], opts: AttnOptions| {
        shared_prefix_attention_with_lse(&q, levels, &sk, &sk, &opts)
            .expect_err("an error")
            .to_string()
    };
    let slopes = Tensor::new(&[0.5f32, 0.25], &Device::Cpu).unwrap();
    for (opts, want) in [
        (AttnOptions::new().window(Some(2), None), "sliding windows"),
        (AttnOptions::new().alibi_slopes(slopes), "ALiBi"),
        (AttnOptions::new().dropout(0.1, 1), "dropout"),
        (
            AttnOptions::new().causal(true).key_lengths(vec![4, 1]),
            "at least sq - 1 = 2 keys",
        ),
    ] {
        let e = err(&shared, opts);
        assert!(e.contains(want), "{e}");
    }
    let e = err(
        &[PrefixLevel::new(&pk, &pk, vec![0, 1])],
        AttnOptions::new(),
    );
    assert!(e.contains("`groups` entries must be < n_groups 1"), "{e}");
    let e = err(&[PrefixLevel::new(&pk, &pk, vec![0])], AttnOptions::new());
    assert!(e.contains("one entry per sequence (2)"), "{e}");
    let e = err(
        &[PrefixLevel::new(&pk, &z(&[1, 6, 1, 8]), vec![0, 0])],
        AttnOptions::new(),
    );
    assert!(e.contains("level 0 `k` and `v` must be one shape"), "{e}");
    let wrong_b = z(&[3, 4, 1, 8]);
    let e = shared_prefix_attention_with_lse(&q, &shared, &wrong_b, &wrong_b, &AttnOptions::new())
        .expect_err("an error")
        .to_string();
    assert!(e.contains("`suffix_k` must be (b = 2"), "{e}");
}
