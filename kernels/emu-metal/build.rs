//! Compiles the emulator core (kernels/emu/simt.cpp, shared with the CUDA harness), the Metal
//! launch entry point and every kernels/metal/*.metal as C++ (g++ -x c++ -DFLASH_EMU, against
//! kernels/emu/msl_shim.h) into one static library, linked whole so the kernels'
//! self-registration (static constructors) is kept.
use std::path::Path;

fn main() {
    let emu = Path::new("../emu");
    let metal = Path::new("../metal");
    let mut kernels: Vec<_> = std::fs::read_dir(metal)
        .expect("kernels/metal")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "metal"))
        .collect();
    kernels.sort();
    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++17")
        // Every Metal thread is a fiber: unoptimised, the kernels are too slow to test.
        .opt_level(2)
        .debug(false)
        .define("FLASH_EMU", None)
        .include(emu)
        .include(metal)
        .flag("-x")
        .flag("c++")
        // MSL attributes ([[kernel]], [[buffer(i)]]) mean nothing to g++: ignored on purpose.
        .flag("-Wno-attributes")
        // Every kernel takes all five FLASH_THREAD_ARGS, used or not.
        .flag("-Wno-unused-parameter")
        // simt.cpp's ucontext switches look like setjmp to g++ (a false positive there).
        .flag("-Wno-clobbered")
        .flag("-Wno-unknown-pragmas")
        .file(emu.join("simt.cpp"))
        .file("metal_launch.cpp")
        .files(&kernels)
        .link_lib_modifier("+whole-archive")
        .compile("flash_emu_metal");
    println!("cargo:rerun-if-changed=../metal");
    println!("cargo:rerun-if-changed=../emu/simt.cpp");
    println!("cargo:rerun-if-changed=../emu/simt.h");
    println!("cargo:rerun-if-changed=../emu/msl_shim.h");
    println!("cargo:rerun-if-changed=metal_launch.cpp");
}
