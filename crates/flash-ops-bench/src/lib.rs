//! # flash-ops-bench: measuring flash-ops
//!
//! What `cargo bench -p flash-ops-bench`, `repro` and `train bench` measure with, kept out of the
//! library so flash-ops itself depends on nothing it does not compute with:
//! - [`Variant`]: the attention implementations compared and their names (the one table of them);
//! - [`Workload`] and the FlashAttention-2 paper's FLOP counts ([`flops_fwd`],
//!   [`BWD_PER_FWD_FLOPS`]);
//! - [`measure`]: forward and forward+backward time ([`median`] of repeats) and peak memory
//!   ([`PeakAlloc`], a counting allocator, on the CPU; the memory pool's high-water mark on CUDA);
//! - [`gemm_ceiling`]: what a large plain matmul reaches, the roof for GFLOP/s;
//! - [`measure_decode`] and [`read_bandwidth`]: one decoding step, and its roof, the memory
//!   read bandwidth;
//! - [`cpu_model`], [`gemm_path`] and [`kernel_path`]: the machine line of every report;
//!   [`clock_ghz`] and [`fma_peak_gflops`]: the core's clock and FMA peak, measured;
//! - [`args`]: the benchmark harnesses' flags;
//! - [`block_sparse`]: block-sparse attention's time against its density, and the linear fit.

mod alloc;
pub mod args;
pub mod block_sparse;
#[cfg(feature = "cuda")]
mod cuda_pool;
mod decode;
mod machine;
mod measure;
mod variant;
mod workload;

pub use alloc::{peak_extra, peak_extra_on, reuse_freed_memory, PeakAlloc};
pub use decode::{measure_decode, DecodeWorkload};
pub use machine::{
    clock_ghz, cpu_model, fma_peak_gflops, gemm_path, kernel_path, read_bandwidth, BANDWIDTH_BYTES,
};
pub use measure::{gemm_ceiling, gemm_ceiling_n, measure, measure_with, median, time_once, Row};
pub use variant::Variant;
pub use workload::{flops_fwd, Workload, BWD_PER_FWD_FLOPS};
