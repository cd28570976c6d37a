//! The Candle custom ops: the forward op that takes part in autograd, and the backward op it
//! calls from `bwd`.
//!
//! # Getting the saved statistics to backward
//! `CustomOp3::bwd` receives q, k, v, the output and its gradient, but not the log-sum-exp the
//! forward produced. Each call of [`crate::flash_attn`] creates a fresh [`FlashAttnFwd`], and the
//! autograd graph keeps that very instance (behind an `Arc`) as the output's op. So forward
//! stores its statistics in the op itself (a `OnceLock<Tensor>`, f32, on the inputs' device) and
//! `bwd` reads them from `self`: nothing is recomputed, the statistics stay f32 whatever the
//! output dtype, and they live exactly as long as the graph node that needs them.
//!
//! # The gradient of the log-sum-exp
//! The `_with_lse` entry points return an lse that is differentiable: with `L` depending on
//! both, `dS = P ∘ (dP − (D − dlse))`, `D = rowsum(dO ∘ O)` (the lse of a row is
//! `log Σⱼ exp sⱼ`, whose gradient `dlse·P` folds into the softmax gradient's row term). A custom
//! op has one output and `bwd` one gradient, so for those entry points (`AttnParams::lse_grad`)
//! the op's output is 1-D, `out ‖ slot`: the attention output, then `lse_len` zeros in the same
//! dtype. `out` is a narrow of it (reshaped, no copy) and the lse is the f32 statistic plus the
//! slot widened to f32: its value is the exact f32 log-sum-exp (an f16 output never rounds it),
//! and its gradient arrives in the slot. When the loss uses both, Candle sums both narrows'
//! gradients into the one output gradient, so backward runs **once**, reading dO and dlse (dlse
//! in the output dtype, as dO is, widened to f32 for the kernels; zeros when the lse is unused).
//! Every backend subtracts dlse where it forms D (CPU schedules, CUDA and Metal `bwd_pre`).
//!
//! `bwd` itself runs [`FlashAttnBwd`], a second custom op without backward over (q, k, v) that
//! holds the output, its gradient, dlse and the statistics, and returns `dq ‖ dk ‖ dv` in one
//! buffer that is split by narrowing (no copy).

use std::sync::{Arc, OnceLock};

use candle_core::op::BackpropOp;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};

use crate::cpu;
use crate::params::AttnParams;

/// A backend's storage type: how it enters and leaves Candle's [`Storage`], and the name of its
/// device in errors. One impl per backend, so the op's entry points differ only in the module
/// they call.
trait BackendStorage: Sized {
    const DEVICE: &'static str;
    fn wrap(self) -> Storage;
    fn pick(s: &Storage) -> Option<&Self>;
}

