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
