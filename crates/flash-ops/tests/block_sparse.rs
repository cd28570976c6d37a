//! Block-sparse attention (`AttnOptions::block_mask`): the f64 reference's mask against the
//! options it can express; the CPU kernels of both schedules against the reference on random
//! masks (empty rows, all-full, all-partial, each named pattern, layouts, broadcast, per-batch
//! and per-head masks, block sizes below, at and above the kernels' tile) combined with random
//! options, GQA, varlen and a loss through the log-sum-exp; empty rows exactly zero; bit
//! determinism across thread counts.

use candle_core::{DType, Device, Result, Tensor};
use flash_ops::reference::{naive_attention_varlen, naive_attention_with_lse};
use flash_ops::{
    flash_attn_varlen_with_lse, flash_attn_with_lse, Algorithm, AttnOptions, BlockMask, Varlen,
};
use flash_test_support::*;

const F32_TOL: f64 = 1e-5;
const HALF_TOL: f64 = 2e-2;

/// The reference's output and lse for two option sets must agree (f64, to rounding).
fn same_reference(rng: &mut Rng, dims: Dims, a: &AttnOptions, b: &AttnOptions) {
    let [q, k, v, _] = rng.attn_inputs(dims);
    let (oa, la) = naive_attention_with_lse(&q, &k, &v, a).unwrap();
    let (ob, lb) = naive_attention_with_lse(&q, &k, &v, b).unwrap();
    assert!(rel_err(&oa, &ob) < 1e-12, "out {:e}", rel_err(&oa, &ob));
    assert!(lse_err(&la, &lb) < 1e-12, "lse {:e}", lse_err(&la, &lb));
}

/// `(b, sq, sk, hq, hk, d)`.
type Dims = (usize, usize, usize, usize, usize, usize);

/// Masks that say what an option says give the option's attention: causal, a window, key
/// lengths (a per-sequence mask), and a per-head mask (each head against its own run).
#[test]
fn reference_mask_equals_the_options_it_expresses() {
    let mut rng = Rng::new(0xB10C);
    let (b, sq, sk, hq, hk, d) = (2, 37, 53, 4, 2, 16);
    let dims = (b, sq, sk, hq, hk, d);
    let blk = (16, 32);
    let causal = BlockMask::causal(sq, sk, blk).unwrap();
    same_reference(
        &mut rng,
        dims,
        &AttnOptions::new().block_mask(causal),
        &AttnOptions::new().causal(true),
    );
    let window = BlockMask::sliding_window(sq, sk, blk, 9, 4).unwrap();
    same_reference(
        &mut rng,
        dims,
        &AttnOptions::new().block_mask(window),
        &AttnOptions::new().window(Some(9), Some(4)),
    );
    let lens = [20, 0];
    let keys = BlockMask::from_predicate(sq, sk, blk, b, 1, |b, _, _, j| j < lens[b]).unwrap();
    same_reference(
        &mut rng,
        dims,
        &AttnOptions::new().block_mask(keys),
        &AttnOptions::new().key_lengths(lens.to_vec()),
    );
    // Per head: even heads causal, odd heads see everything.
    let per_head = BlockMask::from_predicate(sq, sk, blk, 1, hq, |_, h, i, j| {
        h % 2 == 1 || j + sq <= i + sk
    })
    .unwrap();
    let [q, k, v, _] = rng.attn_inputs(dims);
    let opts = AttnOptions::new().block_mask(per_head);
    let (o, l) = naive_attention_with_lse(&q, &k, &v, &opts).unwrap();
    let (oc, lc) = naive_attention_with_lse(&q, &k, &v, &AttnOptions::new().causal(true)).unwrap();
    let (of, lf) = naive_attention_with_lse(&q, &k, &v, &AttnOptions::new()).unwrap();
    for h in 0..hq {
        let (ow, lw) = if h % 2 == 0 { (&oc, &lc) } else { (&of, &lf) };
        let head = |t: &Tensor, dim| t.narrow(dim, h, 1).unwrap();
        assert!(rel_err(&head(&o, 2), &head(ow, 2)) < 1e-12, "head {h}");
        assert!(lse_err(&head(&l, 1), &head(lw, 1)) < 1e-12, "head {h}");
    }
}

