//! The Metal dialect: the kernels of `kernels/metal/*.metal` compiled as C++ against
//! `csrc/msl_shim.h` — a simdgroup is a 32-lane warp, `threadgroup_barrier` a barrier,
//! `simdgroup_matrix` a 2-elements-per-lane fragment whose products are warp collectives —
//! dispatched through the Metal backend's launch plan with host buffers bound at the plan's
//! buffer indices, each kernel by its `host_name`.

use std::ffi::{c_char, c_int, c_void, CString};

use candle_core::{Result, Tensor};

pub use crate::{host_input, AttnParams, BackwardInputs, Buf, Dt, Forward, Grads};
pub use flash_ops::plan::metal as plan;
pub use flash_ops::plan::metal_source as source;

use crate::{dt_of, BackwardBufs};
use plan::{Launch, MetalParams};

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

/// The inputs and the problem's constant buffers (params, seq_info, alibi).
pub struct Inputs {
    pub dt: Dt,
    pub q: Buf,
    pub k: Buf,
    pub v: Buf,
    params: Buf,
    mp: MetalParams,
    seq_info: Buf,
    alibi: Buf,
    /// The block mask's lists (a one-word stand-in without a mask: every buffer is bound).
    mask: Buf,
}

impl Inputs {
    pub fn new(p: &AttnParams, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Self> {
        let dt = dt_of(q)?;
        let (q, ql) = host_input(q)?;
        let (k, kl) = host_input(k)?;
        let (v, vl) = host_input(v)?;
        // As the backend: refused before any dispatch for a block size the kernels cannot tile.
        let (mask_dims, lists) = plan::block_mask(p)?.unwrap_or_default();
        let mp = MetalParams {
            mask_dims,
            ..plan::params(p, &ql, &kl, &vl)
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
            params: params_buf(&mp),
            mp,
            seq_info: Buf::from_bytes(&si),
            // Unused without ALiBi, but bound like every buffer.
            alibi: Buf::from_f32(p.alibi.as_deref().unwrap_or(&[0.0])),
            mask: Buf::from_u32(if lists.is_empty() { &[0] } else { &lists }),
        })
    }

    /// The buffers the forward, dQ and dK/dV kernels bind first, in their index order.
    fn problem_buffers(&mut self) -> [*mut c_void; 6] {
        [
            self.params.ptr(),
            self.seq_info.ptr(),
            self.alibi.ptr(),
            self.q.ptr(),
            self.k.ptr(),
            self.v.ptr(),
        ]
    }
}

fn params_buf(mp: &MetalParams) -> Buf {
    // SAFETY: MetalParams is #[repr(C)] plain data.
    Buf::from_bytes(unsafe {
        std::slice::from_raw_parts(
            mp as *const MetalParams as *const u8,
            std::mem::size_of::<MetalParams>(),
        )
    })
}

/// The forward pass as the Metal backend dispatches it.
pub fn forward(p: &AttnParams, inp: &mut Inputs) -> Result<Forward> {
    let dt = inp.dt;
    let mut out = Buf::zeros(p.q_elems() * dt.size());
    let mut stats = Buf::zeros(4 * p.stats_len());
    let mut args = inp.problem_buffers().to_vec();
    args.extend([out.ptr(), stats.ptr(), inp.mask.ptr()]);
    launch(&plan::forward_launch(p, dt), &args)?;
    Ok(Forward::read(out, &stats, dt))
}

/// The backward pass as the Metal backend dispatches it.
pub fn backward(p: &AttnParams, inp: &mut Inputs, bi: BackwardInputs<'_>) -> Result<Grads> {
    let BackwardInputs { fwd, d_out, dlse } = bi;
    let dt = inp.dt;
    let mut b = BackwardBufs::new(p, fwd, dt);
    let mut pre_params = params_buf(&MetalParams {
        has_dlse: dlse.is_some() as i32,
        ..inp.mp
    });
    // Unread without a gradient, but bound like every buffer.
    let mut dlse = Buf::from_f32(dlse.unwrap_or(&[0.0]));
    let [pre, dq_l, dkdv_l] = plan::backward_launches(p, dt);
    launch(
        &pre,
        &[
            pre_params.ptr(),
            inp.seq_info.ptr(),
            fwd.out_buf.ptr(),
            d_out.ptr(),
            b.stats.ptr(),
            b.lse.ptr(),
            b.delta.ptr(),
            dlse.ptr(),
        ],
    )?;
    let mut common = inp.problem_buffers().to_vec();
    common.extend([d_out.ptr(), b.lse.ptr(), b.delta.ptr()]);
    let [dq, dk, dv] = &mut b.grads;
    let mut a = common.clone();
    a.extend([dq.ptr(), inp.mask.ptr()]);
    launch(&dq_l, &a)?;
    let mut a = common;
    a.extend([dk.ptr(), dv.ptr(), inp.mask.ptr()]);
    launch(&dkdv_l, &a)?;
    Ok(Grads::read(&b.grads, dt))
}
