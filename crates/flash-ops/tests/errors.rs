//! Every bad input is a `candle::Error` that names the argument and the expectation.

use candle_core::{DType, Device, Tensor};
use flash_ops::{
    flash_attn, flash_attn_varlen, shared_prefix_attention, AttnOptions, BlockMask, PrefixLevel,
    Varlen,
};
use flash_test_support::Rng;

fn t(rng: &mut Rng, dims: &[usize]) -> Tensor {
    rng.tensor(dims).to_dtype(DType::F32).unwrap()
}

/// A valid dense GQA problem, `(2, 10, 4, 16)` queries over `(2, 12, 2, 16)` keys and values,
/// that the tests then break one argument of; the generator makes the bad arguments.
fn valid_problem(seed: u64) -> (Rng, [Tensor; 3]) {
    let mut r = Rng::new(seed);
    let qkv = [&[2, 10, 4, 16], &[2, 12, 2, 16], &[2, 12, 2, 16]].map(|d| t(&mut r, d));
    (r, qkv)
}

fn expect_err(r: candle_core::Result<Tensor>, needles: &[&str]) {
    let msg = match r {
        Ok(_) => panic!("expected an error mentioning {needles:?}"),
        Err(e) => e.to_string(),
    };
    for n in needles {
        assert!(msg.contains(n), "error `{msg}` should mention `{n}`");
    }
}

#[test]
fn shape_rank_dtype_and_head_errors() {
    let (mut r, [q, k, v]) = valid_problem(1);
    let o = AttnOptions::new();
    expect_err(
        flash_attn(&t(&mut r, &[10, 4, 16]), &k, &v, &o),
        &["`q`", "rank 4"],
    );
    expect_err(
        flash_attn(&q, &k, &t(&mut r, &[2, 13, 2, 16]), &o),
        &["`k` and `v`", "same shape"],
    );
    // k and v of one (bad) shape each.
    let bad_kv: [(&[usize], &[&str]); 3] = [
        (&[3, 12, 2, 16], &["`k` batch 3", "`q` batch 2"]),
        (&[2, 12, 2, 8], &["`k` head_dim 8", "16"]),
        (&[2, 12, 3, 16], &["heads", "multiple", "GQA"]),
    ];
    for (dims, needles) in bad_kv {
        let kv = t(&mut r, dims);
        expect_err(flash_attn(&q, &kv, &kv, &o), needles);
    }
    let big = t(&mut r, &[1, 4, 1, 300]);
    expect_err(
        flash_attn(&big, &big, &big, &o),
        &["head_dim", "1..=256", "300"],
    );
    expect_err(
        flash_attn(&q, &k.to_dtype(DType::F16).unwrap(), &v, &o),
        &["`k` dtype", "F16", "F32"],
    );
    let q64 = q.to_dtype(DType::F64).unwrap();
    let k64 = k.to_dtype(DType::F64).unwrap();
    let v64 = v.to_dtype(DType::F64).unwrap();
    expect_err(
        flash_attn(&q64, &k64, &v64, &o),
        &["`q` dtype", "f32, f16 or bf16"],
    );
}

#[test]
fn option_errors() {
    let (_, [q, k, v]) = valid_problem(2);
    expect_err(
        flash_attn(&q, &k, &v, &AttnOptions::new().dropout(1.0, 0)),
        &["dropout `p`", "[0, 1)"],
    );
    expect_err(
        flash_attn(&q, &k, &v, &AttnOptions::new().dropout(-0.1, 0)),
        &["dropout `p`"],
    );
    expect_err(
        flash_attn(&q, &k, &v, &AttnOptions::new().softcap(-1.0)),
        &["`softcap`", ">= 0"],
    );
    expect_err(
        flash_attn(&q, &k, &v, &AttnOptions::new().softmax_scale(f32::NAN)),
        &["`softmax_scale`", "finite"],
    );
    let slopes = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
    expect_err(
        flash_attn(&q, &k, &v, &AttnOptions::new().alibi_slopes(slopes)),
        &["`alibi_slopes`", "(4) or (2, 4)", "[3]"],
    );
    let slopes = Tensor::ones(4, DType::F64, &Device::Cpu).unwrap();
    expect_err(
        flash_attn(&q, &k, &v, &AttnOptions::new().alibi_slopes(slopes)),
        &["`alibi_slopes`", "f32"],
    );
    expect_err(
        flash_attn(&q, &k, &v, &AttnOptions::new().key_lengths(vec![3])),
        &["`key_lengths`", "one entry per batch"],
    );
    expect_err(
        flash_attn(&q, &k, &v, &AttnOptions::new().key_lengths(vec![3, 13])),
        &["`key_lengths`", "<= seqlen_k 12", "13"],
    );
}

