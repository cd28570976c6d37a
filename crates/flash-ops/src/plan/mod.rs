//! The GPU launch plans: for a problem, which kernels run with which grids, tiles and parameter
//! structs (`#[repr(C)]` mirrors of the kernels' headers). No device types, so they compile on
//! every build and the SIMT emulator (`flash-emu`) runs the very plans the CUDA and Metal
//! backends launch. Not a stable API: hidden from the docs, used by the backends and the
//! emulator only.

pub mod cuda;
mod head_dims;
mod layout;
pub mod metal;
pub mod metal_source;

pub use crate::params::{AttnParams, SeqLayout, SeqSpan};
/// The log-sum-exp of saved statistics read back to the host (the emulator's tests).
pub use crate::stats::lse_host;
pub use head_dims::{kernel_head_dim, HEAD_DIMS};
use layout::shared_params;
pub use layout::{
    block_mask, lcm, max_lens, seq_info, window_bound, Dt, InputLayout, MaskDims, Strides,
    SEQ_INFO_STRIDE,
};
