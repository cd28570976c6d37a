//! The fused linear + cross-entropy against the unfused loss (`log_softmax` + gather through
//! Candle's ops in f64, gradients by autograd), and its error messages.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var, D};
use flash_ops_models::{linear_cross_entropy, CeOptions};

const IGNORE: u32 = u32::MAX;

/// SplitMix64-driven data, so every run sees the same numbers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn tensor(&mut self, shape: &[usize], scale: f64) -> Result<Tensor> {
        let n = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|_| (2.0 * self.uniform() - 1.0) * scale)
            .collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }

    /// Targets below `v`, every `ignore_every`-th row (if any) the ignore id.
    fn targets(&mut self, n: usize, v: usize, ignore_every: Option<usize>) -> Vec<u32> {
        (0..n)
            .map(|i| match ignore_every {
                Some(k) if i % k == 1 => IGNORE,
                _ => (self.next() % v as u64) as u32,
            })
            .collect()
    }
}

struct Case {
    h: Tensor,
    w: Tensor,
    b: Option<Tensor>,
    targets: Vec<u32>,
}

fn case(
    seed: u64,
    (n, d, v): (usize, usize, usize),
    bias: bool,
    ignore: Option<usize>,
) -> Result<Case> {
    let mut rng = Rng(seed);
    Ok(Case {
        h: rng.tensor(&[n, d], 2.0)?,
        w: rng.tensor(&[v, d], 1.0)?,
        b: bias.then(|| rng.tensor(&[v], 1.0)).transpose()?,
        targets: rng.targets(n, v, ignore),
    })
}

/// Loss and gradients (hidden, weight, bias) of `f(h, w, b) · upstream`, all as f64 tensors.
type Grads = (f64, Tensor, Tensor, Option<Tensor>);

fn run(
    c: &Case,
    dtype: DType,
    upstream: f64,
    f: impl Fn(&Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor>,
) -> Result<Grads> {
    let h = Var::from_tensor(&c.h.to_dtype(dtype)?)?;
    let w = Var::from_tensor(&c.w.to_dtype(dtype)?)?;
    let b =
        c.b.as_ref()
            .map(|b| Var::from_tensor(&b.to_dtype(dtype)?))
            .transpose()?;
    let loss = f(
        h.as_tensor(),
        w.as_tensor(),
        b.as_ref().map(|b| b.as_tensor()),
    )?;
    let grads = loss.affine(upstream, 0.0)?.backward()?;
    let g = |t: &Tensor| -> Result<Tensor> {
        match grads.get(t) {
            Some(g) => Ok(g.to_dtype(DType::F64)?),
            None => Ok(t.zeros_like()?.to_dtype(DType::F64)?),
        }
    };
    Ok((
        loss.to_dtype(DType::F64)?.to_scalar::<f64>()?,
        g(h.as_tensor())?,
        g(w.as_tensor())?,
        b.as_ref().map(|b| g(b.as_tensor())).transpose()?,
    ))
}

/// The unfused loss in f64: full logits, `log_softmax`, gather, mean over the counted rows.
fn unfused(
    h: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    targets: &[u32],
    opts: &CeOptions,
) -> Result<Tensor> {
    let v = w.dim(0)?;
    let counted: Vec<u32> = (0..targets.len() as u32)
        .filter(|&i| Some(targets[i as usize]) != opts.ignore_index)
        .collect();
    if counted.is_empty() {
        return Ok((h.sum_all()? * 0.0)?);
    }
    let rows = Tensor::new(counted.as_slice(), &Device::Cpu)?;
    let labels: Vec<u32> = counted.iter().map(|&i| targets[i as usize]).collect();
    let labels = Tensor::from_vec(labels, (counted.len(), 1), &Device::Cpu)?;
    let mut z = h.index_select(&rows, 0)?.matmul(&w.t()?)?;
    if let Some(b) = b {
        z = z.broadcast_add(b)?;
    }
    let lse = z.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = z.broadcast_sub(&lse)?;
    let eps = opts.label_smoothing;
    let nll = logp.gather(&labels, D::Minus1)?.neg()?;
    let smooth = logp
        .sum_keepdim(D::Minus1)?
        .neg()?
        .affine(1.0 / v as f64, 0.0)?;
    let per_row = ((nll.affine(1.0 - eps, 0.0)? + smooth.affine(eps, 0.0)?)?
        + lse.sqr()?.affine(opts.z_loss, 0.0)?)?;
    Ok(per_row.mean_all()?)
}

fn fused<'a>(
    targets: &'a [u32],
    opts: &'a CeOptions,
) -> impl Fn(&Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor> + 'a {
    move |h, w, b| {
        let t = Tensor::new(targets, &Device::Cpu)?;
        Ok(linear_cross_entropy(h, w, b, &t, opts)?)
    }
}

