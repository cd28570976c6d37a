//! The log-sum-exp of `flash_attn_with_lse` / `flash_attn_varlen_with_lse` is differentiable:
//! a loss of both the output and the lse, against the f64 reference, every gradient, every
//! option, both schedules, dense and varlen, f32 and half.

use candle_core::{DType, Result, Tensor, Var};
use flash_ops::reference::{naive_attention_varlen, naive_attention_with_lse};
use flash_ops::{flash_attn_varlen_with_lse, flash_attn_with_lse, Algorithm, AttnOptions, Varlen};
use flash_test_support::*;

const F32_TOL: f64 = 1e-5;
const HALF_TOL: f64 = 2e-2;

type Attn<'a> = &'a dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<(Tensor, Tensor)>;

/// `L = Σ out·d_out + Σ lse·d_lse` in `dtype`: (out, lse, dq, dk, dv) as f64.
fn run(qkv: [&Tensor; 3], grads: (&Tensor, &Tensor), dtype: DType, f: Attn) -> Result<[Tensor; 5]> {
    let vars = qkv.map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap());
    let (out, lse) = f(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
    )?;
    let (out, lse) = (out.to_dtype(DType::F64)?, lse.to_dtype(DType::F64)?);
    let loss = ((&out * grads.0)?.sum_all()? + (&lse * grads.1)?.sum_all()?)?;
    let g = loss.backward()?;
    let [dq, dk, dv] = vars.map(|v| g.get(&v).expect("a gradient").to_dtype(DType::F64).unwrap());
    Ok([out, lse, dq, dk, dv])
}

fn compare(what: &str, qkv: [&Tensor; 3], d_out: &Tensor, ours: Attn, oracle: Attn) {
    // d_lse on the rows that see a key: their lse is finite in the oracle's forward.
    let (_, want_lse) = oracle(qkv[0], qkv[1], qkv[2]).unwrap();
    let mut rng = Rng::new(want_lse.elem_count() as u64);
    let finite = want_lse
        .to_dtype(DType::F64)
        .unwrap()
        .ne(f64::NEG_INFINITY)
        .unwrap();
    let d_lse = finite
        .where_cond(
            &rng.tensor(want_lse.dims()),
            &want_lse.zeros_like().unwrap().to_dtype(DType::F64).unwrap(),
        )
        .unwrap();
    let want = run(qkv, (d_out, &d_lse), DType::F64, oracle).unwrap();
    for (dtype, tol) in [
        (DType::F32, F32_TOL),
        (DType::F16, HALF_TOL),
        (DType::BF16, HALF_TOL),
    ] {
        let got = run(qkv, (d_out, &d_lse), dtype, ours).unwrap();
        let e = lse_err(&got[1], &want[1]);
        assert!(e < tol, "{what} {dtype:?}: lse {e:.2e}");
        for (name, i) in [("out", 0), ("dq", 2), ("dk", 3), ("dv", 4)] {
            let e = rel_err(&got[i], &want[i]);
            assert!(e < tol, "{what} {dtype:?}: {name} {e:.2e}");
        }
    }
}

#[test]
fn dense_every_option_both_schedules() {
    let mut rng = Rng::new(21);
    for (b, sq, sk, hq, hk, d) in [(2, 37, 150, 4, 2, 32), (1, 140, 60, 3, 1, 64)] {
        let [q, k, v, d_out] = rng.attn_inputs((b, sq, sk, hq, hk, d));
        let mut cases = option_cases(b, sk, hq);
        cases.push(("plain", AttnOptions::new()));
        cases.push(("v1 plain", AttnOptions::new().algorithm(Algorithm::V1)));
        for (name, opts) in cases {
            let ours = |q: &Tensor, k: &Tensor, v: &Tensor| flash_attn_with_lse(q, k, v, &opts);
            let oracle =
                |q: &Tensor, k: &Tensor, v: &Tensor| naive_attention_with_lse(q, k, v, &opts);
            let what = format!("{name} b{b} sq{sq} sk{sk} hq{hq} hk{hk} d{d}");
            compare(&what, [&q, &k, &v], &d_out, &ours, &oracle);
        }
    }
}

#[test]
fn varlen_both_schedules() {
    let mut rng = Rng::new(22);
    let (lq, lk) = ([5usize, 1, 130, 17], [40usize, 9, 3, 170]);
    let (tq, tk) = (lq.iter().sum::<usize>(), lk.iter().sum::<usize>());
    let q = rng.tensor(&[tq, 4, 16]);
    let k = rng.tensor(&[tk, 2, 16]);
    let v = rng.tensor(&[tk, 2, 16]);
    let d_out = rng.tensor(&[tq, 4, 16]);
    let batch = Varlen::new(&cu_seqlens(&lq), &cu_seqlens(&lk), 130, 170);
    for algorithm in [Algorithm::V2, Algorithm::V1] {
        let opts = AttnOptions::new().causal(true).algorithm(algorithm);
        let ours =
            |q: &Tensor, k: &Tensor, v: &Tensor| flash_attn_varlen_with_lse(q, k, v, &batch, &opts);
        let oracle =
            |q: &Tensor, k: &Tensor, v: &Tensor| naive_attention_varlen(q, k, v, &batch, &opts);
        compare(
            &format!("varlen causal {algorithm:?}"),
            [&q, &k, &v],
            &d_out,
            &ours,
            &oracle,
        );
    }
}

/// Only the lse in the loss (dO = 0): the gradient comes from dlse alone.
#[test]
fn lse_alone() {
    let mut rng = Rng::new(23);
    let [q, k, v, d_out] = rng.attn_inputs((2, 20, 33, 2, 2, 16));
    let zero = d_out.zeros_like().unwrap();
    let opts = AttnOptions::new().softcap(4.0);
    let ours = |q: &Tensor, k: &Tensor, v: &Tensor| flash_attn_with_lse(q, k, v, &opts);
    let oracle = |q: &Tensor, k: &Tensor, v: &Tensor| naive_attention_with_lse(q, k, v, &opts);
    compare("lse alone", [&q, &k, &v], &zero, &ours, &oracle);
}
