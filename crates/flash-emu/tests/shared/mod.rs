//! The emulated kernels' test cases, shared by the CUDA (`tests/cuda.rs`) and Metal
//! (`tests/metal.rs`) suites: small ragged shapes with every
//! option, against the f64 reference (output, log-sum-exp, dQ, dK, dV). Inputs are rounded to the
//! kernel dtype first, so the errors measure the kernels alone. The including test file names the
//! emulator module `emu` (both dialects expose the same API) and defines the tolerances `TOL`.

use candle_core::{DType, Result, Tensor, Var};
use flash_ops::plan::lse_host;
use flash_ops::{reference, Algorithm, AttnOptions, BlockMask, Varlen};
use flash_test_support::{
    block_mask_patterns, cu_seqlens, lse_err_slices, option_cases, oracle, oracle_varlen,
    rel_err_slices, to_f64_vec, Rng, Run,
};

use super::emu::{backward, forward, host_input, AttnParams, BackwardInputs, Inputs};
use super::TOL;

#[derive(Clone)]
pub struct Case {
    pub dtype: DType,
    pub b: usize,
    pub sq: usize,
    pub sk: usize,
    pub hq: usize,
    pub hk: usize,
    pub d: usize,
    pub opts: AttnOptions,
    /// Varlen: per-sequence (q_len, k_len); `b`, `sq`, `sk` are then ignored.
    pub varlen: Option<Vec<(usize, usize)>>,
    /// Dense q as a transposed (b, hq, sq, d) tensor: non-contiguous, unit last stride.
    pub strided_q: bool,
    /// The loss also takes `Σ lse·d_lse` (random `d_lse`): backward gets the lse's gradient.
    pub lse_grad: bool,
}

pub fn case(
    dtype: DType,
    (b, sq, sk): (usize, usize, usize),
    (hq, hk, d): (usize, usize, usize),
) -> Case {
    Case {
        dtype,
        b,
        sq,
        sk,
        hq,
        hk,
        d,
        opts: AttnOptions::new(),
        varlen: None,
        strided_q: false,
        lse_grad: false,
    }
}

/// [`oracle`] / [`oracle_varlen`] for the loss `Σ out·d_out + Σ lse·d_lse`: the f64 reference
/// with gradients by autograd, and `d_lse` (zero on rows that see no key, whose lse is -inf).
fn oracle_with_lse(
    qkv: [&Tensor; 3],
    d_out: &Tensor,
    rng: &mut Rng,
    f: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<(Tensor, Tensor)>,
) -> Result<(Run, Vec<f32>)> {
    let vars = qkv.map(|t| Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap());
    let (out, lse) = f(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
    )?;
    let lse64 = lse.to_dtype(DType::F64)?;
    let seen = lse64.ne(f64::NEG_INFINITY)?;
    let d_lse = seen.where_cond(&rng.tensor(lse.dims()), &lse64.zeros_like()?)?;
    let loss =
        ((&out * d_out.to_dtype(DType::F64)?)?.sum_all()? + (&lse64 * &d_lse)?.sum_all()?)?;
    let g = loss.backward()?;
    let [dq, dk, dv] = vars.map(|v| g.get(&v).expect("a gradient").clone());
    let d_lse: Vec<f32> = d_lse.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok((
        Run {
            out,
            lse,
            dq,
            dk,
            dv,
        },
        d_lse,
    ))
}