#[test]
fn cu_seqlens_errors() {
    let mut r = Rng::new(3);
    let q = t(&mut r, &[10, 2, 16]);
    let k = t(&mut r, &[12, 2, 16]);
    let v = t(&mut r, &[12, 2, 16]);
    let o = AttnOptions::new();
    let cu = |x: &[u32]| Tensor::new(x, &Device::Cpu).unwrap();
    let good_q = cu(&[0, 4, 10]);
    let good_k = cu(&[0, 5, 12]);
    assert!(flash_attn_varlen(&q, &k, &v, &Varlen::new(&good_q, &good_k, 6, 7), &o).is_ok());
    expect_err(
        flash_attn_varlen(
            &q,
            &k,
            &v,
            &Varlen::new(&cu(&[1, 4, 10]), &good_k, 10, 10),
            &o,
        ),
        &["`cu_seqlens_q`", "start at 0"],
    );
    expect_err(
        flash_attn_varlen(
            &q,
            &k,
            &v,
            &Varlen::new(&cu(&[0, 6, 4, 10]), &good_k, 10, 10),
            &o,
        ),
        &["`cu_seqlens_q`", "non-decreasing"],
    );
    expect_err(
        flash_attn_varlen(
            &q,
            &k,
            &v,
            &Varlen::new(&good_q, &cu(&[0, 5, 11]), 10, 10),
            &o,
        ),
        &["`cu_seqlens_k`", "end at the token count 12"],
    );
    expect_err(
        flash_attn_varlen(&q, &k, &v, &Varlen::new(&good_q, &cu(&[0, 12]), 10, 12), &o),
        &["same length"],
    );
    expect_err(
        flash_attn_varlen(&q, &k, &v, &Varlen::new(&good_q, &good_k, 5, 7), &o),
        &["`cu_seqlens_q`", "max_seqlen 5"],
    );
    let f = Tensor::new(&[0f32, 4., 10.], &Device::Cpu).unwrap();
    expect_err(
        flash_attn_varlen(&q, &k, &v, &Varlen::new(&f, &good_k, 10, 10), &o),
        &["`cu_seqlens_q`", "u32"],
    );
    expect_err(
        flash_attn_varlen(&q, &k, &v, &Varlen::new(&cu(&[0]), &good_k, 10, 10), &o),
        &["`cu_seqlens_q`", "batch+1"],
    );
    expect_err(
        flash_attn_varlen(
            &t(&mut r, &[1, 10, 2, 16]),
            &k,
            &v,
            &Varlen::new(&good_q, &good_k, 10, 10),
            &o,
        ),
        &["`q`", "rank 3"],
    );
}

#[test]
fn block_mask_errors() {
    let (mut r, [q, k, v]) = valid_problem(4);
    let with = |m: BlockMask| AttnOptions::new().block_mask(m);
    let causal = |sq, sk| BlockMask::causal(sq, sk, (16, 16)).unwrap();
    expect_err(
        flash_attn(&q, &k, &v, &with(causal(10, 13))),
        &["`block_mask`", "(10, 13)", "(10, 12)"],
    );
    let per_batch = BlockMask::from_predicate(10, 12, (16, 16), 3, 1, |_, _, _, _| true).unwrap();
    expect_err(
        flash_attn(&q, &k, &v, &with(per_batch)),
        &["`block_mask` batch", "1 (broadcast)", "2", "got 3"],
    );
    let per_head = BlockMask::random(10, 12, (16, 16), 2, 1.0, 0).unwrap();
    expect_err(
        flash_attn(&q, &k, &v, &with(per_head)),
        &["`block_mask` heads", "query heads 4", "got 2"],
    );
    // Varlen: the mask is sized by the max_seqlens, not the token counts.
    let (qv, kv) = (t(&mut r, &[10, 2, 16]), t(&mut r, &[12, 2, 16]));
    let cu = |x: &[u32]| Tensor::new(x, &Device::Cpu).unwrap();
    let batch = Varlen::new(&cu(&[0, 4, 10]), &cu(&[0, 5, 12]), 6, 7);
    expect_err(
        flash_attn_varlen(&qv, &kv, &kv, &batch, &with(causal(10, 12))),
        &["`block_mask`", "(10, 12)", "(6, 7)", "max_seqlen"],
    );
    // Shared-prefix attention splits the keys: a mask is refused.
    let prefix = PrefixLevel::shared(&k.narrow(0, 0, 1).unwrap(), &v.narrow(0, 0, 1).unwrap(), 2);
    expect_err(
        shared_prefix_attention(&q, &[prefix], &k, &v, &with(causal(10, 12))),
        &["shared_prefix_attention", "`block_mask`", "not supported"],
    );
}