/// `impl BackendStorage for $S` as the `Storage::$variant` of device `$device`.
macro_rules! backend_storage {
    ($(#[$attr:meta])* $S:ty, $variant:ident, $device:literal) => {
        $(#[$attr])*
        impl BackendStorage for $S {
            const DEVICE: &'static str = $device;
            fn wrap(self) -> Storage {
                Storage::$variant(self)
            }
            fn pick(s: &Storage) -> Option<&Self> {
                match s {
                    Storage::$variant(s) => Some(s),
                    _ => None,
                }
            }
        }
    };
}

backend_storage!(CpuStorage, Cpu, "cpu");
backend_storage!(
    #[cfg(feature = "cuda")]
    candle_core::CudaStorage,
    Cuda,
    "gpu"
);
backend_storage!(
    #[cfg(all(feature = "metal", target_os = "macos"))]
    candle_core::MetalStorage,
    Metal,
    "metal device"
);

/// One of `CustomOp3`'s per-backend entry points (`cpu_fwd`, `cuda_fwd`, `metal_fwd`) over
/// storage `$S`: its six arguments become the `(storage, layout)` pairs of q, k and v, the form
/// every backend module takes, bound to `$ops` with the op as `$op` in `$body`.
macro_rules! backend_entry {
    ($(#[$attr:meta])* $name:ident, $S:ty, |$op:ident, $ops:pat_param| $body:expr) => {
        $(#[$attr])*
        fn $name(
            &self,
            s1: &$S,
            l1: &Layout,
            s2: &$S,
            l2: &Layout,
            s3: &$S,
            l3: &Layout,
        ) -> Result<($S, Shape)> {
            let $op = self;
            let $ops = ((s1, l1), (s2, l2), (s3, l3));
            $body
        }
    };
}

/// What backward reads besides q, k, v, on a backend whose storage is `S`: the forward output
/// and its gradient (contiguous `(total_q, hq, d)`), the saved statistics and, when the
/// log-sum-exp has a gradient, `dlse` (f32, in the log-sum-exp layout), each with its start
/// offset in elements. Backward's row term is `D − dlse`.
pub struct BackwardInputs<'a, S> {
    pub out: (&'a S, usize),
    pub grad_out: (&'a S, usize),
    pub stats: (&'a S, usize),
    pub dlse: Option<(&'a S, usize)>,
}

/// The differentiable attention op. `stats` is filled by the forward pass.
pub struct FlashAttnFwd {
    pub params: Arc<AttnParams>,
    pub stats: Arc<OnceLock<Tensor>>,
}

impl FlashAttnFwd {
    pub fn new(params: AttnParams) -> Self {
        Self {
            params: Arc::new(params),
            stats: Arc::new(OnceLock::new()),
        }
    }

    /// Keeps a backend's statistics and returns its output with the op's output shape
    /// (`out ‖ slot`, 1-D, with `lse_grad`). Every backend's forward returns `(out, stats)`.
    fn finish<S: BackendStorage>(&self, (out, stats): (S, S)) -> (S, Shape) {
        let p = &self.params;
        let t = Tensor::from_storage(stats.wrap(), p.stats_len(), BackpropOp::none(), false);
        // A fresh op per call: the cell is empty unless the same op is run twice, in which case
        // the first statistics are as valid as the second.
        let _ = self.stats.set(t);
        let shape = if p.lse_grad {
            Shape::from(p.out_len())
        } else {
            Shape::from(p.out_dims())
        };
        (out, shape)
    }
}

impl CustomOp3 for FlashAttnFwd {
    fn name(&self) -> &'static str {
        "flash-attn"
    }

    backend_entry!(cpu_fwd, CpuStorage, |op, (q, k, v)| {
        Ok(op.finish(cpu::forward(&op.params, q, k, v)?))
    });
    backend_entry!(
        #[cfg(feature = "cuda")]
        cuda_fwd,
        candle_core::CudaStorage,
        |op, (q, k, v)| Ok(op.finish(crate::cuda::forward(&op.params, q, k, v)?))
    );
    backend_entry!(
        #[cfg(all(feature = "metal", target_os = "macos"))]
        metal_fwd,
        candle_core::MetalStorage,
        |op, (q, k, v)| Ok(op.finish(crate::metal::forward(&op.params, q, k, v)?))
    );

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(stats) = self.stats.get() else {
            bail!("flash_attn backward: the forward statistics are missing")
        };
        let p = &self.params;
        let (out, grad_out, dlse) = if p.lse_grad {
            let (nq, n) = (p.q_elems(), p.lse_len());
            let dlse = grad_out.narrow(0, nq, n)?.to_dtype(DType::F32)?;
            let (o, d_o) = (out.narrow(0, 0, nq)?, grad_out.narrow(0, 0, nq)?);
            (o, d_o, Some(dlse.contiguous()?))
        } else {
            (out.clone(), grad_out.clone(), None)
        };
        let bwd = FlashAttnBwd {
            params: self.params.clone(),
            out: out.contiguous()?,
            grad_out: grad_out.contiguous()?,
            stats: stats.clone(),
            dlse,
        };
        let packed = q.apply_op3_no_bwd(k, v, &bwd)?;
        let (nq, nk) = (self.params.q_elems(), self.params.k_elems());
        let dq = packed.narrow(0, 0, nq)?.reshape(q.shape())?;
        let dk = packed.narrow(0, nq, nk)?.reshape(k.shape())?;
        let dv = packed.narrow(0, nq + nk, nk)?.reshape(v.shape())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The backward pass as a custom op over (q, k, v); no backward of its own.
pub struct FlashAttnBwd {
    pub params: Arc<AttnParams>,
    pub out: Tensor,
    pub grad_out: Tensor,
    pub stats: Tensor,
    /// The log-sum-exp's gradient (f32, contiguous), when it has one.
    pub dlse: Option<Tensor>,
}

impl FlashAttnBwd {
    /// Runs a backend's backward on the output, its gradient and the statistics, unpacked from
    /// their tensors as the backend's storage `S`. Returns the packed `dq ‖ dk ‖ dv` and its
    /// shape.
    fn run<S, F>(&self, f: F) -> Result<(S, Shape)>
    where
        S: BackendStorage,
        F: FnOnce(BackwardInputs<S>) -> Result<S>,
    {
        let (pick, device) = (S::pick, S::DEVICE);
        let (o, o_layout) = self.out.storage_and_layout();
        let (d_o, do_layout) = self.grad_out.storage_and_layout();
        let (st, st_layout) = self.stats.storage_and_layout();
        let dl = self.dlse.as_ref().map(|t| t.storage_and_layout());
        let (Some(o), Some(d_o), Some(st)) = (pick(&o), pick(&d_o), pick(&st)) else {
            bail!("flash_attn backward: output, gradient and statistics must be on the {device}")
        };
        let dlse = match &dl {
            None => None,
            Some((s, l)) => match pick(s) {
                Some(s) => Some((s, l.start_offset())),
                None => bail!("flash_attn backward: the lse gradient must be on the {device}"),
            },
        };
        let grads = f(BackwardInputs {
            out: (o, o_layout.start_offset()),
            grad_out: (d_o, do_layout.start_offset()),
            stats: (st, st_layout.start_offset()),
            dlse,
        })?;
        let p = &self.params;
        Ok((grads, Shape::from(p.q_elems() + 2 * p.k_elems())))
    }
}

impl CustomOp3 for FlashAttnBwd {
    fn name(&self) -> &'static str {
        "flash-attn-bwd"
    }

    backend_entry!(cpu_fwd, CpuStorage, |op, (q, k, v)| {
        op.run(|inputs| cpu::backward(&op.params, q, k, v, inputs))
    });
    backend_entry!(
        #[cfg(feature = "cuda")]
        cuda_fwd,
        candle_core::CudaStorage,
        |op, (q, k, v)| op.run(|inputs| crate::cuda::backward(&op.params, q, k, v, inputs))
    );
    backend_entry!(
        #[cfg(all(feature = "metal", target_os = "macos"))]
        metal_fwd,
        candle_core::MetalStorage,
        |op, (q, k, v)| op.run(|inputs| crate::metal::backward(&op.params, q, k, v, inputs))
    );
}