/// Errors of (out, lse, dq, dk, dv) against the f64 oracle.
fn run(c: &Case, seed: u64) -> Result<[f64; 5]> {
    let mut rng = Rng::new(seed);
    let (q, k, v, d_out) = match &c.varlen {
        None => {
            let q = if c.strided_q {
                rng.tensor(&[c.b, c.hq, c.sq, c.d]).transpose(1, 2)?
            } else {
                rng.tensor(&[c.b, c.sq, c.hq, c.d])
            };
            (
                q,
                rng.tensor(&[c.b, c.sk, c.hk, c.d]),
                rng.tensor(&[c.b, c.sk, c.hk, c.d]),
                rng.tensor(&[c.b, c.sq, c.hq, c.d]),
            )
        }
        Some(l) => {
            let tq: usize = l.iter().map(|x| x.0).sum();
            let tk: usize = l.iter().map(|x| x.1).sum();
            (
                rng.tensor(&[tq, c.hq, c.d]),
                rng.tensor(&[tk, c.hk, c.d]),
                rng.tensor(&[tk, c.hk, c.d]),
                rng.tensor(&[tq, c.hq, c.d]),
            )
        }
    };
    // Round to the kernel dtype; the oracle sees exactly the kernel's inputs.
    let (q, k, v) = (
        q.to_dtype(c.dtype)?,
        k.to_dtype(c.dtype)?,
        v.to_dtype(c.dtype)?,
    );
    let d_out = d_out.to_dtype(c.dtype)?;

    // The oracle (f64, gradients by autograd) and the resolved problem the kernels get.
    let mut d_lse = None;
    let (want, p) = match &c.varlen {
        None if c.lse_grad => {
            let f = |q: &Tensor, k: &Tensor, v: &Tensor| {
                reference::naive_attention_with_lse(q, k, v, &c.opts)
            };
            let (want, g) = oracle_with_lse([&q, &k, &v], &d_out, &mut rng, f)?;
            d_lse = Some(g);
            (want, AttnParams::dense(&q, &k, &v, &c.opts)?)
        }
        None => (
            oracle(&q, &k, &v, &d_out, &c.opts),
            AttnParams::dense(&q, &k, &v, &c.opts)?,
        ),
        Some(l) => {
            let lens_q: Vec<usize> = l.iter().map(|x| x.0).collect();
            let lens_k: Vec<usize> = l.iter().map(|x| x.1).collect();
            let (cq, ck) = (cu_seqlens(&lens_q), cu_seqlens(&lens_k));
            let mq = lens_q.iter().copied().max().unwrap_or(0);
            let mk = lens_k.iter().copied().max().unwrap_or(0);
            let batch = Varlen::new(&cq, &ck, mq, mk);
            let want = if c.lse_grad {
                let f = |q: &Tensor, k: &Tensor, v: &Tensor| {
                    reference::naive_attention_varlen(q, k, v, &batch, &c.opts)
                };
                let (want, g) = oracle_with_lse([&q, &k, &v], &d_out, &mut rng, f)?;
                d_lse = Some(g);
                want
            } else {
                oracle_varlen(&q, &k, &v, &d_out, &batch, &c.opts)
            };
            (want, AttnParams::varlen(&q, &k, &v, &batch, &c.opts)?)
        }
    };

    // Emulated kernels, through the backend's own launch plan.
    let mut inp = Inputs::new(&p, &q, &k, &v)?;
    let mut fwd = forward(&p, &mut inp)?;
    let mut d_out_buf = host_input(&d_out.contiguous()?)?.0;
    let bi = BackwardInputs {
        fwd: &mut fwd,
        d_out: &mut d_out_buf,
        dlse: d_lse.as_deref(),
    };
    let gr = backward(&p, &mut inp, bi)?;
    let lse: Vec<f64> = lse_host(&p, &fwd.stats).iter().map(|&x| x as f64).collect();
    let f = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    Ok([
        rel_err_slices(&f(&fwd.out), &to_f64_vec(&want.out)),
        lse_err_slices(&lse, &to_f64_vec(&want.lse)),
        rel_err_slices(&f(&gr.dq), &to_f64_vec(&want.dq)),
        rel_err_slices(&f(&gr.dk), &to_f64_vec(&want.dk)),
        rel_err_slices(&f(&gr.dv), &to_f64_vec(&want.dv)),
    ])
}

pub fn check(name: &str, c: &Case) {
    let e = run(c, 0x5eed ^ name.len() as u64).unwrap();
    println!(
        "{name:40} {:?} out {:.1e} lse {:.1e} dq {:.1e} dk {:.1e} dv {:.1e}",
        c.dtype, e[0], e[1], e[2], e[3], e[4]
    );
    let t = TOL.of(c.dtype);
    // The lse is f32 in every dtype (its error is the scores', from rounded inputs only).
    assert!(e[1] < 1e-5, "{name}: lse error {:.2e}", e[1]);
    for (what, x) in ["out", "lse", "dq", "dk", "dv"].iter().zip(e) {
        assert!(
            x.is_finite() && x < t,
            "{name} {:?}: {what} error {x:.2e} above {t:.0e}",
            c.dtype
        );
    }
}

pub const DTYPES: [DType; 3] = [DType::F16, DType::BF16, DType::F32];

