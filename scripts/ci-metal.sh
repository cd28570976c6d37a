#!/usr/bin/env bash
# CI for the Metal backend on Linux (no Mac, no Metal compiler; called from .ci/run):
#   1. the Metal Rust code type-checked for macOS: cargo check --target aarch64-apple-darwin
#      -p flash-ops --features metal (--all-targets, so tests/metal.rs too; clippy -D warnings
#      when available). The kernels are compiled at run time by the Metal driver, so this needs
#      no Xcode.
#   2. the same crates/flash-ops/kernels/metal/*.metal sources run through the SIMT emulator with the MSL shim
#      (flash-emu), against the f64 reference on every option
# Env: CI_METAL_SKIP_CHECK=1 skips step 1, CI_METAL_SKIP_EMU=1 step 2.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
t0=$(date +%s)
step() { echo; echo "=== [ci-metal +$(( $(date +%s) - t0 ))s] $*"; }

if [[ -z "${CI_METAL_SKIP_CHECK:-}" ]]; then
  step "rustup target aarch64-apple-darwin"
  rustup target add aarch64-apple-darwin >/dev/null
  step "clippy --target aarch64-apple-darwin -p flash-ops --features metal --all-targets"
  cargo clippy --target aarch64-apple-darwin -p flash-ops --features metal --all-targets -- -D warnings
fi

if [[ -z "${CI_METAL_SKIP_EMU:-}" ]]; then
  step "emulated Metal kernels vs reference"
  # Dev profile on purpose: the workspace optimises dependencies there and build.rs compiles
  # the kernels with -O2 anyway, so this shares the build of `cargo test --workspace`.
  cargo test -p flash-emu --test metal --test metal_source -- --test-threads=2
fi
step "done"