/// Varlen: each sequence reads the top-left part of a `max_seqlen`-sized mask.
#[test]
fn reference_varlen_mask_is_sequence_local() {
    let mut rng = Rng::new(0xB10D);
    let (lens_q, lens_k) = ([9usize, 30], [25usize, 14]);
    let batch = Varlen::new(&cu_seqlens(&lens_q), &cu_seqlens(&lens_k), 30, 25);
    let (q, k, v) = (
        rng.tensor(&[39, 2, 8]),
        rng.tensor(&[39, 2, 8]),
        rng.tensor(&[39, 2, 8]),
    );
    let pred = |_, _, i, j| j < 7 + i;
    let m = BlockMask::from_predicate(30, 25, (16, 16), 1, 1, pred).unwrap();
    let opts = AttnOptions::new().block_mask(m);
    let (o, _) = naive_attention_varlen(&q, &k, &v, &batch, &opts).unwrap();
    let (mut q0, mut k0) = (0, 0);
    for (&lq, &lk) in lens_q.iter().zip(&lens_k) {
        let m = BlockMask::from_predicate(lq, lk, (16, 16), 1, 1, pred).unwrap();
        let part = |t: &Tensor, s, n| t.narrow(0, s, n).unwrap().unsqueeze(0).unwrap();
        let (want, _) = naive_attention_with_lse(
            &part(&q, q0, lq),
            &part(&k, k0, lk),
            &part(&v, k0, lk),
            &AttnOptions::new().block_mask(m),
        )
        .unwrap();
        assert!(rel_err(&part(&o, q0, lq).squeeze(0).unwrap(), &want) < 1e-12);
        (q0, k0) = (q0 + lq, k0 + lk);
    }
}

/// A 64-bit mix (SplitMix64's finaliser): the masks' bits as a pure function of their inputs.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn hash(seed: u64, xs: [usize; 4]) -> u64 {
    xs.iter().fold(mix(seed), |h, &x| mix(h ^ x as u64))
}

/// Block classes by chance: a block is empty, full or partial (each element a coin flip) with
/// weights `(empty, full, partial)`; with `empty_rows`, a third of the query blocks list nothing.
fn random_blocks(
    (sq, sk, block): (usize, usize, (usize, usize)),
    (batch, heads): (usize, usize),
    (empty, full, partial): (u64, u64, u64),
    (empty_rows, seed): (bool, u64),
) -> BlockMask {
    let (bq, bk) = block;
    BlockMask::from_predicate(sq, sk, block, batch, heads, move |b, h, i, j| {
        if empty_rows && hash(seed, [b, h, i / bq, usize::MAX]).is_multiple_of(3) {
            return false;
        }
        let class = hash(seed, [b, h, i / bq, j / bk]) % (empty + full + partial);
        if class < empty {
            false
        } else if class < empty + full {
            true
        } else {
            hash(seed ^ 1, [b, h, i, j]).is_multiple_of(2)
        }
    })
    .unwrap()
}

/// A random mask for `b` sequences, `hq` query heads, `sq × sk`: its description and itself.
fn random_mask(rng: &mut Rng, b: usize, hq: usize, sq: usize, sk: usize) -> (String, BlockMask) {
    const SIDES: [usize; 7] = [16, 32, 48, 64, 128, 144, 256];
    let block = (SIDES[rng.below(7)], SIDES[rng.below(7)]);
    let slots = ([1, b][rng.below(2)], [1, hq][rng.below(2)]);
    let seed = rng.next_u64();
    let lens = (sq, sk, block);
    let kind = rng.below(11);
    let m = match kind {
        0 | 1 => random_blocks(lens, slots, (1, 1, 2), (false, seed)),
        2 => random_blocks(lens, slots, (1, 1, 1), (true, seed)),
        3 => random_blocks(lens, slots, (0, 1, 0), (false, seed)),
        4 => random_blocks(lens, slots, (0, 0, 1), (false, seed)),
        5 => BlockMask::causal(sq, sk, block).unwrap(),
        6 => BlockMask::sliding_window(sq, sk, block, rng.below(sk + 1), rng.below(40)).unwrap(),
        7 => BlockMask::local_global(sq, sk, block, rng.below(60), rng.below(40)).unwrap(),
        8 => BlockMask::strided(sq, sk, block, 1 + rng.below(30), 1 + rng.below(50)).unwrap(),
        9 => BlockMask::butterfly(sq, sk, block).unwrap(),
        _ => {
            let heads = slots.1;
            BlockMask::random(sq, sk, block, heads, rng.uniform().max(0.05), seed).unwrap()
        }
    };
    let names = [
        "random blocks",
        "random blocks",
        "empty rows",
        "all full",
        "all partial",
        "causal",
        "sliding window",
        "local + global",
        "strided",
        "butterfly",
        "random (seeded)",
    ];
    let (full, partial) = m.counts();
    let what = format!(
        "{} block {block:?} batch {} heads {} ({full} full, {partial} partial)",
        names[kind],
        m.batch(),
        m.heads()
    );
    (what, m)
}

