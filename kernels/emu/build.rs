//! Compiles the emulator core, the CUDA shim and every kernels/cuda/*.cu as C++ (g++ -x c++
//! -DFLASH_EMU) into one static library, linked whole so the kernels' self-registration
//! (static constructors) is kept.
use std::path::Path;

fn main() {
    let emu = Path::new(".");
    let cuda = Path::new("../cuda");
    let mut kernels: Vec<_> = std::fs::read_dir(cuda)
        .expect("kernels/cuda")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    kernels.sort();
    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++17")
        // The kernels are emulated thread by thread: unoptimised they are too slow to test.
        .opt_level(2)
        .debug(false)
        .define("FLASH_EMU", None)
        .include(emu)
        .include(cuda)
        .flag("-x")
        .flag("c++")
        .flag("-Wno-unknown-pragmas")
        .file(emu.join("simt.cpp"))
        .file(emu.join("cuda_launch.cpp"))
        .files(&kernels)
        .link_lib_modifier("+whole-archive")
        .compile("flash_emu");
    println!("cargo:rerun-if-changed=../cuda");
    println!("cargo:rerun-if-changed=simt.cpp");
    println!("cargo:rerun-if-changed=simt.h");
    println!("cargo:rerun-if-changed=cuda_shim.h");
    println!("cargo:rerun-if-changed=cuda_launch.cpp");
}
