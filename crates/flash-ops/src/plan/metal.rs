//! The launch plan of the Metal kernels (`kernels/metal`): the `#[repr(C)]` mirror of
//! `MetalFlashParams`, the tile sizes of `flash_metal.h`, and which kernels run with which
//! grids.

pub use super::{
    kernel_head_dim, seq_info, Dt, InputLayout, MaskDims, Strides, HEAD_DIMS, SEQ_INFO_STRIDE,
};
use super::{lcm, max_lens, shared_params, AttnParams};
use crate::Algorithm;

/// Mirror of `MetalFlashParams` in `kernels/metal/flash_metal.h` (same order; `long` is i64).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct MetalParams {
    pub strides: Strides,
    pub batch: i32,
    pub heads_q: i32,
    pub heads_k: i32,
    pub head_dim: i32,
    pub window_left: i32,
    pub window_right: i32,
    pub has_alibi: i32,
    pub stats_v1: i32,
    pub scale: f32,
    pub softcap: f32,
    pub has_dropout: i32,
    pub dropout_threshold: u32,
    pub dropout_scale: f32,
    pub seed_lo: u32,
    pub seed_hi: u32,
    /// 1: backward's `flash_bwd_pre` reads `dlse` (buffer 7) and subtracts it from delta.
    pub has_dlse: i32,
    /// The block mask's lists in the `mask` buffer ([`block_mask`]); zero without one.
    pub mask_dims: MaskDims,
}

/// `sizeof(MetalFlashParams)`.
pub const PARAMS_SIZE: usize = 208;
const _: () = assert!(std::mem::size_of::<MetalParams>() == PARAMS_SIZE);

/// Threads per threadgroup of the tile kernels (4 simdgroups).
pub const THREADS: u32 = 128;
/// Query rows per forward / dQ threadgroup (`FLASH_BR`).
pub const BR: usize = 32;
/// Keys per dK/dV threadgroup (`FLASH_BK`).
pub const BK: usize = 32;
/// Rows per threadgroup of `flash_bwd_pre` (one simdgroup, a thread per row).
pub const PRE_ROWS: usize = 32;

/// Keys per forward / dQ tile (`FLASH_BC`).
pub fn bc(d: usize) -> usize {
    if d <= 128 {
        32
    } else {
        16
    }
}

/// Query rows per dK/dV tile (`FLASH_BQ`).
pub fn bq(d: usize) -> usize {
    match d {
        0..=64 => 32,
        65..=128 => 16,
        _ => 8,
    }
}

/// Threadgroup memory of each kernel, bytes (the `FLASH_CHECK_SMEM` expressions).
pub fn fwd_smem(d: usize) -> usize {
    (bc(d) * d + BR * bc(d) + 4 * 64) * 4
}
pub fn dq_smem(d: usize) -> usize {
    (bc(d) * d + 2 * BR * bc(d) + 2 * BR) * 4
}
pub fn dkdv_smem(d: usize) -> usize {
    (2 * bq(d) * d + 2 * BK * bq(d) + 2 * bq(d)) * 4
}

/// The kernel parameters of a problem (`mask_dims` left zero: see [`block_mask`]).
pub fn params(p: &AttnParams, q: &InputLayout, k: &InputLayout, v: &InputLayout) -> MetalParams {
    shared_params!(MetalParams, p, [q, k, v], {
        has_alibi: p.alibi.is_some() as i32,
        stats_v1: (p.algorithm == Algorithm::V1) as i32,
        has_dlse: 0,
        mask_dims: MaskDims::default(),
    })
}

/// The (query, key) multiples of a block mask's block size that the kernels of head dim `d`
/// need: every query tile (forward and dQ rows, dK/dV sweep) and key tile inside one block.
pub fn block_multiples(d: usize) -> (usize, usize) {
    (lcm(BR, bq(d)), lcm(bc(d), BK))
}

/// The block mask of `p` checked against the kernels (a clear error for a block size they
/// cannot tile) and laid out for the `mask` buffer: see [`super::block_mask`]. Call it before
/// any dispatch; the caller binds the buffer (a stand-in without a mask) and sets `mask_dims`.
pub fn block_mask(p: &AttnParams) -> candle_core::Result<Option<(MaskDims, Vec<u32>)>> {
    let d = kernel_head_dim(p.head_dim).expect("head_dim checked by AttnParams");
    let who = format!("the Metal kernels (head_dim {d})");
    super::block_mask(p, block_multiples(d), &who)
}

/// One kernel dispatch: 1-D threadgroups of `threads`, `smem` bytes of threadgroup memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub name: String,
    pub grid: [u32; 3],
    pub threads: u32,
    pub smem: usize,
}

/// The forward kernel: buffers params, seq_info, alibi, q, k, v, o, stats, mask.
pub fn forward_launch(p: &AttnParams, dt: Dt) -> Launch {
    let d = kernel_head_dim(p.head_dim).expect("head_dim checked by AttnParams");
    let (max_q, _) = max_lens(p);
    Launch {
        name: format!("flash_fwd_{}_d{d}", dt.name()),
        grid: [
            max_q.div_ceil(BR).max(1) as u32,
            p.heads_q as u32,
            p.batch() as u32,
        ],
        threads: THREADS,
        smem: fwd_smem(d),
    }
}

/// Backward, in order: `flash_bwd_pre` (params, seq_info, o, d_o, stats, lse, delta, dlse), then
/// `flash_bwd_dq` (params, seq_info, alibi, q, k, v, d_o, lse, delta, dq, mask) and
/// `flash_bwd_dkdv` (params ... delta, then dk, dv, mask). The last two are independent of each
/// other.
pub fn backward_launches(p: &AttnParams, dt: Dt) -> [Launch; 3] {
    let d = kernel_head_dim(p.head_dim).expect("head_dim checked by AttnParams");
    let (max_q, max_k) = max_lens(p);
    let (b, hq, hk) = (p.batch() as u32, p.heads_q as u32, p.heads_k as u32);
    [
        Launch {
            name: format!("flash_bwd_pre_{}", dt.name()),
            grid: [max_q.div_ceil(PRE_ROWS).max(1) as u32, hq, b],
            threads: PRE_ROWS as u32,
            // Metal wants a non-empty threadgroup buffer where a kernel declares one.
            smem: 16,
        },
        Launch {
            name: format!("flash_bwd_dq_{}_d{d}", dt.name()),
            grid: [max_q.div_ceil(BR).max(1) as u32, hq, b],
            threads: THREADS,
            smem: dq_smem(d),
        },
        Launch {
            name: format!("flash_bwd_dkdv_{}_d{d}", dt.name()),
            grid: [max_k.div_ceil(BK).max(1) as u32, hk, b],
            threads: THREADS,
            smem: dkdv_smem(d),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_fit_apple_threadgroup_memory() {
        for d in HEAD_DIMS {
            for s in [fwd_smem(d), dq_smem(d), dkdv_smem(d)] {
                assert!(s <= 32 * 1024, "d={d}: {s} bytes");
            }
            assert_eq!(BR % bc(d), 0);
            assert_eq!(bq(d) % 8, 0);
        }
    }
}
