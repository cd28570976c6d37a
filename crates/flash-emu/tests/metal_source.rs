//! The one MSL string the Metal backend compiles (`flash_ops::plan::metal_source`): no
//! local includes left, every kernel file in it, and — compiled as C++ against the MSL shim —
//! one well-formed translation unit defining every kernel the launch plan dispatches.

use std::process::Command;

use flash_emu::metal::plan::{self, HEAD_DIMS};
use flash_emu::metal::source::msl_source;
use flash_emu::Dt;

#[test]
fn assembled_source_is_one_translation_unit() {
    let src = msl_source();
    assert!(!src
        .lines()
        .any(|l| l.trim_start().starts_with("#include \"")));
    for f in [
        "flash_metal.h",
        "fwd.metal",
        "bwd_pre.metal",
        "bwd_dq.metal",
        "bwd_dkdv.metal",
    ] {
        assert!(
            src.contains(&format!("// ---- kernels/metal/{f}")),
            "{f} missing"
        );
    }
    // Every entry point the plan names is instantiated (FLASH_INSTANCE(name, ...)).
    let mut names = vec![];
    for dt in [Dt::F32, Dt::F16, Dt::Bf16] {
        names.push(format!("flash_bwd_pre_{}", dt.name()));
        for d in HEAD_DIMS {
            for k in ["flash_fwd", "flash_bwd_dq", "flash_bwd_dkdv"] {
                names.push(format!("{k}_{}_d{d}", dt.name()));
            }
        }
    }
    let dir = std::env::temp_dir().join(format!("flash-msl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tu = dir.join("all.cpp");
    // The backend's string, preceded by the shim, plus a check that each name was registered.
    let mut text = String::from("#include \"msl_shim.h\"\n");
    text.push_str(&src);
    for n in &names {
        text.push_str(&format!(
            "static_assert(sizeof(emu_reg_{n}) > 0, \"{n}\");\n"
        ));
    }
    std::fs::write(&tu, text).unwrap();
    let emu = concat!(env!("CARGO_MANIFEST_DIR"), "/csrc");
    let out = Command::new(std::env::var("CXX").unwrap_or_else(|_| "g++".into()))
        .args([
            "-std=c++17",
            "-fsyntax-only",
            "-DFLASH_EMU",
            "-Wno-attributes",
            "-I",
            emu,
        ])
        .arg(&tu)
        .output()
        .expect("a C++ compiler (g++)");
    assert!(
        out.status.success(),
        "the assembled MSL source does not compile against the shim:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = plan::THREADS;
    std::fs::remove_dir_all(&dir).ok();
}
