//! # flash-emu-metal: the Metal kernels on the CPU
//!
//! Test infrastructure, not product code. `build.rs` compiles `kernels/metal/*.metal` — the
//! same sources the Metal backend hands to `newLibraryWithSource` — as C++ against the MSL
//! shim (`kernels/emu/msl_shim.h`) over the dialect-neutral SIMT core of `kernels/emu`: every
//! Metal thread is a fiber, a simdgroup a 32-lane warp, `threadgroup_barrier` a barrier, and
//! `simdgroup_matrix` a 2-elements-per-lane fragment whose products are warp collectives.
//!
//! A problem runs exactly as the Metal backend runs it: this crate includes the backend's launch
//! plan (`crates/flash-ops/src/metal/plan.rs`: parameter struct, tile sizes, grids), binds host
//! buffers at the plan's buffer indices and dispatches each kernel by its `host_name`.

use std::ffi::{c_char, c_int, c_void, CString};

use candle_core::{CpuStorage, DType, Result, Storage, Tensor};
pub use flash_ops::params::AttnParams;
use flash_ops::{gpu_layout, Algorithm};

#[allow(dead_code)]
#[path = "../../../crates/flash-ops/src/metal/plan.rs"]
pub mod plan;

#[allow(dead_code)]
#[path = "../../../crates/flash-ops/src/metal/source.rs"]
pub mod source;

use plan::{Dt, InputLayout, Launch, MetalParams};

extern "C" {
    fn emu_metal_launch(
        name: *const c_char,
        grid: *const u32,
        threads: u32,
        smem: usize,
        args: *const *mut c_void,
        nargs: usize,
    ) -> c_int;
}

/// A 16-byte aligned host buffer standing in for an `MTLBuffer`.
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
    pub fn ptr(&mut self) -> *mut c_void {
        self.words.as_mut_ptr() as *mut c_void
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

/// Dispatches one kernel of the plan with `args[i]` bound at buffer index i (threadgroups one
/// after another, on this OS thread).
pub fn launch(l: &Launch, args: &[*mut c_void]) -> Result<()> {
    let name = CString::new(l.name.as_str()).expect("kernel name");
    // SAFETY: every pointer in `args` points into a live host buffer sized by the plan, in the
    // order of the kernel's [[buffer(i)]] indices; the C side checks the count.
    let rc = unsafe {
        emu_metal_launch(
            name.as_ptr(),
            l.grid.as_ptr(),
            l.threads,
            l.smem,
            args.as_ptr(),
            args.len(),
        )
    };
    match rc {
        0 => Ok(()),
        1 => candle_core::bail!("emulator: no Metal kernel named {}", l.name),
        _ => candle_core::bail!("emulator: wrong buffer count for {}", l.name),
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

/// A CPU tensor's whole storage copied into an aligned buffer, with its layout (strided and
/// offset inputs reach the kernels as they are).
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

/// The inputs and the problem's constant buffers (params, seq_info, alibi).
pub struct Inputs {
    pub dt: Dt,
    pub q: Buf,
    pub k: Buf,
    pub v: Buf,
    params: Buf,
    seq_info: Buf,
    alibi: Buf,
}

impl Inputs {
    pub fn new(p: &AttnParams, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Self> {
        let dt = dt_of(q.dtype())?;
        let (q, ql) = host_input(q)?;
        let (k, kl) = host_input(k)?;
        let (v, vl) = host_input(v)?;
        let mp: MetalParams = plan::params(p, &ql, &kl, &vl);
        // SAFETY: MetalParams is #[repr(C)] plain data.
        let mp_bytes = unsafe {
            std::slice::from_raw_parts(
                &mp as *const MetalParams as *const u8,
                std::mem::size_of::<MetalParams>(),
            )
        };
        let si: Vec<u8> = plan::seq_info(p, &ql, &kl, &vl)
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        Ok(Self {
            dt,
            q,
            k,
            v,
            params: Buf::from_bytes(mp_bytes),
            seq_info: Buf::from_bytes(&si),
            // Unused without ALiBi, but bound like every buffer.
            alibi: Buf::from_f32(p.alibi.as_deref().unwrap_or(&[0.0])),
        })
    }
}

/// Forward results: output (f32-widened, contiguous `(total_q, hq, d)`), the raw output buffer
/// (for backward), and the saved statistics (V2: lse; V1: m ‖ l).
pub struct Forward {
    pub out: Vec<f32>,
    pub out_buf: Buf,
    pub stats: Vec<f32>,
}

/// The forward pass as the Metal backend dispatches it.
pub fn forward(p: &AttnParams, inp: &mut Inputs) -> Result<Forward> {
    let dt = inp.dt;
    let mut out = Buf::zeros(p.total_q * p.heads_q * p.head_dim * dt.size());
    let mut stats = Buf::zeros(4 * plan::stats_len(p));
    let args = [
        inp.params.ptr(),
        inp.seq_info.ptr(),
        inp.alibi.ptr(),
        inp.q.ptr(),
        inp.k.ptr(),
        inp.v.ptr(),
        out.ptr(),
        stats.ptr(),
    ];
    launch(&plan::forward_launch(p, dt), &args)?;
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

/// The backward pass as the Metal backend dispatches it; `d_out` contiguous `(total_q, hq, d)`
/// in the inputs' dtype.
pub fn backward(
    p: &AttnParams,
    inp: &mut Inputs,
    fwd: &mut Forward,
    d_out: &mut Buf,
) -> Result<Grads> {
    let dt = inp.dt;
    let n = p.lse_len();
    let nq = p.total_q * p.heads_q * p.head_dim;
    let nk = p.total_k * p.heads_k * p.head_dim;
    let mut stats = Buf::from_f32(&fwd.stats);
    let (mut lse, mut delta) = (Buf::zeros(4 * n), Buf::zeros(4 * n));
    let (mut dq, mut dk, mut dv) = (
        Buf::zeros(nq * dt.size()),
        Buf::zeros(nk * dt.size()),
        Buf::zeros(nk * dt.size()),
    );
    let [pre, dq_l, dkdv_l] = plan::backward_launches(p, dt);
    launch(
        &pre,
        &[
            inp.params.ptr(),
            inp.seq_info.ptr(),
            fwd.out_buf.ptr(),
            d_out.ptr(),
            stats.ptr(),
            lse.ptr(),
            delta.ptr(),
        ],
    )?;
    let common = [
        inp.params.ptr(),
        inp.seq_info.ptr(),
        inp.alibi.ptr(),
        inp.q.ptr(),
        inp.k.ptr(),
        inp.v.ptr(),
        d_out.ptr(),
        lse.ptr(),
        delta.ptr(),
    ];
    let mut a = common.to_vec();
    a.push(dq.ptr());
    launch(&dq_l, &a)?;
    let mut a = common.to_vec();
    a.extend([dk.ptr(), dv.ptr()]);
    launch(&dkdv_l, &a)?;
    Ok(Grads {
        dq: dq.to_f32(dt),
        dk: dk.to_f32(dt),
        dv: dv.to_f32(dt),
    })
}
