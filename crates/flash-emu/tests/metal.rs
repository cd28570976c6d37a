//! The Metal kernels (kernels/metal/*.metal), run by the SIMT emulator through the MSL shim
//! against the f64 reference: the same cases as the CUDA kernels' emulated tests
//! (`shared/mod.rs`), with tolerances of their own.

use candle_core::DType;
use flash_emu::metal as emu;
use flash_ops::{AttnOptions, BlockMask};
use flash_test_support::{Rng, Tol};

mod shared;

pub const TOL: Tol = Tol {
    f32: 2e-5,
    f16: 4e-3,
    bf16: 3e-2,
};

/// A block size the kernels cannot tile is refused before any dispatch, naming the multiple
/// (32 rows and 32 keys at every head dim).
#[test]
fn block_mask_bad_block_size() {
    let mut rng = Rng::new(2);
    let [q, k, v] = [0; 3].map(|_| rng.tensor(&[1, 100, 1, 64]).to_dtype(DType::F16).unwrap());
    let mask = BlockMask::causal(100, 100, (16, 32)).unwrap();
    let p = emu::AttnParams::dense(&q, &k, &v, &AttnOptions::new().block_mask(mask)).unwrap();
    let e = emu::Inputs::new(&p, &q, &k, &v)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("`block_mask`") && e.contains("(32, 32)"), "{e}");
}
