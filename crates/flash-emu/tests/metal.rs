//! The Metal kernels (kernels/metal/*.metal), run by the SIMT emulator through the MSL shim
//! against the f64 reference: the same cases as the CUDA kernels' emulated tests
//! (`shared/mod.rs`), with tolerances of their own.

use candle_core::DType;
use flash_emu::metal as emu;

mod shared;

pub fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 2e-5,
        DType::F16 => 4e-3,
        _ => 3e-2,
    }
}
