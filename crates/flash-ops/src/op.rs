//! The Candle custom ops: the forward op that takes part in autograd, and the backward op it
//! calls from `bwd`.
//!
//! # Getting the saved statistics to backward
//! `CustomOp3::bwd` receives q, k, v, the output and its gradient, but not the log-sum-exp the
//! forward produced. Each call of [`crate::flash_attn`] creates a fresh [`FlashAttnFwd`], and the
//! autograd graph keeps that very instance (behind an `Arc`) as the output's op. So forward
//! stores its statistics in the op itself (a `OnceLock<Tensor>`, f32, on the inputs' device) and
//! `bwd` reads them from `self`: nothing is recomputed, the output keeps its dtype and shape (a
//! packed output would have to carry an f32 log-sum-exp inside an f16/bf16 tensor), and the
//! statistics live exactly as long as the graph node that needs them.
//!
//! `bwd` itself runs [`FlashAttnBwd`], a second custom op without backward over (q, k, v) that
//! holds the output, its gradient and the statistics, and returns `dq ‖ dk ‖ dv` in one buffer
//! that is split by narrowing (no copy).

use std::sync::{Arc, OnceLock};

use candle_core::op::BackpropOp;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};

use crate::cpu;
use crate::params::AttnParams;

/// What backward reads besides q, k, v, on a backend whose storage is `S`: the forward output
/// and its gradient (contiguous `(total_q, hq, d)`) and the saved statistics, each with its
/// start offset in elements.
pub struct BackwardInputs<'a, S> {
    pub out: (&'a S, usize),
    pub grad_out: (&'a S, usize),
    pub stats: (&'a S, usize),
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
    /// with the op's output shape. Every backend's forward returns `(out, stats)`.
    fn finish<S>(&self, (out, stats): (S, S), wrap: fn(S) -> Storage) -> (S, Shape) {
        let len = self.params.stats_len();
        let t = Tensor::from_storage(wrap(stats), len, BackpropOp::none(), false);
        // A fresh op per call: the cell is empty unless the same op is run twice, in which case
        // the first statistics are as valid as the second.
        let _ = self.stats.set(t);
        (out, Shape::from(self.params.out_dims()))
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
        let bwd = FlashAttnBwd {
            params: self.params.clone(),
            out: out.contiguous()?,
            grad_out: grad_out.contiguous()?,
            stats: stats.clone(),
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
        let (Some(o), Some(d_o), Some(st)) = (pick(&o), pick(&d_o), pick(&st)) else {
            bail!("flash_attn backward: output, gradient and statistics must be on the {device}")
        };
        let grads = f(BackwardInputs {
            out: (o, o_layout.start_offset()),
            grad_out: (d_o, do_layout.start_offset()),
            stats: (st, st_layout.start_offset()),
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
