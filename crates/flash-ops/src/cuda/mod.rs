//! CUDA backend: launches the kernels of `kernels/cuda` (FlashAttention-2 and the
//! FlashAttention V1 schedule, forward and backward) on Candle's stream.
//!
//! The kernels are compiled to PTX by nvcc in `build.rs` and loaded once per device through
//! `CudaDevice::get_or_load_custom_func`. Which kernels run, with which grids and parameters,
//! is decided in `crate::plan::cuda`, which has no CUDA types so the SIMT emulator (`flash-emu`)
//! runs the very same plan.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout, Result};
use half::{bf16, f16};

use crate::op::BackwardInputs;
use crate::params::AttnParams;
use crate::plan::{cuda as plan, Dt, InputLayout};
use crate::Algorithm;

use plan::{FlashParams, Launch};

mod ptx {
    include!(concat!(env!("OUT_DIR"), "/flash_kernels.rs"));
}

// SAFETY: `FlashParams` is `#[repr(C)]`, plain old data, and mirrors the C struct the kernels
// take by value.
unsafe impl DeviceRepr for FlashParams {}

/// Kernel `flash_<module>_<dtype>...` lives in the PTX module of `kernels/cuda/<module>.cu`.
fn module_of(name: &str) -> Result<(&'static str, &'static str)> {
    let rest = name.strip_prefix("flash_").unwrap_or(name);
    ptx::MODULES
        .iter()
        .filter(|(m, _)| rest.starts_with(&format!("{m}_")))
        .max_by_key(|(m, _)| m.len())
        .copied()
        .ok_or_else(|| candle_core::Error::Msg(format!("flash_attn: no CUDA module for {name}")))
}

fn launch(dev: &CudaDevice, l: &Launch, p: &FlashParams) -> Result<()> {
    let (module, ptx) = module_of(&l.name)?;
    let f = dev.get_or_load_custom_func(&l.name, &format!("flash_ops_{module}"), ptx)?;
    if l.smem > 48 * 1024 {
        // Above 48 KiB, dynamic shared memory must be opted into per function.
        f.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            l.smem as i32,
        )
        .w()?;
    }
    let cfg = LaunchConfig {
        grid_dim: (l.grid[0], l.grid[1], l.grid[2]),
        block_dim: (l.block, 1, 1),
        shared_mem_bytes: l.smem,
    };
    let mut b = f.builder();
    b.arg(p);
    // SAFETY: every pointer in `p` points into a live allocation sized by the plan, and the
    // kernel's parameter is this struct.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

fn dt_of(d: DType) -> Result<Dt> {
    Dt::of(d, "the CUDA kernels")
}

/// Raw device address of a storage's buffer, plus `offset` elements.
fn addr(s: &CudaStorage, offset: usize) -> Result<u64> {
    fn go<T: CudaDType>(s: &CudaStorage, offset: usize) -> Result<u64> {
        let slice: &CudaSlice<T> = T::as_cuda_slice(s)?;
        let stream = s.device.cuda_stream();
        let (ptr, _sync) = slice.device_ptr(&stream);
        Ok(ptr + (offset * std::mem::size_of::<T>()) as u64)
    }
    match s.dtype() {
        DType::F32 => go::<f32>(s, offset),
        DType::F16 => go::<f16>(s, offset),
        DType::BF16 => go::<bf16>(s, offset),
        DType::I64 => go::<i64>(s, offset),
        DType::U32 => go::<u32>(s, offset),
        d => bail!("flash_attn: unexpected dtype {d:?} on the CUDA path"),
    }
}

fn zeros(dev: &CudaDevice, dt: DType, n: usize) -> Result<CudaStorage> {
    let n = n.max(1);
    Ok(match dt {
        DType::F32 => f32::wrap_cuda_slice(dev.alloc_zeros::<f32>(n)?, dev.clone()),
        DType::F16 => f16::wrap_cuda_slice(dev.alloc_zeros::<f16>(n)?, dev.clone()),
        DType::BF16 => bf16::wrap_cuda_slice(dev.alloc_zeros::<bf16>(n)?, dev.clone()),
        DType::I64 => i64::wrap_cuda_slice(dev.alloc_zeros::<i64>(n)?, dev.clone()),
        d => bail!("flash_attn: unexpected dtype {d:?}"),
    })
}

