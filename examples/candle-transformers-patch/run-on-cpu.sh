#!/usr/bin/env bash
# Runs the candle-transformers patch demo on a machine WITHOUT a CUDA toolkit.
#
# candle-transformers' `flash-attn` feature also turns on candle-core's `cuda` backend. The test
# itself only uses the CPU, but that backend must build and link, so here:
#  1. candle-kernels (whose build script needs nvcc) is patched with an API-only stub, through
#     `--config` so that the demo's Cargo.toml keeps exactly the three-line user recipe;
#  2. the CUDA libraries cudarc links (cuda, cublas, cublasLt, curand, nvrtc) are replaced by
#     generated stubs exporting the same symbols (every function returns an error code; none is
#     called on the CPU), found via LIBRARY_PATH at link time and LD_LIBRARY_PATH at run time.
# With a CUDA toolkit installed, run plain `cargo test` in this directory instead.
#
# Usage: examples/candle-transformers-patch/run-on-cpu.sh [extra cargo test args]
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TARGET="${CARGO_TARGET_DIR:-$HERE/target}"
STUBS="$TARGET/cuda-stub-libs"
PATCH=(--config "patch.crates-io.candle-kernels.path=\"$HERE/cpu-stubs/candle-kernels\"")
export CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13000}"  # no nvcc to ask

# cudarc's source, as resolved for this workspace.
CUDARC_DIR="$(cargo metadata --format-version 1 --manifest-path "$HERE/Cargo.toml" "${PATCH[@]}" |
  python3 -c 'import json, os, sys
m = json.load(sys.stdin)
print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"] == "cudarc"))')"

mkdir -p "$STUBS"
python3 - "$CUDARC_DIR" "$STUBS" <<'PY'
import os, re, subprocess, sys
cudarc, out = sys.argv[1], sys.argv[2]
for lib, mod in [("cuda", "driver"), ("cublas", "cublas"), ("cublasLt", "cublaslt"),
                 ("curand", "curand"), ("nvrtc", "nvrtc")]:
    src = open(os.path.join(cudarc, "src", mod, "sys", "mod.rs")).read()
    # The linked (not dynamically loaded) entry points: `extern "C" { fn name(...) }` blocks.
    names = sorted(set(re.findall(r'extern "C" \{\s*fn (\w+)\(', src)))
    assert names, f"no entry points found in cudarc's {mod} bindings"
    c = os.path.join(out, f"{lib}_stub.c")
    with open(c, "w") as f:
        f.write(f"/* Stub lib{lib}: {len(names)} entry points, all failing (999). */\n")
        f.writelines(f"int {n}(void) {{ return 999; }}\n" for n in names)
    so = os.path.join(out, f"lib{lib}.so")
    subprocess.check_call(["cc", "-shared", "-fPIC", "-O0", f"-Wl,-soname,lib{lib}.so", "-o", so, c])
    print(f"stub lib{lib}.so: {len(names)} symbols", file=sys.stderr)
PY

export LIBRARY_PATH="$STUBS${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$STUBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cd "$HERE"
exec cargo test "${PATCH[@]}" "$@"
