//! The case tables the CPU, GPU and emulated-kernel suites share.

use candle_core::{Device, Tensor};
use flash_ops::{Algorithm, AttnOptions, Dropout};

use crate::Rng;

/// The head dimensions the GPU kernels are instantiated for, plus one (80) that runs
/// zero-padded on the next instantiation up.
pub const HEAD_DIMS: [usize; 6] = [32, 64, 80, 96, 128, 256];

/// One case per option of [`AttnOptions`] (and the V1 schedule with the options it handles on
/// its own paths), sized for a dense problem with `batch` sequences of `sk` keys and `hq`
/// query heads.
pub fn option_cases(batch: usize, sk: usize, hq: usize) -> Vec<(&'static str, AttnOptions)> {
    let slopes: Vec<f32> = (0..hq).map(|h| 0.5f32.powi(h as i32 + 1)).collect();
    let slopes = Tensor::from_vec(slopes, hq, &Device::Cpu).expect("hq slopes");
    let key_lengths = (0..batch)
        .map(|i| [sk, 5 + sk / 20, sk / 2][i % 3])
        .collect();
    vec![
        ("causal", AttnOptions::new().causal(true)),
        (
            "window",
            AttnOptions::new().window(Some(sk / 5), Some(sk / 18)),
        ),
        (
            "alibi + causal",
            AttnOptions::new().alibi_slopes(slopes).causal(true),
        ),
        (
            "softcap 5, scale 0.4",
            AttnOptions::new().softcap(5.0).softmax_scale(0.4),
        ),
        ("dropout 0.2", AttnOptions::new().dropout(0.2, 1234)),
        ("key_lengths", AttnOptions::new().key_lengths(key_lengths)),
        (
            "v1 causal dropout",
            AttnOptions::new()
                .algorithm(Algorithm::V1)
                .causal(true)
                .dropout(0.1, 7),
        ),
        (
            "v1 window softcap",
            AttnOptions::new()
                .algorithm(Algorithm::V1)
                .window(Some(9), None)
                .softcap(3.0),
        ),
    ]
}

/// `cu_seqlens` (u32, `lens.len() + 1` entries from 0) of sequences of the given lengths.
pub fn cu_seqlens(lens: &[usize]) -> Tensor {
    let mut cu = vec![0u32];
    for &l in lens {
        cu.push(cu[cu.len() - 1] + l as u32);
    }
    Tensor::new(cu, &Device::Cpu).expect("a u32 vector")
}

/// Random options for a dense problem of `b` sequences, `sk` keys and `hq` query heads: causal
/// or not, windows, softcap, ALiBi, key lengths, dropout and scale, each on or off at random.
pub fn random_options(rng: &mut Rng, b: usize, sk: usize, hq: usize) -> AttnOptions {
    let mut opts = AttnOptions::new();
    opts.causal = rng.below(2) == 0;
    if rng.below(3) == 0 {
        opts.window_left = Some(rng.below(sk + 4));
    }
    if !opts.causal && rng.below(3) == 0 {
        opts.window_right = Some(rng.below(sk + 4));
    }
    if rng.below(4) == 0 {
        opts.softcap = Some(2.0 + 20.0 * rng.uniform() as f32);
    }
    if rng.below(4) == 0 {
        let slopes: Vec<f32> = (0..hq).map(|_| 0.02 + 0.5 * rng.uniform() as f32).collect();
        opts.alibi_slopes = Some(Tensor::from_vec(slopes, hq, &Device::Cpu).unwrap());
    }
    if rng.below(3) == 0 {
        opts.key_lengths = Some((0..b).map(|_| rng.below(sk + 1)).collect());
    }
    if rng.below(4) == 0 {
        opts.dropout = Some(Dropout {
            p: 0.1 + 0.4 * rng.uniform() as f32,
            seed: rng.next_u64(),
        });
    }
    if rng.below(3) == 0 {
        opts.softmax_scale = Some(0.05 + 0.5 * rng.uniform() as f32);
    }
    opts
}