/// Parameters with the inputs, per-sequence records and ALiBi slopes filled in. The returned
/// storages own the uploaded tables and must outlive the launches.
fn common(
    p: &AttnParams,
    dev: &CudaDevice,
    (q, lq): (&CudaStorage, &Layout),
    (k, lk): (&CudaStorage, &Layout),
    (v, lv): (&CudaStorage, &Layout),
) -> Result<(FlashParams, Vec<CudaStorage>)> {
    let dt = dt_of(q.dtype())?;
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        bail!(
            "flash_attn: q, k, v must share one dtype among f32, f16, bf16, got {:?}, {:?}, {:?}",
            q.dtype(),
            k.dtype(),
            v.dtype()
        )
    }
    let (il_q, il_k, il_v) = (
        InputLayout::checked("q", lq, p.head_dim)?,
        InputLayout::checked("k", lk, p.head_dim)?,
        InputLayout::checked("v", lv, p.head_dim)?,
    );
    // Refused before anything is uploaded or launched: a block size the kernels cannot tile.
    let mask = plan::block_mask(p, dt)?;
    let info = plan::seq_info(p, &il_q, &il_k, &il_v);
    let mut fp = plan::base_params(p, dt, [&il_q, &il_k, &il_v], &info);
    let info = i64::wrap_cuda_slice(dev.clone_htod(&info)?, dev.clone());
    fp.seq_info = addr(&info, 0)?;
    let mut keep = vec![info];
    if let Some((dims, lists)) = mask {
        // The block lists, once per call, as one buffer (offsets in `mask_dims`).
        let m = u32::wrap_cuda_slice(dev.clone_htod(&lists)?, dev.clone());
        fp.mask = addr(&m, 0)?;
        fp.mask_dims = dims;
        keep.push(m);
    }
    if let Some(a) = &p.alibi {
        let a = f32::wrap_cuda_slice(dev.clone_htod(a)?, dev.clone());
        fp.alibi = addr(&a, 0)?;
        keep.push(a);
    }
    fp.q = addr(q, 0)?;
    fp.k = addr(k, 0)?;
    fp.v = addr(v, 0)?;
    Ok((fp, keep))
}

/// Forward: the output `(total_q, hq, d)` and the statistics (f32,
/// [`AttnParams::stats_len`]: V2 lse; V1 m ‖ l).
pub fn forward(
    p: &AttnParams,
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
) -> Result<(CudaStorage, CudaStorage)> {
    let dev = q.0.device.clone();
    let (mut fp, _keep) = common(p, &dev, q, k, v)?;
    let dt = dt_of(q.0.dtype())?;
    let n_out = p.q_elems();
    // Zeroed, so the lse-gradient slot after the output (`lse_grad`) holds zeros.
    let out = zeros(&dev, q.0.dtype(), p.out_len())?;
    let stats = zeros(&dev, DType::F32, p.stats_len())?;
    fp.o = addr(&out, 0)?;
    let _o_accum = match p.algorithm {
        Algorithm::V2 => {
            fp.lse = addr(&stats, 0)?;
            None
        }
        Algorithm::V1 => {
            let acc = zeros(&dev, DType::F32, n_out)?;
            fp.m_l = addr(&stats, 0)?;
            fp.o_accum = addr(&acc, 0)?;
            Some(acc)
        }
    };
    launch(&dev, &plan::forward_launch(p, dt), &fp)?;
    Ok((out, stats))
}

