//! Metal backend (feature `metal`, macOS only): the kernels of `kernels/metal` compiled at run
//! time with the device's `newLibraryWithSource` and dispatched on Candle's command encoder.
//!
//! * `crate::plan::metal`: parameter struct, tile sizes and grids, free of Metal types (the SIMT
//!   emulator `flash-emu` runs the very plan the GPU runs).
//! * `crate::plan::metal_source`: the one MSL source string assembled from the kernel files.
//! * `backend`: library and pipeline cache, buffer allocation and dispatch.
//!
//! One schedule serves both algorithms: FlashAttention-2's forward (q tile resident, k/v tiles
//! streamed) and a two-kernel backward without atomics (dQ; dK/dV). `Algorithm::V1` only changes
//! the saved statistics to V1's `m ‖ l`, so the op's contract holds on every backend.

mod backend;

pub use backend::{backward, forward};