#[test]
fn plain_gqa_ragged() {
    for dt in DTYPES {
        check(
            "plain gqa b2 sq70 sk90 h4/2 d64",
            &case(dt, (2, 70, 90), (4, 2, 64)),
        );
    }
}

#[test]
fn causal_and_block_skipping() {
    for dt in DTYPES {
        let mut c = case(dt, (1, 150, 150), (2, 1, 32));
        c.opts = AttnOptions::new().causal(true);
        check("causal sq150 sk150 d32", &c);
    }
    // sq > sk with bottom-right alignment: the first rows see no key (output 0, lse -inf).
    let mut c = case(DType::F16, (2, 90, 40), (2, 2, 64));
    c.opts = AttnOptions::new().causal(true);
    check("causal sq90 > sk40 (empty rows)", &c);
}

/// Every option of the shared table (`flash_test_support::option_cases`), V1 schedule included.
#[test]
fn every_option() {
    for (name, opts) in option_cases(2, 90, 2) {
        for dt in DTYPES {
            let mut c = case(dt, (2, 70, 90), (2, 1, 64));
            c.opts = opts.clone();
            check(name, &c);
        }
    }
}

#[test]
fn varlen_and_key_lengths() {
    for dt in DTYPES {
        let mut c = case(dt, (0, 0, 0), (4, 2, 64));
        c.varlen = Some(vec![(33, 70), (80, 17), (1, 1), (64, 64)]);
        c.opts = AttnOptions::new().causal(true);
        check("varlen causal", &c);
    }
}

#[test]
fn head_dims_and_strides() {
    for (dt, d) in [
        (DType::F16, 32),
        (DType::BF16, 80),
        (DType::F16, 96),
        (DType::BF16, 128),
        (DType::F16, 256),
        (DType::F32, 128),
        (DType::F32, 256),
        (DType::F16, 20),
    ] {
        let mut c = case(dt, (1, 40, 50), (2, 1, d));
        c.opts = AttnOptions::new().causal(true);
        c.strided_q = true;
        check(&format!("d{d} strided q causal"), &c);
    }
}

/// The log-sum-exp's gradient (`bwd_pre` forms delta − dlse): both schedules, masks that leave
/// rows without keys, GQA, varlen.
#[test]
fn lse_gradient() {
    for dt in DTYPES {
        for (name, opts) in [
            (
                "lse grad causal sq90 > sk40",
                AttnOptions::new().causal(true),
            ),
            (
                "lse grad v1 softcap",
                AttnOptions::new()
                    .algorithm(flash_ops::Algorithm::V1)
                    .softcap(5.0),
            ),
        ] {
            let mut c = case(dt, (2, 90, 40), (4, 2, 64));
            c.opts = opts;
            c.lse_grad = true;
            check(name, &c);
        }
        let mut c = case(dt, (0, 0, 0), (2, 1, 32));
        c.varlen = Some(vec![(33, 70), (80, 17), (1, 1)]);
        c.opts = AttnOptions::new().causal(true);
        c.lse_grad = true;
        check("lse grad varlen causal", &c);
    }
}

/// The comparison can fail: a kernel run without the causal mask is far from the causal oracle.
#[test]
fn comparison_detects_a_wrong_mask() {
    let c = case(DType::F32, (1, 40, 40), (1, 1, 32));
    let mut causal = c.clone();
    causal.opts = AttnOptions::new().causal(true);
    let mut rng = Rng::new(1);
    let q = rng.tensor(&[1, 40, 1, 32]).to_dtype(DType::F32).unwrap();
    let k = rng.tensor(&[1, 40, 1, 32]).to_dtype(DType::F32).unwrap();
    let v = rng.tensor(&[1, 40, 1, 32]).to_dtype(DType::F32).unwrap();
    let p = AttnParams::dense(&q, &k, &v, &c.opts).unwrap();
    let mut inp = Inputs::new(&p, &q, &k, &v).unwrap();
    let out = forward(&p, &mut inp).unwrap().out;
    let want = reference::naive_attention(
        &q.to_dtype(DType::F64).unwrap(),
        &k.to_dtype(DType::F64).unwrap(),
        &v.to_dtype(DType::F64).unwrap(),
        &causal.opts,
    )
    .unwrap();
    let e = rel_err_slices(
        &out.iter().map(|&x| x as f64).collect::<Vec<_>>(),
        &to_f64_vec(&want),
    );
    assert!(
        e > 0.1,
        "a non-causal output matched the causal oracle ({e:.2e})"
    );
}

