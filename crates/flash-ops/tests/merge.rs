//! `merge_attention_states` on its own: attention over keys split into random parts, merged,
//! against the f64 reference over all keys (output, lse and every gradient through the parts'
//! differentiable lse), parts that see no key, all-empty parts, and bad input.

use candle_core::{DType, Device, Result, Tensor, Var};
use flash_ops::reference::naive_attention_with_lse;
use flash_ops::{flash_attn_with_lse, merge_attention_states, AttnOptions};
use flash_test_support::*;

type Attn<'a> = &'a dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<(Tensor, Tensor)>;

/// Out, lse, dq, dk, dv of `L = Σ out·d_out + Σ lse·d_lse` for attention over keys split at
/// `cuts`, each part by `part`, merged (one part: no merge).
fn split_run(
    [q, k, v]: [&Tensor; 3],
    (d_out, d_lse): (&Tensor, &Tensor),
    cuts: &[usize],
    dtype: DType,
    part: Attn,
) -> Result<[Tensor; 5]> {
    let vars = [q, k, v].map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap());
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for w in cuts.windows(2) {
        let (kk, vv) = (
            vars[1].narrow(1, w[0], w[1] - w[0])?,
            vars[2].narrow(1, w[0], w[1] - w[0])?,
        );
        let (o, l) = part(vars[0].as_tensor(), &kk, &vv)?;
        outs.push(o);
        lses.push(l);
    }
    let (out, lse) = merge_attention_states(&outs, &lses)?;
    let (out, lse) = (out.to_dtype(DType::F64)?, lse.to_dtype(DType::F64)?);
    let loss = ((&out * d_out)?.sum_all()? + (&lse * d_lse)?.sum_all()?)?;
    let g = loss.backward()?;
    let [dq, dk, dv] = vars.map(|v| g.get(&v).expect("a gradient").to_dtype(DType::F64).unwrap());
    Ok([out, lse, dq, dk, dv])
}

#[test]
fn split_keys_merge_to_full_attention() -> Result<()> {
    let mut rng = Rng::new(31);
    for case in 0..10 {
        let (b, sq, hk, group, d) = (
            1 + rng.below(2),
            1 + rng.below(40),
            1 + rng.below(2),
            1 + rng.below(2),
            16,
        );
        let sk = 2 + rng.below(120);
        let n_parts = 1 + rng.below(4);
        let mut cuts: Vec<usize> = (0..n_parts - 1).map(|_| rng.below(sk + 1)).collect();
        cuts.extend([0, sk]);
        cuts.sort();
        let [q, k, v, d_out] = rng.attn_inputs((b, sq, sk, hk * group, hk, d));
        let d_lse = rng.tensor(&[b, hk * group, sq]);
        let mut opts = AttnOptions::new();
        opts.softcap = (rng.below(2) == 0).then_some(6.0);
        let full = &|q: &Tensor, k: &Tensor, v: &Tensor| naive_attention_with_lse(q, k, v, &opts);
        let want = split_run([&q, &k, &v], (&d_out, &d_lse), &[0, sk], DType::F64, full)?;
        // Empty parts (repeated cuts) are skipped: flash_attn needs a key; the merge gets the rest.
        cuts.dedup();
        let ours = &|q: &Tensor, k: &Tensor, v: &Tensor| flash_attn_with_lse(q, k, v, &opts);
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            let got = split_run([&q, &k, &v], (&d_out, &d_lse), &cuts, dtype, ours)?;
            for (i, name) in ["out", "lse", "dq", "dk", "dv"].iter().enumerate() {
                let e = rel_err(&got[i], &want[i]);
                assert!(
                    e < tol,
                    "case {case} {dtype:?} cuts {cuts:?}: {name} {e:.2e}"
                );
            }
        }
    }
    Ok(())
}

fn f32s(v: &[f32], dims: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), dims, &Device::Cpu).unwrap()
}

/// Rows whose part saw no key (lse -inf) contribute nothing; a row no part saw is zeros with
/// lse -inf; every gradient stays finite.
#[test]
fn empty_parts_and_all_empty_rows() -> Result<()> {
    let inf = f32::NEG_INFINITY;
    // (b, sq, hq, d) = (1, 3, 1, 2); lse (1, 1, 3).
    let o1 = Var::from_tensor(&f32s(&[1., 2., 3., 4., 0., 0.], &[1, 3, 1, 2]))?;
    let o2 = Var::from_tensor(&f32s(&[5., 6., 0., 0., 0., 0.], &[1, 3, 1, 2]))?;
    let l1 = Var::from_tensor(&f32s(&[0.5, 1.0, inf], &[1, 1, 3]))?;
    let l2 = Var::from_tensor(&f32s(&[0.5, inf, inf], &[1, 1, 3]))?;
    let (out, lse) = merge_attention_states(
        &[o1.as_tensor().clone(), o2.as_tensor().clone()],
        &[l1.as_tensor().clone(), l2.as_tensor().clone()],
    )?;
    let out_v: Vec<f32> = out.flatten_all()?.to_vec1()?;
    // Row 0: equal weights, the mean; row 1: part 1 alone; row 2: nothing.
    assert_eq!(out_v, [3., 4., 3., 4., 0., 0.]);
    let lse_v: Vec<f32> = lse.flatten_all()?.to_vec1()?;
    assert!((lse_v[0] - (0.5 + 2f32.ln())).abs() < 1e-6, "{lse_v:?}");
    assert_eq!(&lse_v[1..], [1.0, inf]);
    // A loss of the merged output and of the finite lse rows.
    let mask = f32s(&[1., 1., 0.], &[1, 1, 3]);
    let finite_lse = mask.ne(0f32)?.where_cond(&lse, &mask)?;
    let loss = (out.sqr()?.sum_all()? + finite_lse.sum_all()?)?;
    let g = loss.backward()?;
    for (name, v) in [("o1", &o1), ("o2", &o2), ("l1", &l1), ("l2", &l2)] {
        let gv: Vec<f32> = g.get(v).expect("a gradient").flatten_all()?.to_vec1()?;
        assert!(gv.iter().all(|x| x.is_finite()), "d{name} {gv:?}");
    }
    // Part 2 saw no key in rows 1 and 2: no gradient reaches it there.
    let d_o2: Vec<f32> = g.get(&o2).expect("do2").flatten_all()?.to_vec1()?;
    assert_eq!(&d_o2[2..], [0.; 4]);
    // Row 0, o1 has weight 1/2: d(Σ out²)/d o1 = out · 2 · 1/2.
    let d_o1: Vec<f32> = g.get(&o1).expect("do1").flatten_all()?.to_vec1()?;
    assert_eq!(&d_o1[..2], [3., 4.]);
    Ok(())
}