/// The reference: the unfused loss of the case in f64, and its gradients by autograd.
fn reference(c: &Case, upstream: f64, opts: &CeOptions) -> Result<Grads> {
    run(c, DType::F64, upstream, |h, w, b| {
        unfused(h, w, b, &c.targets, opts)
    })
}

/// The fused loss of `c` in `dtype` against the reference, both scaled by `upstream`.
fn check_fused(
    c: &Case,
    dtype: DType,
    upstream: f64,
    opts: &CeOptions,
    what: &str,
    tol: f64,
) -> Result<()> {
    let want = reference(c, upstream, opts)?;
    let got = run(c, dtype, upstream, fused(&c.targets, opts))?;
    assert_close(what, &got, &want, tol)
}

/// `max |a − b| / max |b|` (0 when both are zero).
fn rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
    let scale = b.abs()?.max_all()?.to_scalar::<f64>()?;
    Ok(if diff == 0.0 {
        0.0
    } else {
        diff / scale.max(1e-300)
    })
}

fn assert_close(what: &str, got: &Grads, want: &Grads, tol: f64) -> Result<()> {
    let loss_rel = (got.0 - want.0).abs() / want.0.abs().max(1e-300);
    assert!(
        loss_rel <= tol,
        "{what}: loss {} vs {} (rel {loss_rel:.2e})",
        got.0,
        want.0
    );
    for (name, g, w) in [("hidden", &got.1, &want.1), ("weight", &got.2, &want.2)] {
        let r = rel(g, w)?;
        assert!(r <= tol, "{what}: d{name} rel error {r:.2e} > {tol:.0e}");
    }
    match (&got.3, &want.3) {
        (Some(g), Some(w)) => {
            let r = rel(g, w)?;
            assert!(r <= tol, "{what}: dbias rel error {r:.2e} > {tol:.0e}");
        }
        (None, None) => {}
        _ => panic!("{what}: bias gradient present on one side only"),
    }
    Ok(())
}

fn options(smoothing: f64, z_loss: f64, chunk_rows: Option<usize>) -> CeOptions {
    CeOptions {
        ignore_index: Some(IGNORE),
        label_smoothing: smoothing,
        z_loss,
        chunk_rows,
    }
}

#[test]
fn f32_matches_unfused_loss_and_every_gradient() -> Result<()> {
    // 37 rows in chunks of 8 (and of the default size): a ragged last chunk; every third row
    // ignored.
    for bias in [false, true] {
        for (smoothing, z_loss) in [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-2), (0.2, 1e-3)] {
            for chunk in [Some(8), Some(1), None] {
                let c = case(7, (37, 24, 301), bias, Some(3))?;
                let opts = options(smoothing, z_loss, chunk);
                let what = format!("bias={bias} eps={smoothing} z={z_loss} chunk={chunk:?}");
                check_fused(&c, DType::F32, 1.7, &opts, &what, 1e-5)?;
            }
        }
    }
    Ok(())
}

