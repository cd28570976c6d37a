//! The launch plan of the CUDA kernels (`kernels/cuda`): the `#[repr(C)]` mirror of
//! `FlashParams`, the tile configurations of `flash_config.cuh`, and which kernels run with
//! which grids for a problem.

pub use super::{
    kernel_head_dim, seq_info, Dt, InputLayout, MaskDims, Strides, HEAD_DIMS, SEQ_INFO_STRIDE,
};
use super::{lcm, max_lens, shared_params, AttnParams};
use crate::Algorithm;

/// Mirror of `FlashParams` in `kernels/cuda/flash_params.h` (same order, pointers as `u64`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct FlashParams {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub o: u64,
    pub d_o: u64,
    pub lse: u64,
    pub m_l: u64,
    pub o_accum: u64,
    pub delta: u64,
    pub dq_accum: u64,
    pub dq: u64,
    pub dk: u64,
    pub dv: u64,
    pub seq_info: u64,
    pub alibi: u64,
    pub dlse: u64,
    pub strides: Strides,
    pub total_q: i64,
    pub batch: i32,
    pub heads_q: i32,
    pub heads_k: i32,
    pub head_dim: i32,
    pub max_q_len: i32,
    pub max_k_len: i32,
    pub window_left: i32,
    pub window_right: i32,
    pub has_dropout: i32,
    pub vec_loads: i32,
    pub scale: f32,
    pub softcap: f32,
    pub dropout_scale: f32,
    pub dropout_threshold: u32,
    pub seed_lo: u32,
    pub seed_hi: u32,
    /// The uploaded [`block_mask`] buffer, or 0 without a mask.
    pub mask: u64,
    pub mask_dims: MaskDims,
}

/// `sizeof(FlashParams)` in C; the emulator checks it at every launch.
pub const FLASH_PARAMS_SIZE: usize = 352;
const _: () = assert!(std::mem::size_of::<FlashParams>() == FLASH_PARAMS_SIZE);

/// Threads, dynamic shared memory and tile sizes of one kernel (mirrors flash_config.cuh).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileCfg {
    pub threads: u32,
    pub smem: u32,
    /// Query rows per tile.
    pub br: usize,
    /// Keys per tile.
    pub bc: usize,
}

fn pitch(dt: Dt, d: usize) -> usize {
    d + 16 / dt.size()
}

/// `FwdCfg<T, D>` (both forward schedules).
pub fn fwd_cfg(dt: Dt, d: usize) -> TileCfg {
    let f32 = dt == Dt::F32;
    let br = 64;
    let bc = if f32 || d > 128 { 32 } else { 64 };
    let stages = if f32 && d == 256 { 1 } else { 2 };
    let smem = (br + 2 * stages * bc) * pitch(dt, d) * dt.size();
    TileCfg {
        threads: 128,
        smem: smem as u32,
        br,
        bc,
    }
}

/// `BwdCfg<T, D, kMasked>` (both backward schedules); `masked`: the block-sparse instance
/// (`flash_bwd_v*_masked_*`), 32-query tiles to stay within 255 registers.
pub fn bwd_cfg(dt: Dt, d: usize, masked: bool) -> TileCfg {
    let f32 = dt == Dt::F32;
    let bc = if f32 || d > 128 { 32 } else { 64 };
    let br = if masked { 32 } else { bc };
    let wd = match d {
        0..=64 => 1,
        96 => 2,
        _ => d / 64,
    };
    let warps = (bc / 16) * wd;
    let lds = br + 16 / dt.size();
    let smem = (2 * bc + 2 * br) * pitch(dt, d) * dt.size() + bc * lds * dt.size() + 2 * br * 4;
    TileCfg {
        threads: 32 * warps as u32,
        smem: smem as u32,
        br,
        bc,
    }
}

/// The (query, key) multiples of a block mask's block size that the kernels of `(dt, d)` need:
/// every query tile (forward, dQ, the masked dK/dV sweep) and key tile must lie inside one block.
pub fn block_multiples(dt: Dt, d: usize) -> (usize, usize) {
    let (f, b, q) = (fwd_cfg(dt, d), bwd_cfg(dt, d, true), dq_cfg(dt, d));
    (lcm(lcm(f.br, b.br), q.br), lcm(lcm(f.bc, b.bc), q.bc))
}

