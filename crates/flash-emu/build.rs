//! Compiles the SIMT core (`csrc/simt.cpp`) once and each dialect's kernels against its shim
//! (`g++ -x c++ -DFLASH_EMU`): flash-ops' `kernels/cuda/*.cu` with `csrc/cuda_shim.h`, its
//! `kernels/metal/*.metal` with `csrc/msl_shim.h`. The kernel libraries are linked whole so the
//! kernels' self-registration (static constructors) is kept.
use std::path::{Path, PathBuf};

fn sources(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    v.sort();
    v
}

fn cxx() -> cc::Build {
    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++17")
        // Every GPU thread is a fiber: unoptimised, the kernels are too slow to test.
        .opt_level(2)
        .debug(false)
        .define("FLASH_EMU", None)
        .include("csrc")
        .flag("-x")
        .flag("c++")
        .flag("-Wno-unknown-pragmas");
    b
}

fn main() {
    let kernels = Path::new("../flash-ops/kernels");
    // The whole folder: the dialects share kernels/head_dims.h.
    println!("cargo:rerun-if-changed={}", kernels.display());
    println!("cargo:rerun-if-changed=csrc");
    cxx().file("csrc/simt.cpp").compile("flash_emu_simt");

    cxx()
        .include(kernels.join("cuda"))
        .file("csrc/cuda_launch.cpp")
        .files(sources(&kernels.join("cuda"), "cu"))
        .link_lib_modifier("+whole-archive")
        .compile("flash_emu_cuda");

    cxx()
        .include(kernels.join("metal"))
        // MSL attributes ([[kernel]], [[buffer(i)]]) mean nothing to g++: ignored on purpose.
        .flag("-Wno-attributes")
        // Every kernel takes all five FLASH_THREAD_ARGS, used or not.
        .flag("-Wno-unused-parameter")
        // simt.cpp's ucontext switches look like setjmp to g++ (a false positive there).
        .flag("-Wno-clobbered")
        .file("csrc/metal_launch.cpp")
        .files(sources(&kernels.join("metal"), "metal"))
        .link_lib_modifier("+whole-archive")
        .compile("flash_emu_metal");
}
