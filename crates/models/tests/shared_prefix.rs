//! Batched decoding with a shared prompt: the two decode attentions against dense f64 attention
//! over the concatenated keys, and generation with either
//! batched cache against generating each sample alone.

mod common;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use common::tiny_gpt2;
use flash_ops::{reference::naive_attention, AttnOptions};
use flash_ops_models::gpt2::decode::{flash_decoding, shared_prefix_decode};
use flash_ops_models::gpt2::sample_seed;
use flash_ops_models::{
    generate, generate_batch, AttentionKind, BatchCache, BatchConfig, KvCache, Sampling,
    SharedPrefixCache,
};
use flash_test_support::{rel_err, Rng};

fn f32(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?)
}

/// f32 against the f64 reference: the f32 tolerance of the developer guide.
fn assert_close(case: &str, got: &Tensor, want: &Tensor) -> Result<()> {
    anyhow::ensure!(
        got.dims() == want.dims(),
        "{case}: shape {:?} vs {:?}",
        got.dims(),
        want.dims()
    );
    let e = rel_err(got, want);
    println!("{case}: rel err {e:.2e}");
    anyhow::ensure!(e < 1e-5, "{case}: rel err {e:.2e}");
    Ok(())
}

#[test]
fn shared_prefix_decode_matches_dense_attention_over_the_concatenation() -> Result<()> {
    let mut rng = Rng::new(5);
    // (n, t, sp, s, hq, hk, d): single-token steps, chunks of queries, GQA, empty suffix.
    let cases = [
        (4, 1, 37, 5, 4, 4, 16),
        (3, 1, 130, 1, 6, 2, 32),
        (5, 3, 64, 7, 2, 1, 8),
        (2, 1, 200, 0, 4, 2, 64),
        (1, 2, 9, 2, 3, 3, 24),
    ];
    for (n, t, sp, s, hq, hk, d) in cases {
        let q = rng.tensor(&[n, t, hq, d]);
        let pk = rng.tensor(&[1, sp, hk, d]);
        let pv = rng.tensor(&[1, sp, hk, d]);
        let sk = rng.tensor(&[n, s, hk, d]);
        let sv = rng.tensor(&[n, s, hk, d]);
        let k = Tensor::cat(&[&pk.repeat((n, 1, 1, 1))?, &sk], 1)?;
        let v = Tensor::cat(&[&pv.repeat((n, 1, 1, 1))?, &sv], 1)?;
        let want = naive_attention(&q, &k, &v, &AttnOptions::new().causal(true))?;
        let suffix = (s > 0).then_some((f32(&sk)?, f32(&sv)?));
        let got = shared_prefix_decode(
            &f32(&q)?,
            &f32(&pk)?,
            &f32(&pv)?,
            suffix.as_ref().map(|(a, b)| (a, b)),
        )?;
        let case = format!("n{n} t{t} sp{sp} s{s} hq{hq} hk{hk} d{d}");
        assert_close(&case, &got, &want)?;
    }
    Ok(())
}

#[test]
fn flash_decoding_matches_dense_attention_for_every_split() -> Result<()> {
    let mut rng = Rng::new(6);
    for (b, len, hq, hk, d) in [(3, 301, 4, 2, 32), (1, 1000, 2, 1, 64), (5, 7, 3, 3, 16)] {
        let q = rng.tensor(&[b, 1, hq, d]);
        let k = rng.tensor(&[b, len, hk, d]);
        let v = rng.tensor(&[b, len, hk, d]);
        let want = naive_attention(&q, &k, &v, &AttnOptions::new())?;
        for chunks in [1, 2, 3, 7, len + 5] {
            let got = flash_decoding(&f32(&q)?, &f32(&k)?, &f32(&v)?, chunks)?;
            assert_close(&format!("b{b} len{len} chunks {chunks}"), &got, &want)?;
        }
    }
    Ok(())
}