/// f64 inputs take the chunked-Candle-ops path (the one other devices use).
#[test]
fn f64_chunked_ops_path_matches_unfused() -> Result<()> {
    for bias in [false, true] {
        for (smoothing, z_loss) in [(0.0, 0.0), (0.15, 1e-2)] {
            let c = case(11, (29, 16, 97), bias, Some(4))?;
            let opts = options(smoothing, z_loss, Some(6));
            let what = format!("f64 bias={bias} eps={smoothing} z={z_loss}");
            check_fused(&c, DType::F64, 0.3, &opts, &what, 1e-10)?;
        }
    }
    Ok(())
}

#[test]
fn bf16_and_f16_within_two_percent() -> Result<()> {
    let c = case(5, (33, 32, 211), true, Some(5))?;
    let opts = options(0.1, 1e-3, Some(7));
    let want = reference(&c, 1.0, &opts)?;
    for dtype in [DType::BF16, DType::F16] {
        // The reference sees the same rounded inputs.
        let rounded = Case {
            h: c.h.to_dtype(dtype)?.to_dtype(DType::F64)?,
            w: c.w.to_dtype(dtype)?.to_dtype(DType::F64)?,
            b: c.b
                .as_ref()
                .map(|b| b.to_dtype(dtype)?.to_dtype(DType::F64))
                .transpose()?,
            targets: c.targets.clone(),
        };
        let want_r = reference(&rounded, 1.0, &opts)?;
        let got = run(&c, dtype, 1.0, fused(&c.targets, &opts))?;
        assert_close(&format!("{dtype:?}"), &got, &want_r, 2e-2)?;
        assert_close(&format!("{dtype:?} vs exact inputs"), &got, &want, 2e-2)?;
    }
    Ok(())
}

#[test]
fn all_rows_ignored_gives_zero_loss_and_zero_gradients() -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        let mut c = case(3, (10, 8, 50), true, None)?;
        c.targets = vec![IGNORE; 10];
        let opts = options(0.1, 1e-2, Some(3));
        let (loss, dh, dw, db) = run(&c, dtype, 1.0, fused(&c.targets, &opts))?;
        assert_eq!(loss, 0.0, "{dtype:?}");
        for g in [dh, dw, db.expect("bias gradient")] {
            let v = g.flatten_all()?.to_vec1::<f64>()?;
            assert!(v.iter().all(|&x| x == 0.0), "{dtype:?}: {v:?}");
        }
    }
    Ok(())
}

/// Detached inputs (evaluation): the same loss, and nothing for autograd to track.
#[test]
fn detached_inputs_give_the_loss_alone() -> Result<()> {
    let c = case(9, (20, 12, 64), true, Some(3))?;
    let opts = options(0.0, 0.0, Some(6));
    let t = Tensor::new(c.targets.as_slice(), &Device::Cpu)?;
    let (h, w, b) = (
        c.h.to_dtype(DType::F32)?,
        c.w.to_dtype(DType::F32)?,
        c.b.as_ref().unwrap().to_dtype(DType::F32)?,
    );
    let loss = linear_cross_entropy(&h, &w, Some(&b), &t, &opts)?;
    assert!(!loss.track_op());
    let want = unfused(&c.h, &c.w, c.b.as_ref(), &c.targets, &opts)?.to_scalar::<f64>()?;
    let got = loss.to_scalar::<f32>()? as f64;
    assert!((got - want).abs() <= 1e-5 * want.abs(), "{got} vs {want}");
    Ok(())
}