/// An attention function as the tests call it: `(q, k, v) -> (out, lse)`.
type Attn<'a> = &'a dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<(Tensor, Tensor)>;

/// [`run_with_grads`] of `f` in `dtype`, with `lse_loss` through [`with_lse_loss`].
fn run(inputs: &[Tensor; 4], dtype: DType, (lse_loss, dense): (bool, bool), f: Attn) -> Run {
    let [q, k, v, d_out] = inputs;
    run_with_grads(q, k, v, d_out, dtype, |q, k, v| {
        let (o, l) = f(q, k, v)?;
        if lse_loss {
            with_lse_loss(o, l, dense)
        } else {
            Ok((o, l))
        }
    })
    .unwrap()
}

/// Relative errors (out, dq, dk, dv, lse) of `got` against `want`, asserted within the dtype's
/// tolerance.
fn check_run(got: &Run, want: &Run, dtype: DType, what: &str) -> [f64; 5] {
    let e = got.errors(want);
    let errs = [e[0], e[1], e[2], e[3], lse_err(&got.lse, &want.lse)];
    let tol = if dtype == DType::F32 {
        F32_TOL
    } else {
        HALF_TOL
    };
    for (name, x) in ["out", "dq", "dk", "dv", "lse"].iter().zip(&errs) {
        assert!(
            *x <= tol && x.is_finite(),
            "{dtype:?} {name} relative error {x:e} > {tol:e}: {what}"
        );
    }
    errs
}

/// With `lse_loss` the upstream loss also reaches the log-sum-exp: `out + lse` (broadcast over
/// head_dim, `-inf` rows zeroed) is what the gradient sees, for ours and the oracle alike.
fn with_lse_loss(out: Tensor, lse: Tensor, dense: bool) -> Result<(Tensor, Tensor)> {
    let l = if dense {
        lse.transpose(1, 2)?.unsqueeze(3)? // (b, sq, hq, 1)
    } else {
        lse.t()?.unsqueeze(2)? // (total_q, hq, 1)
    };
    let finite = l.ne(f64::NEG_INFINITY)?;
    let l = finite.where_cond(&l, &l.zeros_like()?)?;
    let out = out.broadcast_add(&l.to_dtype(out.dtype())?)?;
    Ok((out, lse))
}

/// Checks both schedules against the oracle for one problem; returns the worst errors
/// (out, dq, dk, dv, lse).
fn check_dense(
    rng: &mut Rng,
    dims: Dims,
    opts: &AttnOptions,
    lse_loss: bool,
    dtype: DType,
    what: &str,
) -> [f64; 5] {
    let inputs = rng.attn_inputs(dims);
    let how = (lse_loss, true);
    let want = run(&inputs, DType::F64, how, &|q, k, v| {
        naive_attention_with_lse(q, k, v, opts)
    });
    let mut worst = [0f64; 5];
    for alg in [Algorithm::V1, Algorithm::V2] {
        let o = opts.clone().algorithm(alg);
        let got = run(&inputs, dtype, how, &|q, k, v| {
            flash_attn_with_lse(q, k, v, &o)
        });
        let errs = check_run(
            &got,
            &want,
            dtype,
            &format!("{alg:?} {what} dims {dims:?} {opts:?}"),
        );
        for (w, x) in worst.iter_mut().zip(errs) {
            *w = w.max(x);
        }
    }
    worst
}