#[test]
fn batched_caches_give_each_samples_own_logits() -> Result<()> {
    let (_vm, m) = tiny_gpt2(AttentionKind::FlashV2, 31)?;
    let vocab = m.config().vocab_size;
    let mut rng = Rng::new(32);
    let (n, sp, steps) = (4, 19, 6);
    let prompt = rng.ids(1, sp, vocab)?;
    let cont = rng.ids(n, steps, vocab)?;
    let mut prefill = KvCache::default();
    m.forward_with_cache(&prompt, &mut prefill)?;
    let mut shared = SharedPrefixCache::from_prefix(prefill.clone())?;
    // Room for all but the last steps: in-place appends, then the fallback to concatenation.
    let mut dup = prefill.repeat(n, steps - 2)?.with_flash_decoding(true);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..steps {
        let ids = cont.narrow(1, i, 1)?;
        a.push(m.forward_with_shared_cache(&ids, &mut shared)?);
        b.push(m.forward_with_cache(&ids, &mut dup)?);
    }
    assert_eq!(
        (shared.len(), shared.suffix_len(), dup.len()),
        (sp + steps, steps, sp + steps)
    );
    // Each sample alone: full forward over its own prompt + continuation.
    let full = m.forward(&Tensor::cat(&[&prompt.repeat((n, 1))?, &cont], 1)?, false)?;
    let want = full.narrow(1, sp, steps)?;
    for (name, got) in [("shared", a), ("duplicated", b)] {
        assert_close(
            &format!("{name} cache vs full forward"),
            &Tensor::cat(&got, 1)?,
            &want,
        )?;
    }
    // Dropping samples keeps the others' caches (the duplicated one inside its reserved room).
    let mut dup = prefill.repeat(n, steps + 2)?.with_flash_decoding(true);
    for i in 0..steps {
        m.forward_with_cache(&cont.narrow(1, i, 1)?, &mut dup)?;
    }
    shared.retain(&[2, 0])?;
    dup.retain(&[2, 0])?;
    assert_eq!(shared.batch(), Some(2));
    let ids = Tensor::new(&[[1u32], [2]], &Device::Cpu)?;
    let next = m.forward_with_shared_cache(&ids, &mut shared)?;
    assert_eq!(next.dims(), &[2, 1, vocab]);
    assert_close(
        "after retain",
        &m.forward_with_cache(&ids, &mut dup)?,
        &next,
    )?;
    let last = m.prefill(&prompt, &mut KvCache::default())?;
    assert_close(
        "prefill",
        &last,
        &full.narrow(1, sp - 1, 1)?.narrow(0, 0, 1)?,
    )?;
    assert!(m
        .forward_with_shared_cache(&Tensor::new(&[[1u32]], &Device::Cpu)?, &mut shared)
        .is_err());
    Ok(())
}

#[test]
fn batched_generation_gives_the_tokens_of_each_sample_alone() -> Result<()> {
    let (_vm, m) = tiny_gpt2(AttentionKind::FlashV2, 31)?;
    let prompt = [7u32, 3, 99, 12, 5, 41, 200, 8, 8, 1];
    let (n, new) = (5, 14);
    let sampling = Sampling::TopK {
        k: 12,
        temperature: 1.0,
    };
    let alone: Vec<Vec<u32>> = (0..n)
        .map(|i| generate(&m, &prompt, new, sampling, sample_seed(9, i)))
        .collect::<candle_core::Result<_>>()?;
    assert!(
        alone.windows(2).any(|w| w[0] != w[1]),
        "samples must differ"
    );
    // A stop token that some sample draws mid-way, so samples finish at different steps.
    let stop = alone[1][prompt.len() + 4];
    let cut = |s: &Vec<u32>| -> Vec<u32> {
        match s[prompt.len()..].iter().position(|&t| t == stop) {
            Some(p) => s[..prompt.len() + p + 1].to_vec(),
            None => s.clone(),
        }
    };
    for cache in [BatchCache::SharedPrefix, BatchCache::Duplicated] {
        let mut cfg = BatchConfig {
            num_samples: n,
            max_new_tokens: new,
            sampling,
            seed: 9,
            stop: None,
            cache,
        };
        let g = generate_batch(&m, &prompt, &cfg)?;
        assert_eq!(g.sequences, alone, "{cache:?}");
        assert_eq!(g.new_tokens(prompt.len()), n * new);
        cfg.stop = Some(stop);
        let g = generate_batch(&m, &prompt, &cfg)?;
        let want: Vec<Vec<u32>> = alone.iter().map(cut).collect();
        assert!(want.iter().any(|s| s.len() < prompt.len() + new));
        assert_eq!(g.sequences, want, "{cache:?} with stop {stop}");
    }
    // The context limit caps every sample as it caps one.
    let cfg = BatchConfig {
        num_samples: 2,
        max_new_tokens: 10_000,
        sampling: Sampling::Greedy,
        seed: 0,
        stop: None,
        cache: BatchCache::SharedPrefix,
    };
    let g = generate_batch(&m, &prompt, &cfg)?;
    assert!(g
        .sequences
        .iter()
        .all(|s| s.len() == m.config().n_positions));
    let bad = BatchConfig {
        num_samples: 0,
        ..cfg
    };
    assert!(generate_batch(&m, &prompt, &bad).is_err());
    Ok(())
}