/// Every part empty everywhere: zeros and -inf, no NaN.
#[test]
fn all_parts_empty() -> Result<()> {
    let o = Var::from_tensor(&Tensor::zeros((2, 4, 3, 8), DType::F32, &Device::Cpu)?)?;
    let l = Var::from_tensor(&Tensor::full(f32::NEG_INFINITY, (2, 3, 4), &Device::Cpu)?)?;
    let parts = [
        o.as_tensor().clone(),
        o.as_tensor().clone(),
        o.as_tensor().clone(),
    ];
    let lses = [
        l.as_tensor().clone(),
        l.as_tensor().clone(),
        l.as_tensor().clone(),
    ];
    let (out, lse) = merge_attention_states(&parts, &lses)?;
    assert!(out
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .all(|&x| x == 0.0));
    assert!(lse
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .all(|&x| x == f32::NEG_INFINITY));
    let g = out.sum_all()?.backward()?;
    for v in [&o, &l] {
        let gv = g
            .get(v)
            .expect("a gradient")
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert!(gv.iter().all(|&x| x == 0.0), "{gv:?}");
    }
    Ok(())
}

/// The varlen layout: outs `(total, hq, d)`, lses `(hq, total)`.
#[test]
fn varlen_layout() -> Result<()> {
    let mut rng = Rng::new(32);
    let o =
        [rng.tensor(&[7, 2, 4]), rng.tensor(&[7, 2, 4])].map(|t| t.to_dtype(DType::F32).unwrap());
    let l = [rng.tensor(&[2, 7]), rng.tensor(&[2, 7])].map(|t| t.to_dtype(DType::F32).unwrap());
    let (out, lse) = merge_attention_states(&o, &l)?;
    // By hand, f64: softmax of the two lses per row.
    let (l0, l1) = (to_f64_vec(&l[0]), to_f64_vec(&l[1]));
    let (o0, o1) = (to_f64_vec(&o[0]), to_f64_vec(&o[1]));
    let mut want = vec![0f64; 7 * 2 * 4];
    let mut want_lse = vec![0f64; 14];
    for t in 0..7 {
        for h in 0..2 {
            let (a, b) = (l0[h * 7 + t], l1[h * 7 + t]);
            let m = a.max(b);
            let (wa, wb) = ((a - m).exp(), (b - m).exp());
            want_lse[h * 7 + t] = m + (wa + wb).ln();
            for c in 0..4 {
                let i = (t * 2 + h) * 4 + c;
                want[i] = (wa * o0[i] + wb * o1[i]) / (wa + wb);
            }
        }
    }
    assert!(rel_err_slices(&to_f64_vec(&out), &want) < 1e-6);
    assert!(rel_err_slices(&to_f64_vec(&lse), &want_lse) < 1e-6);
    Ok(())
}

#[test]
fn bad_input_is_an_error() {
    let o = Tensor::zeros((1, 2, 3, 4), DType::F32, &Device::Cpu).unwrap();
    let l = Tensor::zeros((1, 3, 2), DType::F32, &Device::Cpu).unwrap();
    let msg = |r: Result<(Tensor, Tensor)>| r.expect_err("an error").to_string();
    let e = msg(merge_attention_states(&[], &[]));
    assert!(e.contains("same non-zero number"), "{e}");
    let e = msg(merge_attention_states(
        std::slice::from_ref(&o),
        &[l.clone(), l.clone()],
    ));
    assert!(e.contains("same non-zero number"), "{e}");
    let e = msg(merge_attention_states(
        std::slice::from_ref(&o),
        &[l.transpose(1, 2).unwrap()],
    ));
    assert!(e.contains("`lses[0]` must be f32 [1, 3, 2]"), "{e}");
    let e = msg(merge_attention_states(
        std::slice::from_ref(&o),
        &[l.to_dtype(DType::F16).unwrap()],
    ));
    assert!(e.contains("`lses[0]` must be f32"), "{e}");
    let o2 = Tensor::zeros((1, 2, 3, 5), DType::F32, &Device::Cpu).unwrap();
    let e = msg(merge_attention_states(
        &[o.clone(), o2],
        &[l.clone(), l.clone()],
    ));
    assert!(e.contains("`outs[1]`"), "{e}");
}