/// The block mask of `p` checked against the kernels of `dt` (a clear error for a block size
/// they cannot tile) and laid out for upload: see [`super::block_mask`]. Call it before any
/// launch; the caller uploads the buffer and sets [`FlashParams::mask`] and `mask_dims`.
pub fn block_mask(p: &AttnParams, dt: Dt) -> candle_core::Result<Option<(MaskDims, Vec<u32>)>> {
    let d = kernel_head_dim(p.head_dim).expect("head_dim checked by AttnParams");
    let who = format!("the CUDA kernels ({}, head_dim {d})", dt.name());
    super::block_mask(p, block_multiples(dt, d), &who)
}

/// One kernel launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub name: String,
    pub grid: [u32; 3],
    pub block: u32,
    pub smem: u32,
}

/// The scalar part of the parameters (pointers left 0 for the caller to fill in); `info` is
/// [`seq_info`] of the same layouts, which the caller also uploads.
pub fn base_params(
    p: &AttnParams,
    dt: Dt,
    [q, k, v]: [&InputLayout; 3],
    info: &[i64],
) -> FlashParams {
    let (max_q, max_k) = max_lens(p);
    let chunk = 16 / dt.size();
    // cp.async moves 16-byte chunks: every row start it loads must be 16-byte aligned. Buffers
    // are (at least) 16-byte aligned, so it is enough that the offsets of the tiled operands
    // (q, k, v and o/dO: records 2..6) and the strides are multiples of a chunk. The
    // statistics offset (record 6) counts f32 values read one at a time: not a condition.
    let aligned = info
        .chunks(SEQ_INFO_STRIDE)
        .all(|r| r[2..6].iter().all(|&o| (o as usize).is_multiple_of(chunk)))
        && [q, k, v]
            .iter()
            .all(|l| l.tok_stride().is_multiple_of(chunk) && l.head_stride().is_multiple_of(chunk))
        && p.head_dim.is_multiple_of(chunk);
    shared_params!(FlashParams, p, [q, k, v], {
        total_q: p.total_q as i64,
        max_q_len: max_q as i32,
        max_k_len: max_k as i32,
        vec_loads: aligned as i32,
        ..Default::default()
    })
}

/// The forward kernel. V2 writes `lse`; V1 needs `m_l` (2·lse_len) and `o_accum` (f32, like o).
pub fn forward_launch(p: &AttnParams, dt: Dt) -> Launch {
    let d = kernel_head_dim(p.head_dim).expect("head_dim checked by AttnParams");
    let cfg = fwd_cfg(dt, d);
    let (max_q, _) = max_lens(p);
    let (sched, gx) = match p.algorithm {
        Algorithm::V2 => ("v2", max_q.div_ceil(cfg.br).max(1)),
        Algorithm::V1 => ("v1", 1),
    };
    Launch {
        name: format!("flash_fwd_{sched}_{}_d{d}", dt.name()),
        grid: [gx as u32, p.heads_q as u32, p.batch() as u32],
        block: cfg.threads,
        smem: cfg.smem,
    }
}

/// Rows per block of `bwd_pre` (one warp per row, 4 warps).
const PRE_ROWS: usize = 4;

/// True when backward computes dQ in `bwd_dq` (deterministic, no atomics): V2 with
/// `AttnOptions::deterministic`. The caller then passes `dq_accum = 0` and needs no accumulator.
pub fn separate_dq(p: &AttnParams) -> bool {
    p.deterministic && p.algorithm == Algorithm::V2
}

/// `DqCfg<T, D>` of bwd_dq.cu.
pub fn dq_cfg(dt: Dt, d: usize) -> TileCfg {
    let warps = if dt == Dt::F32 && d == 256 { 2 } else { 4 };
    let (br, bc) = (16 * warps, fwd_cfg(dt, d).bc);
    TileCfg {
        threads: 32 * warps as u32,
        smem: ((2 * br + 2 * bc) * pitch(dt, d) * dt.size()) as u32,
        br,
        bc,
    }
}

