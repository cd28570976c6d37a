//! # flash-emu: the CUDA kernels on the CPU
//!
//! Test infrastructure, not product code. `build.rs` compiles `kernels/cuda/*.cu` — the same
//! sources nvcc compiles for the GPU — as ordinary C++ against a small shim
//! (`cuda_shim.h`): every CUDA thread is a fiber, `__syncthreads` a barrier, shared memory a
//! per-block buffer, warp shuffles and the tensor-core instructions (`ldmatrix`, `mma.sync`)
//! warp collectives that implement the PTX ISA's fragment layouts. The scheduling core
//! (`simt.h`) is dialect-neutral, for a later Metal shim.
//!
//! This crate runs a problem exactly as the CUDA backend does: it includes the backend's launch
//! plan (`crates/flash-ops/src/cuda/plan.rs`: parameter struct, tile configs, grids), fills the
//! parameters with host pointers and launches each kernel by name. The tests compare the
//! results with the f64 reference.

use std::ffi::{c_char, c_int, c_void, CString};

use candle_core::{CpuStorage, DType, Result, Storage, Tensor};
pub use flash_ops::params::AttnParams;
use flash_ops::{gpu_layout, Algorithm};

#[allow(dead_code)]
#[path = "../../../crates/flash-ops/src/cuda/plan.rs"]
pub mod plan;

use plan::{Dt, FlashParams, InputLayout};

extern "C" {
    fn emu_cuda_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        smem: usize,
        params: *const c_void,
        params_size: usize,
    ) -> c_int;
}

/// Runs one kernel of the plan on the emulator (blocks one after another, on this OS thread).
pub fn launch(l: &plan::Launch, p: &FlashParams) -> Result<()> {
    let name = CString::new(l.name.as_str()).expect("kernel name");
    let block = [l.block, 1, 1];
    // SAFETY: the pointers in `p` point into live host buffers sized by the plan; the C side
    // checks the struct size.
    let rc = unsafe {
        emu_cuda_launch(
            name.as_ptr(),
            l.grid.as_ptr(),
            block.as_ptr(),
            l.smem as usize,
            p as *const FlashParams as *const c_void,
            std::mem::size_of::<FlashParams>(),
        )
    };
    match rc {
        0 => Ok(()),
        1 => candle_core::bail!("emulator: no kernel named {}", l.name),
        _ => candle_core::bail!("emulator: FlashParams size differs between Rust and C"),
    }
}

/// A 16-byte aligned host buffer (device allocations are at least that aligned, and the
/// kernels' 16-byte copies rely on it).
pub struct Buf {
    words: Vec<u128>,
    bytes: usize,
}

impl Buf {
    pub fn zeros(bytes: usize) -> Self {
        Self {
            words: vec![0; bytes.div_ceil(16).max(1)],
            bytes,
        }
    }
    pub fn from_bytes(b: &[u8]) -> Self {
        let mut buf = Self::zeros(b.len());
        buf.as_bytes_mut().copy_from_slice(b);
        buf
    }
    pub fn from_f32(v: &[f32]) -> Self {
        Self::from_bytes(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>())
    }
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: `words` holds at least `bytes` bytes.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.bytes) }
    }
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr() as *mut u8, self.bytes) }
    }
    pub fn ptr(&mut self) -> u64 {
        self.words.as_mut_ptr() as u64
    }
    /// The contents read as `dt` elements, widened to f32.
    pub fn to_f32(&self, dt: Dt) -> Vec<f32> {
        let b = self.as_bytes();
        match dt {
            Dt::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dt::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            Dt::Bf16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
        }
    }
}

pub fn dt_of(d: DType) -> Result<Dt> {
    Ok(match d {
        DType::F32 => Dt::F32,
        DType::F16 => Dt::F16,
        DType::BF16 => Dt::Bf16,
        d => candle_core::bail!("emulator: unsupported dtype {d:?}"),
    })
}

/// A CPU tensor's whole storage copied into an aligned buffer, with its layout (so strided
/// and offset inputs reach the kernels as they are).
pub fn host_input(t: &Tensor) -> Result<(Buf, InputLayout)> {
    let (s, l) = t.storage_and_layout();
    let Storage::Cpu(s) = &*s else {
        candle_core::bail!("emulator: inputs must be cpu tensors")
    };
    let bytes: Vec<u8> = match s {
        CpuStorage::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        CpuStorage::F16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
        CpuStorage::BF16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
        _ => candle_core::bail!("emulator: unsupported dtype"),
    };
    Ok((Buf::from_bytes(&bytes), InputLayout::from(l)))
}

