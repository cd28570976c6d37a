//! Peak device memory on CUDA: Candle allocates through cudarc's stream-ordered
//! `cuMemAllocAsync` from the device's current memory pool where the device supports pools, and
//! the pool's high-water mark counts every byte in use at once.

use std::ffi::c_void;

use candle_core::cuda_backend::cudarc::driver::result::{device, mem_pool};
use candle_core::cuda_backend::cudarc::driver::sys::{CUmemPool_attribute as Attr, CUmemoryPool};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{bail, Result};

fn pool(dev: &CudaDevice) -> Result<CUmemoryPool> {
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    if !ctx.has_async_alloc() {
        bail!("peak device memory needs memory pools (cuMemAllocAsync); this device has none")
    }
    ctx.bind_to_thread().w()?;
    // SAFETY: the device handle comes from the live context.
    unsafe { device::get_mem_pool(ctx.cu_device()) }.w()
}

fn get(pool: CUmemoryPool, attr: Attr) -> Result<u64> {
    let mut v = 0u64;
    // SAFETY: both attributes read here are cuuint64_t.
    unsafe { mem_pool::get_attribute(pool, attr, &mut v as *mut u64 as *mut c_void) }.w()?;
    Ok(v)
}

/// Resets the pool's high-water mark (the driver only allows zero) and returns the bytes in
/// use now: the baseline to subtract from [`peak`].
pub fn reset_peak(dev: &CudaDevice) -> Result<u64> {
    let p = pool(dev)?;
    let mut zero = 0u64;
    // SAFETY: USED_MEM_HIGH is a cuuint64_t.
    unsafe {
        mem_pool::set_attribute(
            p,
            Attr::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            &mut zero as *mut u64 as *mut c_void,
        )
    }
    .w()?;
    get(p, Attr::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
}

/// The most bytes in use at once since [`reset_peak`].
pub fn peak(dev: &CudaDevice) -> Result<u64> {
    get(pool(dev)?, Attr::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
}
