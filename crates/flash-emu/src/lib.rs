//! # flash-emu: the GPU kernels on the CPU
//!
//! Test infrastructure, not product code. `build.rs` compiles flash-ops' kernel sources — the
//! very files nvcc compiles and the Metal backend hands to `newLibraryWithSource` — as C++ over
//! one SIMT core (`csrc/simt.h`): every GPU thread is a fiber, a block barrier a barrier, shared
//! memory a per-block buffer, warp collectives (shuffles, `ldmatrix`/`mma.sync`,
//! `simdgroup_matrix`) exchanges between the fibers of a warp. Each dialect is a shim over that
//! core and a module here:
//!
//! * [`cuda`]: `csrc/cuda_shim.h`, the kernels of `kernels/cuda`;
//! * [`metal`]: `csrc/msl_shim.h`, the kernels of `kernels/metal`.
//!
//! A problem runs exactly as the GPU backend runs it: through flash-ops' own launch plans
//! (`flash_ops::plan`), with host buffers in place of device memory.

pub mod cuda;
pub mod metal;

use candle_core::{CpuStorage, Result, Storage, Tensor};
pub use flash_ops::plan::{AttnParams, Dt, InputLayout};

/// A 16-byte aligned host buffer standing in for a device allocation (those are at least that
/// aligned, and the kernels' 16-byte copies rely on it).
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
    pub fn from_u32(v: &[u32]) -> Self {
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
    pub fn ptr(&mut self) -> *mut std::ffi::c_void {
        self.words.as_mut_ptr() as *mut std::ffi::c_void
    }
    /// The buffer's address as the CUDA parameter struct holds pointers.
    pub fn addr(&mut self) -> u64 {
        self.ptr() as u64
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

/// The kernels' element type of a tensor.
pub fn dt_of(t: &Tensor) -> Result<Dt> {
    Dt::of(t.dtype(), "the emulator")
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

/// What a backward pass reads besides the inputs: the forward's results, the output's gradient
/// `d_out` (contiguous `(total_q, hq, d)` in the inputs' dtype) and, when the log-sum-exp has a
/// gradient, `dlse` (f32, lse layout).
pub struct BackwardInputs<'a> {
    pub fwd: &'a mut Forward,
    pub d_out: &'a mut Buf,
    pub dlse: Option<&'a [f32]>,
}

/// Gradients, f32-widened, contiguous.
pub struct Grads {
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
}

impl Forward {
    /// Reads back what a forward launch wrote: `out` in the inputs' dtype, `stats` in f32.
    fn read(out: Buf, stats: &Buf, dt: Dt) -> Self {
        Self {
            out: out.to_f32(dt),
            out_buf: out,
            stats: stats.to_f32(Dt::F32),
        }
    }
}

impl Grads {
    fn read([dq, dk, dv]: &[Buf; 3], dt: Dt) -> Self {
        Self {
            dq: dq.to_f32(dt),
            dk: dk.to_f32(dt),
            dv: dv.to_f32(dt),
        }
    }
}

/// The buffers of a backward pass in both dialects: the saved statistics, the lse and delta of
/// the preprocessing kernel (f32, one per query row and head), and zeroed `[dq, dk, dv]` in the
/// inputs' dtype.
struct BackwardBufs {
    stats: Buf,
    lse: Buf,
    delta: Buf,
    grads: [Buf; 3],
}

impl BackwardBufs {
    fn new(p: &AttnParams, fwd: &Forward, dt: Dt) -> Self {
        let (n, nq, nk) = (p.lse_len(), p.q_elems(), p.k_elems());
        Self {
            stats: Buf::from_f32(&fwd.stats),
            lse: Buf::zeros(4 * n),
            delta: Buf::zeros(4 * n),
            grads: [nq, nk, nk].map(|n| Buf::zeros(n * dt.size())),
        }
    }
}
