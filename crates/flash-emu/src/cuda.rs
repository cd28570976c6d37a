//! The CUDA dialect: the kernels of `kernels/cuda/*.cu` compiled as C++ against
//! `csrc/cuda_shim.h` — `__syncthreads` a barrier, warp shuffles and the tensor-core
//! instructions (`ldmatrix`, `mma.sync`) warp collectives implementing the PTX ISA's fragment
//! layouts — and launched by name through the CUDA backend's launch plan, with host pointers in
//! the parameter struct.

use std::ffi::{c_char, c_int, c_void, CString};

use candle_core::{Result, Tensor};
use flash_ops::Algorithm;

pub use crate::{host_input, AttnParams, BackwardInputs, Buf, Dt, Forward, Grads};
pub use flash_ops::plan::cuda as plan;

use crate::{dt_of, BackwardBufs, InputLayout};
use plan::FlashParams;

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

/// Everything a run needs besides the per-pass buffers.
pub struct Inputs {
    pub dt: Dt,
    pub q: (Buf, InputLayout),
    pub k: (Buf, InputLayout),
    pub v: (Buf, InputLayout),
    pub seq_info: Vec<i64>,
    pub alibi: Option<Vec<f32>>,
    /// The block mask's dims and its lists, uploaded once (as the backend does per call).
    mask: Option<(plan::MaskDims, Buf)>,
}

impl Inputs {
    /// Fails, as the backend does before any launch, for a block mask the kernels cannot tile.
    pub fn new(p: &AttnParams, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Self> {
        let dt = dt_of(q)?;
        let mask = plan::block_mask(p, dt)?.map(|(dims, lists)| (dims, Buf::from_u32(&lists)));
        let (q, k, v) = (host_input(q)?, host_input(k)?, host_input(v)?);
        Ok(Self {
            dt,
            seq_info: plan::seq_info(p, &q.1, &k.1, &v.1),
            alibi: p.alibi.clone(),
            mask,
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
        fp.q = self.q.0.addr();
        fp.k = self.k.0.addr();
        fp.v = self.v.0.addr();
        fp.seq_info = si.addr();
        fp.alibi = alibi.as_mut().map_or(0, |b| b.addr());
        if let Some((dims, buf)) = &mut self.mask {
            fp.mask = buf.addr();
            fp.mask_dims = *dims;
        }
        (fp, si, alibi)
    }
}

/// Binds the saved statistics where the kernels of `p.algorithm` keep them: V2 the lse, V1
/// m ‖ l.
fn bind_stats(fp: &mut FlashParams, p: &AttnParams, stats: &mut Buf) {
    match p.algorithm {
        Algorithm::V2 => fp.lse = stats.addr(),
        Algorithm::V1 => fp.m_l = stats.addr(),
    }
}

/// The forward pass as the CUDA backend runs it.
pub fn forward(p: &AttnParams, inp: &mut Inputs) -> Result<Forward> {
    let dt = inp.dt;
    let (mut fp, _si, _alibi) = inp.params(p);
    let n_out = p.q_elems();
    let mut out = Buf::zeros(n_out * dt.size());
    let mut stats = Buf::zeros(4 * p.stats_len());
    // V1 accumulates the output in f32 in global memory.
    let mut o_accum = (p.algorithm == Algorithm::V1).then(|| Buf::zeros(4 * n_out));
    fp.o = out.addr();
    bind_stats(&mut fp, p, &mut stats);
    if let Some(acc) = &mut o_accum {
        fp.o_accum = acc.addr();
    }
    launch(&plan::forward_launch(p, dt), &fp)?;
    Ok(Forward::read(out, &stats, dt))
}

/// The backward pass as the CUDA backend runs it.
pub fn backward(p: &AttnParams, inp: &mut Inputs, bi: BackwardInputs<'_>) -> Result<Grads> {
    let BackwardInputs { fwd, d_out, dlse } = bi;
    let dt = inp.dt;
    let (mut fp, _si, _alibi) = inp.params(p);
    let mut b = BackwardBufs::new(p, fwd, dt);
    let mut dq_accum = Buf::zeros(4 * p.q_elems());
    fp.o = fwd.out_buf.addr();
    fp.d_o = d_out.addr();
    bind_stats(&mut fp, p, &mut b.stats);
    if p.algorithm == Algorithm::V1 {
        // bwd_pre turns m ‖ l into the lse the main kernel reads.
        fp.lse = b.lse.addr();
    }
    fp.delta = b.delta.addr();
    let mut dlse = dlse.map(Buf::from_f32);
    if let Some(g) = &mut dlse {
        fp.dlse = g.addr();
    }
    if !plan::separate_dq(p) {
        fp.dq_accum = dq_accum.addr();
    }
    let [dq, dk, dv] = &mut b.grads;
    fp.dq = dq.addr();
    fp.dk = dk.addr();
    fp.dv = dv.addr();
    for l in plan::backward_launches(p, dt) {
        launch(&l, &fp)?;
    }
    Ok(Grads::read(&b.grads, dt))
}
