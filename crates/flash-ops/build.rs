//! With the `cuda` feature: compiles each `kernels/cuda/*.cu` (inside this crate, so a packaged
//! flash-ops builds too) to PTX with nvcc (for `CUDA_COMPUTE_CAP`), the way candle builds its
//! own kernels, and writes `flash_kernels.rs` listing them for `include_str!`. Without it:
//! nothing.
//!
//! Why nvcc at build time rather than NVRTC at run time: compile errors surface when building,
//! not at the first call on a GPU; no NVRTC library is needed where the code runs (the GPU
//! machines carry only the binaries); the PTX is exactly what the CI compile gate checks.
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    // Machines without a GPU link the CUDA tests against stub libraries (see
    // scripts/setup-cuda-toolchain.sh): their symbols stay unresolved until first use.
    println!("cargo:rerun-if-env-changed=FLASH_OPS_STUB_LINK");
    if std::env::var("FLASH_OPS_STUB_LINK").as_deref() == Ok("1") {
        for arg in [
            "-Wl,--unresolved-symbols=ignore-in-object-files",
            "-Wl,-z,lazy",
        ] {
            // Every linked target: unit tests, integration tests, binaries, benches, examples.
            println!("cargo:rustc-link-arg={arg}");
        }
    }
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let kdir = manifest.join("kernels/cuda");
    // The whole folder: the .cu files include kernels/head_dims.h.
    println!(
        "cargo:rerun-if-changed={}",
        manifest.join("kernels").display()
    );
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| {
        panic!("flash-ops cuda feature: set CUDA_COMPUTE_CAP (e.g. 80 for A100, 90 for H100)")
    });
    let cap = cap.trim().replace('.', "");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| match std::env::var("CUDA_ROOT") {
        Ok(r) if Path::new(&r).join("bin/nvcc").exists() => format!("{r}/bin/nvcc"),
        _ => "nvcc".to_string(),
    });
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&kdir)
        .expect("kernels/cuda")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    let jobs: Vec<_> = sources
        .iter()
        .map(|src| {
            let stem = src.file_stem().unwrap().to_string_lossy().to_string();
            let ptx = out.join(format!("{stem}.ptx"));
            let (nvcc, cap, src) = (nvcc.clone(), cap.clone(), src.clone());
            let handle = std::thread::spawn({
                let ptx = ptx.clone();
                move || {
                    Command::new(&nvcc)
                        .args(["--ptx", "-O3", "-std=c++17", "-lineinfo"])
                        .arg(format!("-arch=sm_{cap}"))
                        .arg("-o")
                        .arg(&ptx)
                        .arg(&src)
                        .output()
                }
            });
            (stem, ptx, handle)
        })
        .collect();
    let mut listing =
        String::from("/// (module, PTX) of every kernels/cuda/*.cu, built by build.rs.\n");
    listing.push_str("pub const MODULES: &[(&str, &str)] = &[\n");
    for (stem, ptx, handle) in jobs {
        let o = handle
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("cannot run {nvcc}: {e}"));
        if !o.status.success() {
            panic!(
                "nvcc failed on {stem}.cu:\n{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        listing.push_str(&format!(
            "    (\"{stem}\", include_str!(\"{}\")),\n",
            ptx.display()
        ));
    }
    listing.push_str("];\n");
    std::fs::write(out.join("flash_kernels.rs"), listing).unwrap();
}