/// Backward: `bwd_pre` (delta = rowsum(dO∘O) − dlse; V1 also lse from m, l), the main kernel (dK, dV; dQ into the
/// zeroed f32 `dq_accum`), `bwd_post` (dQ to the dtype). With [`separate_dq`], the main
/// kernel skips dQ and `bwd_dq` writes it instead of `bwd_post`. V1 is deterministic as is
/// (one block owns each dQ row).
pub fn backward_launches(p: &AttnParams, dt: Dt) -> Vec<Launch> {
    let d = kernel_head_dim(p.head_dim).expect("head_dim checked by AttnParams");
    // A block mask takes the masked instance; without one the dense kernel has no list walk.
    let masked = p.block_mask.is_some();
    let cfg = bwd_cfg(dt, d, masked);
    let inst = if masked { "_masked" } else { "" };
    let (max_q, max_k) = max_lens(p);
    let (b, hq, hk) = (p.batch() as u32, p.heads_q as u32, p.heads_k as u32);
    let main = match p.algorithm {
        Algorithm::V2 => Launch {
            name: format!("flash_bwd_v2{inst}_{}_d{d}", dt.name()),
            grid: [max_k.div_ceil(cfg.bc).max(1) as u32, hk, b],
            block: cfg.threads,
            smem: cfg.smem,
        },
        Algorithm::V1 => Launch {
            name: format!("flash_bwd_v1{inst}_{}_d{d}", dt.name()),
            grid: [1, hk, b],
            block: cfg.threads,
            smem: cfg.smem,
        },
    };
    let n = p.q_elems();
    let pre = Launch {
        name: format!("flash_bwd_pre_{}", dt.name()),
        grid: [max_q.div_ceil(PRE_ROWS).max(1) as u32, hq, b],
        block: 32 * PRE_ROWS as u32,
        smem: 0,
    };
    let last = if separate_dq(p) {
        let c = dq_cfg(dt, d);
        Launch {
            name: format!("flash_bwd_dq_{}_d{d}", dt.name()),
            grid: [max_q.div_ceil(c.br).max(1) as u32, hq, b],
            block: c.threads,
            smem: c.smem,
        }
    } else {
        Launch {
            name: format!("flash_bwd_post_{}", dt.name()),
            grid: [n.div_ceil(256).clamp(1, 4096) as u32, 1, 1],
            block: 256,
            smem: 0,
        }
    };
    vec![pre, main, last]
}

/// `mma_probe.cu`: one warp multiplies two 16x16 tiles (A = `q`, B = `k`, in `dt`) through
/// every operand path of `flash_mma.cuh`, writing 4 x 256 f32 to `dq_accum`. Used by the
/// probe tests (the backend's unit test on a GPU, flash-emu on the CPU).
#[allow(dead_code)]
pub fn probe_launch(dt: Dt) -> Launch {
    Launch {
        name: format!("flash_mma_probe_{}", dt.name()),
        grid: [1, 1, 1],
        block: 32,
        smem: (2 * 16 * pitch(dt, 16) * dt.size()) as u32,
    }
}

/// Checks what the probe wrote (`got`, 4 x 256 f32) against the products it computes, from the
/// f32 values of A and B (row-major 16x16, already in `dt`): A·Bᵀ, A·B, Aᵀ·B, and round(A·Bᵀ)·B
/// with the rounding to `dt` the kernel applies to its first product before reusing it.
#[allow(dead_code)]
pub fn probe_check(dt: Dt, a: &[f32], b: &[f32], got: &[f32]) -> candle_core::Result<()> {
    let round = |x: f32| match dt {
        Dt::F16 => half::f16::from_f32(x).to_f32(),
        Dt::Bf16 => half::bf16::from_f32(x).to_f32(),
        Dt::F32 => x,
    };
    let mm = |x: &dyn Fn(usize, usize) -> f32, y: &dyn Fn(usize, usize) -> f32| -> Vec<f32> {
        (0..256)
            .map(|e| {
                (0..16)
                    .map(|k| x(e / 16, k) as f64 * y(k, e % 16) as f64)
                    .sum::<f64>() as f32
            })
            .collect()
    };
    let c0 = mm(&|i, k| a[i * 16 + k], &|k, j| b[j * 16 + k]);
    let c1 = mm(&|i, k| a[i * 16 + k], &|k, j| b[k * 16 + j]);
    let c2 = mm(&|i, k| a[k * 16 + i], &|k, j| b[k * 16 + j]);
    let r0: Vec<f32> = c0.iter().map(|&x| round(x)).collect();
    let c3 = mm(&|i, k| r0[i * 16 + k], &|k, j| b[k * 16 + j]);
    let want = [c0, c1, c2, c3].concat();
    if got.len() != want.len() {
        candle_core::bail!("mma probe: {} values, want {}", got.len(), want.len());
    }
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let close = (g - w).abs() <= 1e-4 * (1.0 + w.abs()); // false for a NaN
        if !close {
            candle_core::bail!(
                "mma probe {dt:?}: product {} element {}: {g} vs {w}",
                i / 256,
                i % 256
            );
        }
    }
    Ok(())
}
