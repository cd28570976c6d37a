//! The emulated kernels' test cases, shared by the CUDA (`tests/cuda.rs`) and Metal
//! (`tests/metal.rs`) suites: small ragged shapes with every
//! option, against the f64 reference (output, log-sum-exp, dQ, dK, dV). Inputs are rounded to the
//! kernel dtype first, so the errors measure the kernels alone. The including test file names the
//! emulator module `emu` (both dialects expose the same API) and defines the tolerances `tol(dtype)`.

use candle_core::{DType, Device, Result, Tensor, Var};
use flash_ops::plan::lse_host;
use flash_ops::{reference, Algorithm, AttnOptions, Varlen};

use super::emu::{backward, forward, host_input, AttnParams, Inputs};
use super::tol;

pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    pub fn tensor(&mut self, dims: &[usize]) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|_| {
                let (u1, u2) = (self.next(), self.next());
                (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
            })
            .collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }
}

fn rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

fn lse_rel(a: &[f64], b: &[f64]) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        if y.is_infinite() {
            assert_eq!(x, y, "a row that sees no key must have lse = -inf");
            continue;
        }
        num += (x - y) * (x - y);
        den += y * y;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

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
    }
}

/// Errors of (out, lse, dq, dk, dv) against the f64 oracle.
fn run(c: &Case, seed: u64) -> Result<[f64; 5]> {
    let mut rng = Rng(seed);
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
    let cu = |f: fn(&(usize, usize)) -> usize| -> Tensor {
        let l = c.varlen.as_ref().unwrap();
        let mut acc = vec![0u32];
        for x in l {
            acc.push(acc.last().unwrap() + f(x) as u32);
        }
        Tensor::new(acc, &Device::Cpu).unwrap()
    };
    let max =
        |f: fn(&(usize, usize)) -> usize| c.varlen.as_ref().unwrap().iter().map(f).max().unwrap();

    // Oracle: f64 naive attention, gradients by autograd, loss = sum(out * d_out).
    let (qv, kv, vv) = (
        Var::from_tensor(&q.to_dtype(DType::F64)?)?,
        Var::from_tensor(&k.to_dtype(DType::F64)?)?,
        Var::from_tensor(&v.to_dtype(DType::F64)?)?,
    );
    let (o_ref, lse_ref) = match &c.varlen {
        None => reference::naive_attention_with_lse(
            qv.as_tensor(),
            kv.as_tensor(),
            vv.as_tensor(),
            &c.opts,
        )?,
        Some(_) => reference::naive_attention_varlen(
            qv.as_tensor(),
            kv.as_tensor(),
            vv.as_tensor(),
            &cu(|x| x.0),
            &cu(|x| x.1),
            max(|x| x.0),
            max(|x| x.1),
            &c.opts,
        )?,
    };
    let grads = (o_ref.clone() * d_out.to_dtype(DType::F64)?)?
        .sum_all()?
        .backward()?;
    let g = |x: &Var| flat(grads.get(x.as_tensor()).unwrap());

    // Emulated kernels, through the backend's own launch plan.
    let p = match &c.varlen {
        None => AttnParams::dense(&q, &k, &v, &c.opts)?,
        Some(_) => AttnParams::varlen(
            &q,
            &k,
            &v,
            &Varlen::new(&cu(|x| x.0), &cu(|x| x.1), max(|x| x.0), max(|x| x.1)),
            &c.opts,
        )?,
    };
    let mut inp = Inputs::new(&p, &q, &k, &v)?;
    let mut fwd = forward(&p, &mut inp)?;
    let mut d_out_buf = host_input(&d_out.contiguous()?)?.0;
    let gr = backward(&p, &mut inp, &mut fwd, &mut d_out_buf)?;
    let lse: Vec<f64> = lse_host(&p, &fwd.stats).iter().map(|&x| x as f64).collect();
    let f = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    Ok([
        rel(&f(&fwd.out), &flat(&o_ref)),
        lse_rel(&lse, &flat(&lse_ref)),
        rel(&f(&gr.dq), &g(&qv)),
        rel(&f(&gr.dk), &g(&kv)),
        rel(&f(&gr.dv), &g(&vv)),
    ])
}

pub fn check(name: &str, c: &Case) {
    let e = run(c, 0x5eed ^ name.len() as u64).unwrap();
    println!(
        "{name:40} {:?} out {:.1e} lse {:.1e} dq {:.1e} dk {:.1e} dv {:.1e}",
        c.dtype, e[0], e[1], e[2], e[3], e[4]
    );
    let t = tol(c.dtype);
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

#[test]
fn window_alibi_softcap() {
    for dt in DTYPES {
        let mut c = case(dt, (1, 100, 130), (2, 2, 64));
        c.opts = AttnOptions::new().window(Some(20), Some(7));
        check("window (20, 7)", &c);
        let slopes = Tensor::new(&[0.25f32, 0.0625], &Device::Cpu).unwrap();
        c.opts = AttnOptions::new().alibi_slopes(slopes).causal(true);
        check("alibi + causal", &c);
        c.opts = AttnOptions::new().softcap(5.0).softmax_scale(0.4);
        check("softcap 5, scale 0.4", &c);
    }
}

#[test]
fn dropout_regenerated_in_backward() {
    for dt in DTYPES {
        let mut c = case(dt, (2, 67, 75), (2, 1, 64));
        c.opts = AttnOptions::new().dropout(0.2, 1234);
        check("dropout 0.2", &c);
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
    let mut c = case(DType::BF16, (3, 40, 72), (2, 1, 64));
    c.opts = AttnOptions::new().key_lengths(vec![72, 5, 40]);
    check("dense key_lengths", &c);
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

#[test]
fn flash_attention_v1_schedule() {
    for dt in DTYPES {
        let mut c = case(dt, (2, 100, 70), (4, 2, 64));
        c.opts = AttnOptions::new()
            .algorithm(Algorithm::V1)
            .causal(true)
            .dropout(0.1, 7);
        check("v1 causal dropout", &c);
        c.opts = AttnOptions::new()
            .algorithm(Algorithm::V1)
            .window(Some(9), None)
            .softcap(3.0);
        check("v1 window softcap", &c);
    }
}

/// The comparison can fail: a kernel run without the causal mask is far from the causal oracle.
#[test]
fn comparison_detects_a_wrong_mask() {
    let c = case(DType::F32, (1, 40, 40), (1, 1, 32));
    let mut causal = c.clone();
    causal.opts = AttnOptions::new().causal(true);
    let mut rng = Rng(1);
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
    let e = rel(
        &out.iter().map(|&x| x as f64).collect::<Vec<_>>(),
        &flat(&want),
    );
    assert!(
        e > 0.1,
        "a non-causal output matched the causal oracle ({e:.2e})"
    );
}