/// Forward results: output (f32-widened, contiguous `(total_q, hq, d)`), the raw output
/// buffer (for backward), and the saved statistics (V2: lse; V1: m ‖ l).
pub struct Forward {
    pub out: Vec<f32>,
    pub out_buf: Buf,
    pub stats: Vec<f32>,
}

/// Everything a run needs besides the per-pass buffers.
pub struct Inputs {
    pub dt: Dt,
    pub q: (Buf, InputLayout),
    pub k: (Buf, InputLayout),
    pub v: (Buf, InputLayout),
    pub seq_info: Vec<i64>,
    pub alibi: Option<Vec<f32>>,
}

impl Inputs {
    pub fn new(p: &AttnParams, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Self> {
        let dt = dt_of(q.dtype())?;
        let (q, k, v) = (host_input(q)?, host_input(k)?, host_input(v)?);
        Ok(Self {
            dt,
            seq_info: plan::seq_info(p, &q.1, &k.1, &v.1),
            alibi: p.alibi.clone(),
            q,
            k,
            v,
        })
    }

    fn params(&mut self, p: &AttnParams) -> (FlashParams, Buf, Option<Buf>) {
        let mut fp = plan::base_params(
            p,
            self.dt,
            [&self.q.1, &self.k.1, &self.v.1],
            &self.seq_info,
        );
        let mut si = Buf::from_bytes(
            &self
                .seq_info
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect::<Vec<_>>(),
        );
        let mut alibi = self.alibi.as_ref().map(|a| Buf::from_f32(a));
        fp.q = self.q.0.ptr();
        fp.k = self.k.0.ptr();
        fp.v = self.v.0.ptr();
        fp.seq_info = si.ptr();
        fp.alibi = alibi.as_mut().map_or(0, |b| b.ptr());
        (fp, si, alibi)
    }
}

/// The forward pass as the CUDA backend runs it.
pub fn forward(p: &AttnParams, inp: &mut Inputs) -> Result<Forward> {
    let dt = inp.dt;
    let (mut fp, _si, _alibi) = inp.params(p);
    let n_out = p.total_q * p.heads_q * p.head_dim;
    let mut out = Buf::zeros(n_out * dt.size());
    let n = p.lse_len();
    let mut stats = Buf::zeros(4 * n * if p.algorithm == Algorithm::V1 { 2 } else { 1 });
    let mut o_accum = Buf::zeros(if p.algorithm == Algorithm::V1 {
        4 * n_out
    } else {
        0
    });
    fp.o = out.ptr();
    match p.algorithm {
        Algorithm::V2 => fp.lse = stats.ptr(),
        Algorithm::V1 => {
            fp.m_l = stats.ptr();
            fp.o_accum = o_accum.ptr();
        }
    }
    launch(&plan::forward_launch(p, dt), &fp)?;
    Ok(Forward {
        out: out.to_f32(dt),
        out_buf: out,
        stats: stats.to_f32(Dt::F32),
    })
}

/// Gradients, f32-widened, contiguous.
pub struct Grads {
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
}

/// The backward pass as the CUDA backend runs it; `d_out` contiguous `(total_q, hq, d)` in the
/// inputs' dtype.
pub fn backward(
    p: &AttnParams,
    inp: &mut Inputs,
    fwd: &mut Forward,
    d_out: &mut Buf,
) -> Result<Grads> {
    let dt = inp.dt;
    let (mut fp, _si, _alibi) = inp.params(p);
    let n = p.lse_len();
    let nq = p.total_q * p.heads_q * p.head_dim;
    let nk = p.total_k * p.heads_k * p.head_dim;
    let mut stats = Buf::from_f32(&fwd.stats);
    let mut lse = Buf::zeros(4 * n);
    let mut delta = Buf::zeros(4 * n);
    let mut dq_accum = Buf::zeros(4 * nq);
    let (mut dq, mut dk, mut dv) = (
        Buf::zeros(nq * dt.size()),
        Buf::zeros(nk * dt.size()),
        Buf::zeros(nk * dt.size()),
    );
    fp.o = fwd.out_buf.ptr();
    fp.d_o = d_out.ptr();
    match p.algorithm {
        Algorithm::V2 => fp.lse = stats.ptr(),
        Algorithm::V1 => {
            fp.m_l = stats.ptr();
            fp.lse = lse.ptr();
        }
    }
    fp.delta = delta.ptr();
    if !plan::separate_dq(p) {
        fp.dq_accum = dq_accum.ptr();
    }
    fp.dq = dq.ptr();
    fp.dk = dk.ptr();
    fp.dv = dv.ptr();
    for l in plan::backward_launches(p, dt) {
        launch(&l, &fp)?;
    }
    Ok(Grads {
        dq: dq.to_f32(dt),
        dk: dk.to_f32(dt),
        dv: dv.to_f32(dt),
    })
}
