//! Peak memory of one call: heap bytes through a counting global allocator on the CPU, the
//! memory pool's high-water mark on CUDA.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{Device, Result};

/// A counting global allocator: install it with
/// `#[global_allocator] static A: flash_ops_bench::PeakAlloc = flash_ops_bench::PeakAlloc;`
/// to make [`peak_extra`] measure heap peaks.
pub struct PeakAlloc;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, only counting bytes.
unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

/// Runs `f` once and returns the peak heap bytes it added above what was live before (zero
/// unless [`PeakAlloc`] is the global allocator).
pub fn peak_extra<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed).saturating_sub(base))
}

/// Runs `f` once and returns the peak bytes it added on `dev` above what was live before: heap
/// bytes on the CPU (needs [`PeakAlloc`] installed), the high-water mark of the stream-ordered
/// memory pool Candle allocates from on CUDA, `None` on Metal.
pub fn peak_extra_on<T>(dev: &Device, f: impl FnOnce() -> Result<T>) -> Result<(T, Option<usize>)> {
    match dev {
        Device::Cpu => {
            let (out, peak) = peak_extra(f);
            Ok((out?, Some(peak)))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            dev.synchronize()?;
            let base = crate::cuda_pool::reset_peak(d)?;
            let out = f()?;
            dev.synchronize()?;
            let peak = crate::cuda_pool::peak(d)?;
            Ok((out, Some(peak.saturating_sub(base) as usize)))
        }
        _ => Ok((f()?, None)),
    }
}

/// Keeps freed memory in the process for the next call or step (glibc): what `train` runs with,
/// and what every timed loop here should run with. Buffers above glibc's mmap threshold (at most
/// 32 MiB) are otherwise mapped fresh and unmapped on every allocation, so each repeat faults in
/// every page of its large outputs and temporaries again (the embedding-sized gradients of a
/// training step, 154 MB each at GPT-2 small; attention's dQ partials and outputs at long N), and
/// the kernel's page clearing is timed as if it were the computation. A GPU caching allocator
/// (PyTorch's, Candle's CUDA pool) reuses memory the same way. Without mmap, freed blocks stay in
/// the heap and the next allocation reuses them.
pub fn reuse_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before the timed allocations.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
