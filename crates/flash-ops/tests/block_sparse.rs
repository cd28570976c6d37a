//! Block-sparse attention (`AttnOptions::block_mask`): the f64 reference's mask against the
//! options it can express, then the CPU kernels of both schedules against the reference on
//! random masks and every option, and bit determinism.

use candle_core::Tensor;
use flash_ops::reference::{naive_attention_varlen, naive_attention_with_lse};
use flash_ops::{AttnOptions, BlockMask, Varlen};
use flash_test_support::*;

/// The reference's output and lse for two option sets must agree (f64, to rounding).
fn same_reference(
    rng: &mut Rng,
    dims: (usize, usize, usize, usize, usize, usize),
    a: &AttnOptions,
    b: &AttnOptions,
) {
    let [q, k, v, _] = rng.attn_inputs(dims);
    let (oa, la) = naive_attention_with_lse(&q, &k, &v, a).unwrap();
    let (ob, lb) = naive_attention_with_lse(&q, &k, &v, b).unwrap();
    assert!(rel_err(&oa, &ob) < 1e-12, "out {:e}", rel_err(&oa, &ob));
    assert!(lse_err(&la, &lb) < 1e-12, "lse {:e}", lse_err(&la, &lb));
}

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
    let (o, l) =
        naive_attention_with_lse(&q, &k, &v, &AttnOptions::new().block_mask(per_head)).unwrap();
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
    let (cq, ck) = (cu_seqlens(&lens_q), cu_seqlens(&lens_k));
    let batch = Varlen::new(&cq, &ck, 30, 25);
    let (hq, d) = (2, 8);
    let q = rng.tensor(&[39, hq, d]);
    let k = rng.tensor(&[39, hq, d]);
    let v = rng.tensor(&[39, hq, d]);
    // Key j < 7 + i (sequence-local) for both: what a window (unbounded left) on each
    // sequence's own diagonal would not say, so compare sequence by sequence with dense calls.
    let m = BlockMask::from_predicate(30, 25, (16, 16), 1, 1, |_, _, i, j| j < 7 + i).unwrap();
    let (o, _) =
        naive_attention_varlen(&q, &k, &v, &batch, &AttnOptions::new().block_mask(m)).unwrap();
    let (mut q0, mut k0) = (0, 0);
    for (&lq, &lk) in lens_q.iter().zip(&lens_k) {
        let m = BlockMask::from_predicate(lq, lk, (16, 16), 1, 1, |_, _, i, j| j < 7 + i).unwrap();
        let part = |t: &Tensor, s, n| t.narrow(0, s, n).unwrap().unsqueeze(0).unwrap();
        let (want, _) = naive_attention_with_lse(
            &part(&q, q0, lq),
            &part(&k, k0, lk),
            &part(&v, k0, lk),
            &AttnOptions::new().block_mask(m),
        )
        .unwrap();
        let got = o.narrow(0, q0, lq).unwrap().unsqueeze(0).unwrap();
        assert!(rel_err(&got, &want) < 1e-12);
        (q0, k0) = (q0 + lq, k0 + lk);
    }
}
