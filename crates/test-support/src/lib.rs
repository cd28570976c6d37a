//! What the flash-ops test suites share (flash-ops' integration tests, the emulated kernels of
//! flash-emu, the models' tests): one seeded random source, one definition of the relative
//! error and of the log-sum-exp comparison, the f64 oracle run with its gradients, the case
//! tables the CPU, GPU and emulator suites draw from, the rule for tests whose resource (a GPU,
//! a checkpoint) is missing, and per-process scratch folders.

mod cases;
mod compare;
mod determinism;
mod oracle;
mod pool;
mod rng;
mod scratch;
mod skip;

pub use cases::{block_mask_patterns, cu_seqlens, option_cases, random_options, HEAD_DIMS};
pub use compare::{f32_bits, lse_err, lse_err_slices, rel_err, rel_err_slices, to_f64_vec, Tol};
pub use determinism::assert_same_bits_across_threads;
pub use oracle::{oracle, oracle_varlen, run_with_grads, Run};
pub use pool::in_pool;
pub use rng::Rng;
pub use scratch::scratch_dir;
pub use skip::{skip_or_fail, REQUIRE_GPU, REQUIRE_MINILM};