/// Random shapes (GQA, ragged, several tiles and blocks), random masks and random options.
fn sweep(seed: u64, cases: usize, dtype: DType) {
    let mut rng = Rng::new(seed);
    let mut worst = [0f64; 5];
    for case in 0..cases {
        let d = [8, 16, 32, 64][rng.below(4)];
        let (b, hk, group) = (1 + rng.below(2), 1 + rng.below(2), 1 + rng.below(2));
        let hq = hk * group;
        let sq = 1 + rng.below(300);
        let sk = if rng.below(3) == 0 {
            sq
        } else {
            1 + rng.below(300)
        };
        let (what, mask) = random_mask(&mut rng, b, hq, sq, sk);
        let opts = random_options(&mut rng, b, sk, hq).block_mask(mask);
        let lse_loss = case % 4 == 3;
        let w = check_dense(
            &mut rng,
            (b, sq, sk, hq, hk, d),
            &opts,
            lse_loss,
            dtype,
            &what,
        );
        for (a, x) in worst.iter_mut().zip(w) {
            *a = a.max(x);
        }
    }
    println!(
        "{dtype:?}: {cases} cases × 2 schedules, worst relative error out {:.2e} dq {:.2e} dk {:.2e} dv {:.2e} lse {:.2e}",
        worst[0], worst[1], worst[2], worst[3], worst[4]
    );
}

#[test]
fn f32_random_masks_match_reference() {
    sweep(0xB5_F32, 40, DType::F32);
}

#[test]
fn f16_random_masks_match_reference() {
    sweep(0xB5_F16, 8, DType::F16);
}

#[test]
fn bf16_random_masks_match_reference() {
    sweep(0xB5_BF16, 8, DType::BF16);
}

/// Every named pattern and block class at once on a multi-tile problem, with the options that
/// take the kernels' other paths.
#[test]
fn named_patterns_and_classes_match_reference() {
    let mut rng = Rng::new(0xB5_AA);
    let (b, sq, sk, hq, hk, d) = (2, 300, 280, 4, 2, 32);
    let block = (64, 128);
    let lens = (sq, sk, block);
    let masks = [
        ("causal", BlockMask::causal(sq, sk, block).unwrap()),
        (
            "window",
            BlockMask::sliding_window(sq, sk, block, 70, 10).unwrap(),
        ),
        (
            "local_global",
            BlockMask::local_global(sq, sk, block, 40, 20).unwrap(),
        ),
        (
            "strided",
            BlockMask::strided(sq, sk, block, 30, 50).unwrap(),
        ),
        ("butterfly", BlockMask::butterfly(sq, sk, block).unwrap()),
        (
            "random",
            BlockMask::random(sq, sk, block, hq, 0.5, 3).unwrap(),
        ),
        (
            "all full",
            random_blocks(lens, (1, 1), (0, 1, 0), (false, 1)),
        ),
        (
            "all partial",
            random_blocks(lens, (b, hq), (0, 0, 1), (false, 2)),
        ),
        (
            "empty rows",
            random_blocks(lens, (b, 1), (1, 1, 1), (true, 3)),
        ),
    ];
    let slopes = Tensor::new(&[0.3f32, 0.1, 0.05, 0.02], &Device::Cpu).unwrap();
    let extra = [
        AttnOptions::new(),
        AttnOptions::new().causal(true).dropout(0.2, 5),
        AttnOptions::new()
            .softcap(6.0)
            .alibi_slopes(slopes)
            .key_lengths(vec![200, 280]),
    ];
    for (i, (name, mask)) in masks.into_iter().enumerate() {
        let opts = extra[i % 3].clone().block_mask(mask);
        check_dense(
            &mut rng,
            (b, sq, sk, hq, hk, d),
            &opts,
            i % 2 == 0,
            DType::F32,
            name,
        );
    }
}

