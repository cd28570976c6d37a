//! The Metal kernels as one MSL source string. `newLibraryWithSource` has no include path, so
//! the headers (the head-dim list both dialects share, then the Metal one) and the kernel files
//! (one kernel per file, each including the headers for the emulator's sake) are concatenated,
//! their local `#include "..."` and `#pragma once` lines dropped.

/// (path under `kernels/`, text), in dependency order.
const FILES: [(&str, &str); 6] = [
    ("head_dims.h", include_str!("../../kernels/head_dims.h")),
    (
        "metal/flash_metal.h",
        include_str!("../../kernels/metal/flash_metal.h"),
    ),
    (
        "metal/fwd.metal",
        include_str!("../../kernels/metal/fwd.metal"),
    ),
    (
        "metal/bwd_pre.metal",
        include_str!("../../kernels/metal/bwd_pre.metal"),
    ),
    (
        "metal/bwd_dq.metal",
        include_str!("../../kernels/metal/bwd_dq.metal"),
    ),
    (
        "metal/bwd_dkdv.metal",
        include_str!("../../kernels/metal/bwd_dkdv.metal"),
    ),
];

/// The whole library source.
pub fn msl_source() -> String {
    let mut out = String::new();
    for (name, text) in FILES {
        out.push_str(&format!("// ---- kernels/{name}\n"));
        for line in text.lines() {
            let t = line.trim_start();
            if t.starts_with("#include \"") || t.starts_with("#pragma once") {
                continue;
            }
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}