#[test]
fn bad_input_is_an_error_naming_the_argument() -> Result<()> {
    let dev = Device::Cpu;
    let h = Tensor::zeros((4, 8), DType::F32, &dev)?;
    let w = Tensor::zeros((10, 8), DType::F32, &dev)?;
    let b = Tensor::zeros(10, DType::F32, &dev)?;
    let t = Tensor::new(&[1u32, 2, 3, 4], &dev)?;
    let o = CeOptions::default();
    let err = |r: candle_core::Result<Tensor>| match r {
        Ok(_) => panic!("accepted bad input"),
        Err(e) => e.to_string(),
    };
    // Otherwise valid input with one option out of range.
    let bad_option = |opts: CeOptions| err(linear_cross_entropy(&h, &w, None, &t, &opts));
    let cases: Vec<(&str, String)> = vec![
        (
            "`weight`",
            err(linear_cross_entropy(
                &h,
                &Tensor::zeros((10, 7), DType::F32, &dev)?,
                None,
                &t,
                &o,
            )),
        ),
        (
            "`hidden`",
            err(linear_cross_entropy(&h.unsqueeze(0)?, &w, None, &t, &o)),
        ),
        (
            "`bias`",
            err(linear_cross_entropy(
                &h,
                &w,
                Some(&Tensor::zeros(9, DType::F32, &dev)?),
                &t,
                &o,
            )),
        ),
        (
            "`targets`",
            err(linear_cross_entropy(
                &h,
                &w,
                None,
                &Tensor::new(&[1u32, 2, 3], &dev)?,
                &o,
            )),
        ),
        (
            "`targets`[2] = 10",
            err(linear_cross_entropy(
                &h,
                &w,
                Some(&b),
                &Tensor::new(&[1u32, 2, 10, 4], &dev)?,
                &o,
            )),
        ),
        (
            "`targets` dtype",
            err(linear_cross_entropy(
                &h,
                &w,
                None,
                &t.to_dtype(DType::F32)?,
                &o,
            )),
        ),
        (
            "`hidden` dtype",
            err(linear_cross_entropy(
                &h.to_dtype(DType::U32)?,
                &w,
                None,
                &t,
                &o,
            )),
        ),
        (
            "`weight` dtype",
            err(linear_cross_entropy(
                &h,
                &w.to_dtype(DType::BF16)?,
                None,
                &t,
                &o,
            )),
        ),
        (
            "`bias` dtype",
            err(linear_cross_entropy(
                &h,
                &w,
                Some(&b.to_dtype(DType::F64)?),
                &t,
                &o,
            )),
        ),
        (
            "`label_smoothing`",
            bad_option(CeOptions {
                label_smoothing: 1.0,
                ..o.clone()
            }),
        ),
        (
            "`z_loss`",
            bad_option(CeOptions {
                z_loss: -1.0,
                ..o.clone()
            }),
        ),
        (
            "`chunk_rows`",
            bad_option(CeOptions {
                chunk_rows: Some(0),
                ..o.clone()
            }),
        ),
    ];
    for (needle, msg) in cases {
        assert!(msg.contains(needle), "expected {needle} in: {msg}");
    }
    // The ignore id itself may be out of the vocabulary.
    let ignore = CeOptions {
        ignore_index: Some(99),
        ..o
    };
    linear_cross_entropy(
        &h,
        &w,
        None,
        &Tensor::new(&[1u32, 99, 3, 4], &dev)?,
        &ignore,
    )?;
    Ok(())
}

/// Every parameter's gradient of two losses agrees to `tol`, relative to the larger of the
/// parameter's gradient scale and 1% of the largest one (gradients that vanish in exact
/// arithmetic, such as BERT's key bias, are rounding noise on both sides).
fn same_param_grads(vm: &candle_nn::VarMap, a: &Tensor, b: &Tensor, tol: f64) -> Result<()> {
    let (ga, gb) = (a.backward()?, b.backward()?);
    let data = vm.data().lock().unwrap();
    let mut pairs = Vec::new();
    for (name, var) in data.iter() {
        match (ga.get(var.as_tensor()), gb.get(var.as_tensor())) {
            (Some(x), Some(y)) => {
                pairs.push((name, x.to_dtype(DType::F64)?, y.to_dtype(DType::F64)?))
            }
            (None, None) => {}
            _ => panic!("{name}: gradient on one side only"),
        }
    }
    let max_abs = |t: &Tensor| -> Result<f64> { Ok(t.abs()?.max_all()?.to_scalar::<f64>()?) };
    let mut global = 0f64;
    for (_, _, y) in &pairs {
        global = global.max(max_abs(y)?);
    }
    assert!(global > 0.0, "no gradient at all");
    for (name, x, y) in &pairs {
        let diff = max_abs(&(x - y)?)?;
        let r = diff / max_abs(y)?.max(0.01 * global);
        assert!(r <= tol, "{name}: gradient rel error {r:.2e}");
    }
    Ok(())
}