/// Backward: `dq ‖ dk ‖ dv` flattened into one buffer of the inputs' dtype.
pub fn backward(
    p: &AttnParams,
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
    bi: BackwardInputs<CudaStorage>,
) -> Result<CudaStorage> {
    let dev = q.0.device.clone();
    let (mut fp, _keep) = common(p, &dev, q, k, v)?;
    let dt = dt_of(q.0.dtype())?;
    if bi.out.0.dtype() != q.0.dtype() || bi.grad_out.0.dtype() != q.0.dtype() {
        bail!(
            "flash_attn backward: q, k, v, output and its gradient must share one dtype, got {:?}, {:?}",
            q.0.dtype(),
            bi.grad_out.0.dtype()
        )
    }
    let (nq, nk) = (p.q_elems(), p.k_elems());
    let n = p.lse_len();
    let grads = zeros(&dev, q.0.dtype(), nq + 2 * nk)?;
    let delta = zeros(&dev, DType::F32, n)?;
    fp.o = addr(bi.out.0, bi.out.1)?;
    fp.d_o = addr(bi.grad_out.0, bi.grad_out.1)?;
    let stats = addr(bi.stats.0, bi.stats.1)?;
    let _lse = match p.algorithm {
        Algorithm::V2 => {
            fp.lse = stats;
            None
        }
        Algorithm::V1 => {
            let lse = zeros(&dev, DType::F32, n)?;
            fp.m_l = stats;
            fp.lse = addr(&lse, 0)?;
            Some(lse)
        }
    };
    fp.delta = addr(&delta, 0)?;
    if let Some((g, off)) = bi.dlse {
        fp.dlse = addr(g, off)?;
    }
    // Kept alive until the launches below are queued; none when bwd_dq writes dQ itself.
    let _dq_accum = if plan::separate_dq(p) {
        None
    } else {
        let acc = zeros(&dev, DType::F32, nq)?;
        fp.dq_accum = addr(&acc, 0)?;
        Some(acc)
    };
    fp.dq = addr(&grads, 0)?;
    fp.dk = addr(&grads, nq)?;
    fp.dv = addr(&grads, nq + nk)?;
    for l in plan::backward_launches(p, dt) {
        launch(&dev, &l, &fp)?;
    }
    Ok(grads)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Storage, Tensor};

    /// The hardware's ldmatrix / mma.sync (and the f32 shuffle path) against plain matrix
    /// products, through the probe kernel the emulator runs too (flash-emu tests): if both
    /// match the same products, the emulated fragment layouts are the hardware's.
    #[test]
    fn mma_probe_matches_matmul() -> Result<()> {
        let dev = match Device::new_cuda(0) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("no CUDA device, skipping: {e}");
                return Ok(());
            }
        };
        let Device::Cuda(cdev) = &dev else {
            unreachable!()
        };
        for (dtype, dt) in [
            (DType::F16, Dt::F16),
            (DType::BF16, Dt::Bf16),
            (DType::F32, Dt::F32),
        ] {
            let a = Tensor::randn(0f32, 1.0, (16, 16), &dev)?.to_dtype(dtype)?;
            let b = Tensor::randn(0f32, 1.0, (16, 16), &dev)?.to_dtype(dtype)?;
            let out = zeros(cdev, DType::F32, 4 * 256)?;
            let (sa, _) = a.storage_and_layout();
            let (sb, _) = b.storage_and_layout();
            let (Storage::Cuda(sa), Storage::Cuda(sb)) = (&*sa, &*sb) else {
                unreachable!()
            };
            let fp = FlashParams {
                q: addr(sa, 0)?,
                k: addr(sb, 0)?,
                dq_accum: addr(&out, 0)?,
                ..Default::default()
            };
            launch(cdev, &plan::probe_launch(dt), &fp)?;
            let got = Tensor::from_storage(
                Storage::Cuda(out),
                4 * 256,
                candle_core::op::BackpropOp::none(),
                false,
            )
            .to_vec1::<f32>()?;
            let af: Vec<f32> = a.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let bf: Vec<f32> = b.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            plan::probe_check(dt, &af, &bf, &got)?;
        }
        Ok(())
    }
}