/// Varlen with a `max_seqlen`-sized mask, per-sequence or broadcast, every option family.
#[test]
fn varlen_masks_match_reference() {
    let mut rng = Rng::new(0xB5_77);
    for trial in 0..6 {
        let nseq = 1 + rng.below(3);
        // At least one query and key per sequence (the reference reduces over them).
        let lens_q: Vec<usize> = (0..nseq).map(|_| 1 + rng.below(200)).collect();
        let lens_k: Vec<usize> = (0..nseq).map(|_| 1 + rng.below(200)).collect();
        let (mq, mk) = (
            lens_q.iter().copied().max().unwrap().max(1),
            lens_k.iter().copied().max().unwrap().max(1),
        );
        let (tq, tk): (usize, usize) = (lens_q.iter().sum(), lens_k.iter().sum());
        let (hk, group, d) = (1 + rng.below(2), 1 + rng.below(2), 16);
        let hq = hk * group;
        let (what, mask) = random_mask(&mut rng, nseq, hq, mq, mk);
        let mut opts = AttnOptions::new().causal(trial % 2 == 0).block_mask(mask);
        if trial % 3 == 1 {
            opts = opts.window(Some(40), Some(9)).softcap(4.0);
        }
        if trial % 3 == 2 {
            opts = opts.dropout(0.3, trial as u64);
        }
        let batch = Varlen::new(&cu_seqlens(&lens_q), &cu_seqlens(&lens_k), mq, mk);
        let inputs = [
            rng.tensor(&[tq, hq, d]),
            rng.tensor(&[tk, hk, d]),
            rng.tensor(&[tk, hk, d]),
            rng.tensor(&[tq, hq, d]),
        ];
        let how = (trial % 2 == 1, false);
        let want = run(&inputs, DType::F64, how, &|q, k, v| {
            naive_attention_varlen(q, k, v, &batch, &opts)
        });
        for alg in [Algorithm::V1, Algorithm::V2] {
            let o = opts.clone().algorithm(alg);
            let got = run(&inputs, DType::F32, how, &|q, k, v| {
                flash_attn_varlen_with_lse(q, k, v, &batch, &o)
            });
            let what = format!("{alg:?} varlen {what} lens {lens_q:?}/{lens_k:?}");
            check_run(&got, &want, DType::F32, &what);
        }
    }
}

/// Query blocks the mask lists nothing for: output exactly 0, lse −inf, dq 0, no NaN anywhere.
#[test]
fn empty_rows_are_zero_with_zero_gradients() {
    let mut rng = Rng::new(0xB5_00);
    let [q, k, v, d_out] = rng.attn_inputs((1, 96, 80, 2, 1, 16));
    // Query block 1 (rows 32..64) lists nothing; the others are partial.
    let mask = BlockMask::from_predicate(96, 80, (32, 16), 1, 1, |_, _, i, j| {
        !(32..64).contains(&i) && (i + j) % 3 != 0
    })
    .unwrap();
    for alg in [Algorithm::V1, Algorithm::V2] {
        let opts = AttnOptions::new().block_mask(mask.clone()).algorithm(alg);
        let got = run_with_grads(&q, &k, &v, &d_out, DType::F32, |q, k, v| {
            flash_attn_with_lse(q, k, v, &opts)
        })
        .unwrap();
        let rows = |t: &Tensor, dim, a, n| to_f64_vec(&t.narrow(dim, a, n).unwrap());
        assert!(rows(&got.out, 1, 32, 32).iter().all(|&x| x == 0.0));
        assert!(rows(&got.dq, 1, 32, 32).iter().all(|&x| x == 0.0));
        assert!(rows(&got.lse, 2, 32, 32)
            .iter()
            .all(|&x| x == f64::NEG_INFINITY));
        for t in [&got.out, &got.dq, &got.dk, &got.dv] {
            assert!(to_f64_vec(t).iter().all(|x| x.is_finite()));
        }
        assert!(rows(&got.out, 1, 0, 32).iter().any(|&x| x != 0.0));
    }
}

/// Same bits with 1 and 2 threads (and run to run), both schedules, partial blocks and dropout.
#[test]
fn block_sparse_bits_do_not_depend_on_the_thread_count() {
    let mut rng = Rng::new(0xB5_D7);
    let inputs = rng.attn_inputs((1, 300, 389, 4, 1, 32));
    let lens = (300, 389, (48, 64));
    let mask = random_blocks(lens, (1, 4), (1, 1, 2), (true, 9));
    let opts = AttnOptions::new()
        .block_mask(mask)
        .dropout(0.1, 3)
        .softcap(7.0);
    for dtype in [DType::F32, DType::BF16] {
        for alg in [Algorithm::V1, Algorithm::V2] {
            let opts = opts.clone().algorithm(alg);
            assert_same_bits_across_threads(&inputs, dtype, &format!("{alg:?}"), |q, k, v| {
                flash_attn_with_lse(q, k, v, &opts)
            });
        }
    }
}