// ---- block-sparse attention (issue 12) ---------------------------------------------------------

/// The block size of the block-mask cases: a multiple of every tile of both dialects.
pub const BLOCK: (usize, usize) = (64, 64);

/// A random block mask over (batch, heads): each block empty, full or partial (random bits,
/// half set) with odds `(empty, full)`, the rest partial; query block 1 of slot 0 lists nothing
/// (a row that sees no key: output 0, lse -inf, zero gradients).
pub fn random_mask(
    (q_len, k_len): (usize, usize),
    (batch, heads): (usize, usize),
    (empty, full): (f64, f64),
    seed: u64,
) -> BlockMask {
    let (bq, bk) = BLOCK;
    let (qb, kb) = (q_len.div_ceil(bq), k_len.div_ceil(bk));
    let mut rng = Rng::new(seed);
    let kind: Vec<f64> = (0..batch * heads * qb * kb)
        .map(|_| rng.uniform())
        .collect();
    let bits: Vec<bool> = (0..batch * heads * q_len * k_len)
        .map(|_| rng.uniform() < 0.5)
        .collect();
    BlockMask::from_predicate(q_len, k_len, BLOCK, batch, heads, move |b, h, i, j| {
        let slot = b * heads + h;
        let u = kind[(slot * qb + i / bq) * kb + j / bk];
        !(slot == 0 && i / bq == 1)
            && u >= empty
            && (u < empty + full || bits[(slot * q_len + i) * k_len + j])
    })
    .unwrap()
}

/// Random per-(sequence, head) masks with empty rows, full and partial blocks, against the
/// reference's expanded element mask: both schedules, every dtype, with causal, GQA, dropout.
#[test]
fn block_mask_random() {
    for (n, dt) in DTYPES.into_iter().enumerate() {
        for alg in [Algorithm::V2, Algorithm::V1] {
            let mut c = case(dt, (1, 150, 200), (2, 1, 64));
            let mask = random_mask((150, 200), (1, 2), (0.3, 0.3), 40 + n as u64);
            c.opts = AttnOptions::new().algorithm(alg).block_mask(mask);
            c.opts = match n {
                0 => c.opts.causal(true),
                1 => c.opts.dropout(0.2, 5),
                _ => c.opts.window(Some(90), Some(20)).softcap(6.0),
            };
            check(&format!("block mask random {alg:?} #{n}"), &c);
        }
    }
}

/// Every named pattern (broadcast over heads; `random` per head), all-full and all-partial.
#[test]
fn block_mask_named_patterns() {
    let (sq, sk) = (140usize, 192usize);
    let all_full = BlockMask::from_block_layout(
        &Tensor::ones(
            (1, sq.div_ceil(64), sk.div_ceil(64)),
            DType::U8,
            &candle_core::Device::Cpu,
        )
        .unwrap(),
        sq,
        sk,
        BLOCK,
    )
    .unwrap();
    let mut masks = block_mask_patterns(sq, sk, BLOCK, 2);
    masks.push(("all full, window", all_full));
    masks.push(("all partial", random_mask((sq, sk), (1, 1), (0.0, 0.0), 3)));
    for (n, (name, mask)) in masks.into_iter().enumerate() {
        let dt = DTYPES[n % 3];
        let mut c = case(dt, (1, sq, sk), (2, 1, 64));
        c.opts = AttnOptions::new().block_mask(mask);
        if name.starts_with("all full") {
            c.opts = c.opts.window(Some(50), None);
        }
        check(&format!("block mask {name}"), &c);
    }
}

/// Varlen (the mask sized by the max lengths, each sequence from its own start), the lse's
/// gradient, and a mask with one entry per sequence.
#[test]
fn block_mask_varlen_lse_grad() {
    let mut c = case(DType::F16, (0, 0, 0), (2, 1, 64));
    c.varlen = Some(vec![(130, 70), (40, 150), (1, 1)]);
    c.opts =
        AttnOptions::new()
            .causal(true)
            .block_mask(random_mask((130, 150), (1, 2), (0.2, 0.4), 77));
    c.lse_grad = true;
    check("block mask varlen, lse grad", &c);
    let mut c = case(DType::BF16, (2, 100, 130), (2, 2, 64));
    c.opts = AttnOptions::new().block_mask(random_mask((100, 130), (2, 1), (0.3, 0.3), 5));
    check("block mask per sequence", &c);
}
