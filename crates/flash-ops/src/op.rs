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

    /// Keeps a backend's statistics (`wrap` makes them a [`Storage`]) and returns its output
    /// with the op's output shape (`out ‖ slot`, 1-D, with `lse_grad`). Every backend's forward
    /// returns `(out, stats)`.
    fn finish<S>(&self, (out, stats): (S, S), wrap: fn(S) -> Storage) -> (S, Shape) {
        let p = &self.params;
        let t = Tensor::from_storage(wrap(stats), p.stats_len(), BackpropOp::none(), false);
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

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let res = cpu::forward(&self.params, (s1, l1), (s2, l2), (s3, l3))?;
        Ok(self.finish(res, Storage::Cpu))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let res = crate::cuda::forward(&self.params, (s1, l1), (s2, l2), (s3, l3))?;
        Ok(self.finish(res, Storage::Cuda))
    }

    #[cfg(all(feature = "metal", target_os = "macos"))]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
        s3: &candle_core::MetalStorage,
        l3: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        let res = crate::metal::forward(&self.params, (s1, l1), (s2, l2), (s3, l3))?;
        Ok(self.finish(res, Storage::Metal))
    }

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
    /// their tensors by `pick` (the backend's [`Storage`] variant; `device` names it in the
    /// error). Returns the packed `dq ‖ dk ‖ dv` and its shape.
    fn run<S, F>(&self, device: &str, pick: fn(&Storage) -> Option<&S>, f: F) -> Result<(S, Shape)>
    where
        F: FnOnce(BackwardInputs<S>) -> Result<S>,
    {
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

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run(
            "cpu",
            |s| match s {
                Storage::Cpu(s) => Some(s),
                _ => None,
            },
            |inputs| cpu::backward(&self.params, (s1, l1), (s2, l2), (s3, l3), inputs),
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.run(
            "gpu",
            |s| match s {
                Storage::Cuda(s) => Some(s),
                _ => None,
            },
            |inputs| crate::cuda::backward(&self.params, (s1, l1), (s2, l2), (s3, l3), inputs),
        )
    }

    #[cfg(all(feature = "metal", target_os = "macos"))]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
        s3: &candle_core::MetalStorage,
        l3: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        self.run(
            "metal device",
            |s| match s {
                Storage::Metal(s) => Some(s),
                _ => None,
            },
            |inputs| crate::metal::backward(&self.params, (s1, l1), (s2, l2), (s3, l3), inputs),
        )
    }
}
