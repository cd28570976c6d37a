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

    fn out_shape(&self) -> Shape {
        let p = &self.params;
        match p.dense {
            Some((sq, _)) => Shape::from((p.batch(), sq, p.heads_q, p.head_dim)),
            None => Shape::from((p.total_q, p.heads_q, p.head_dim)),
        }
    }

    fn save_stats(&self, storage: Storage, len: usize) {
        let t = Tensor::from_storage(storage, len, BackpropOp::none(), false);
        // A fresh op per call: the cell is empty unless the same op is run twice, in which case
        // the first statistics are as valid as the second.
        let _ = self.stats.set(t);
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
        let (out, stats) = cpu::forward(&self.params, s1, l1, s2, l2, s3, l3)?;
        let len = stats.len();
        self.save_stats(Storage::Cpu(CpuStorage::F32(stats)), len);
        Ok((out, self.out_shape()))
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
        let (out, stats, len) = crate::cuda::forward(&self.params, (s1, l1), (s2, l2), (s3, l3))?;
        self.save_stats(Storage::Cuda(stats), len);
        Ok((out, self.out_shape()))
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
        let (out, stats) = crate::metal::forward(&self.params, (s1, l1), (s2, l2), (s3, l3))?;
        let len = crate::plan::metal::stats_len(&self.params);
        self.save_stats(Storage::Metal(stats), len);
        Ok((out, self.out_shape()))
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
        let p = &self.params;
        let nq = p.total_q * p.heads_q * p.head_dim;
        let nk = p.total_k * p.heads_k * p.head_dim;
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
    fn packed_len(&self) -> usize {
        let p = &self.params;
        (p.total_q * p.heads_q + 2 * p.total_k * p.heads_k) * p.head_dim
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
        let (o, o_layout) = self.out.storage_and_layout();
        let (d_o, do_layout) = self.grad_out.storage_and_layout();
        let (st, st_layout) = self.stats.storage_and_layout();
        let (Storage::Cpu(o), Storage::Cpu(d_o), Storage::Cpu(st)) = (&*o, &*d_o, &*st) else {
            bail!("flash_attn backward: output, gradient and statistics must be on the cpu")
        };
        let stats = &st.as_slice::<f32>()?[st_layout.start_offset()..];
        let grads = cpu::backward(
            &self.params,
            s1,
            l1,
            s2,
            l2,
            s3,
            l3,
            cpu::BackwardInputs {
                out: o,
                out_offset: o_layout.start_offset(),
                grad_out: d_o,
                grad_offset: do_layout.start_offset(),
                stats,
            },
        )?;
        Ok((grads, Shape::from(self.packed_len())))
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
        let (o, o_layout) = self.out.storage_and_layout();
        let (d_o, do_layout) = self.grad_out.storage_and_layout();
        let (st, st_layout) = self.stats.storage_and_layout();
        let (Storage::Cuda(o), Storage::Cuda(d_o), Storage::Cuda(st)) = (&*o, &*d_o, &*st) else {
            bail!("flash_attn backward: output, gradient and statistics must be on the gpu")
        };
        let grads = crate::cuda::backward(
            &self.params,
            (s1, l1),
            (s2, l2),
            (s3, l3),
            crate::cuda::BackwardInputs {
                out: (o, o_layout.start_offset()),
                grad_out: (d_o, do_layout.start_offset()),
                stats: (st, st_layout.start_offset()),
            },
        )?;
        Ok((grads, Shape::from(self.packed_len())))
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
        let (o, o_layout) = self.out.storage_and_layout();
        let (d_o, do_layout) = self.grad_out.storage_and_layout();
        let (st, st_layout) = self.stats.storage_and_layout();
        let (Storage::Metal(o), Storage::Metal(d_o), Storage::Metal(st)) = (&*o, &*d_o, &*st)
        else {
            bail!(
                "flash_attn backward: output, gradient and statistics must be on the metal device"
            )
        };
        let grads = crate::metal::backward(
            &self.params,
            (s1, l1),
            (s2, l2),
            (s3, l3),
            crate::metal::BackwardInputs {
                out: (o, o_layout.start_offset()),
                grad_out: (d_o, do_layout.start_offset()),
                stats: (st, st_layout.start_offset()),
            },
        )?;
        Ok((grads, Shape::from(self.packed_len())))
    }
}