#[test]
fn gpt2_loss_is_the_cross_entropy_of_its_logits() -> Result<()> {
    use flash_ops_models::{AttentionKind, Gpt2, Gpt2Config};
    let vm = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let cfg = Gpt2Config::tiny();
    let m = Gpt2::new(&cfg, vb, AttentionKind::FlashV2)?;
    let mut rng = Rng(21);
    let ids: Vec<u32> = (0..2 * 12).map(|_| (rng.next() % 256) as u32).collect();
    let tg: Vec<u32> = (0..2 * 12).map(|_| (rng.next() % 256) as u32).collect();
    let ids = Tensor::from_vec(ids, (2, 12), &Device::Cpu)?;
    let tg = Tensor::from_vec(tg, (2, 12), &Device::Cpu)?;
    // The same dropout masks for both.
    m.set_dropout_seed(5);
    let fused = m.loss(&ids, &tg, true)?;
    m.set_dropout_seed(5);
    let logits = m.forward(&ids, true)?.reshape((24, cfg.vocab_size))?;
    let unfused = candle_nn::loss::cross_entropy(&logits, &tg.flatten_all()?)?;
    let (a, b) = (fused.to_scalar::<f32>()?, unfused.to_scalar::<f32>()?);
    assert!((a - b).abs() <= 1e-6 * b.abs(), "{a} vs {b}");
    same_param_grads(&vm, &fused, &unfused, 1e-5)?;
    // Evaluation: the same value, nothing tracked.
    let eval = m.loss(&ids, &tg, false)?;
    assert!(!eval.track_op());
    let logits = m.forward(&ids, false)?.reshape((24, cfg.vocab_size))?;
    let want = candle_nn::loss::cross_entropy(&logits, &tg.flatten_all()?)?.to_scalar::<f32>()?;
    let got = eval.to_scalar::<f32>()?;
    assert!((got - want).abs() <= 1e-6 * want.abs(), "{got} vs {want}");
    Ok(())
}

#[test]
fn bert_masked_lm_loss_is_the_cross_entropy_of_its_logits() -> Result<()> {
    use flash_ops_models::{AttentionKind, BertConfig, BertForMaskedLM, BertInput};
    let vm = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let cfg = BertConfig {
        hidden_dropout_prob: 0.0,
        attention_probs_dropout_prob: 0.0,
        ..BertConfig::tiny()
    };
    let m = BertForMaskedLM::new(&cfg, vb, AttentionKind::FlashV2)?;
    // The decoder bias starts at zero: give it values so its gradient path is exercised.
    let bias = vm.data().lock().unwrap()["cls.predictions.bias"].clone();
    bias.set(
        &Rng(4)
            .tensor(&[cfg.vocab_size], 0.5)?
            .to_dtype(DType::F32)?,
    )?;
    let mut rng = Rng(22);
    let ids: Vec<u32> = (0..2 * 10).map(|_| (rng.next() % 128) as u32).collect();
    let ids = Tensor::from_vec(ids, (2, 10), &Device::Cpu)?;
    let lengths = [10, 7];
    let positions = Tensor::new(&[0u32, 3, 4, 11, 15], &Device::Cpu)?;
    let labels = Tensor::new(&[5u32, 9, 100, 2, 64], &Device::Cpu)?;
    let fused = m.masked_lm_loss(
        BertInput::new(&ids, &lengths),
        (&positions, &labels),
        None,
        true,
    )?;
    let logits = m
        .forward(&ids, &lengths, true)?
        .reshape((20, cfg.vocab_size))?;
    let unfused = candle_nn::loss::cross_entropy(&logits.index_select(&positions, 0)?, &labels)?;
    let (a, b) = (fused.to_scalar::<f32>()?, unfused.to_scalar::<f32>()?);
    assert!((a - b).abs() <= 1e-6 * b.abs(), "{a} vs {b}");
    same_param_grads(&vm, &fused, &unfused, 1e-5)?;
    Ok(())
}
