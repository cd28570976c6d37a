#!/usr/bin/env bash
# CI for the CUDA backend, on a machine without a GPU (called from .ci/run):
#   1. the CUDA 13.0 toolchain from PyPI wheels (scripts/setup-cuda-toolchain.sh, cached in
#      .cuda-toolchain/)
#   2. the compile gate: every kernel for sm_80 and sm_90, no spills / stack frames, tensor
#      cores in the SASS (scripts/cuda-compile-check.sh)
#   3. the emulated kernels against the f64 reference on every option (flash-emu tests)
#   4. `cargo build -p flash-ops --features cuda` and the CUDA tests linked against the stub
#      driver, run to show they skip cleanly without a device
# Env: CI_CUDA_SKIP_BUILD=1 skips step 4 (the slowest: candle's own kernels, ~10 min cold);
#      CI_CUDA_SKIP_EMU=1 skips step 3 (when `cargo test --workspace` already ran it).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
t0=$(date +%s)
step() { echo; echo "=== [ci-cuda +$(( $(date +%s) - t0 ))s] $*"; }

step "toolchain"
eval "$(scripts/setup-cuda-toolchain.sh)"

step "compile gate (sm_80, sm_90)"
scripts/cuda-compile-check.sh 80 90

if [[ -z "${CI_CUDA_SKIP_EMU:-}" ]]; then
  step "emulated kernels vs reference"
  CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}" cargo test -p flash-emu --test cuda -- --test-threads=2
fi

if [[ -z "${CI_CUDA_SKIP_BUILD:-}" ]]; then
  step "cargo build --features cuda (CUDA_COMPUTE_CAP=80)"
  export CUDA_COMPUTE_CAP=80 CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-2}"
  cargo build -p flash-ops --features cuda
  step "CUDA tests without a device (must skip cleanly)"
  bins=$(cargo test -p flash-ops --features cuda --test cuda --lib --no-run --message-format=json |
    python3 -c 'import json,sys; [print(m["executable"]) for m in map(json.loads, sys.stdin) if m.get("executable")]')
  # shellcheck disable=SC2086
  scripts/setup-cuda-toolchain.sh --stubs-for $bins
  cargo test -p flash-ops --features cuda --test cuda --lib -- mma_probe dense_options varlen
fi
step "done"
