#!/usr/bin/env bash
# Reproduces the FlashAttention papers' tables (issue 7): attention speed and memory
# (FlashAttention 2022 protocol), GFLOP/s (FlashAttention-2 Fig. 4–6 protocol), end-to-end training
# throughput (train bench), and shared-prefix decoding (Hydragen protocol scaled to the CPU:
# attention of one decoding step and sampling tokens/s, issue 13), and block-sparse attention (time
# vs density, FlashAttention §3.3, issue 12), as JSON, markdown and PNG under
# results/<machine>-<date>[-quick|-gpu]/.
#
#   scripts/reproduce.sh            # full CPU run (scaled-down protocols; 908 s on 2 cores with --torch)
#   scripts/reproduce.sh --quick    # tiny sizes, ~1–2 min: smoke test, not a reproduction
#   scripts/reproduce.sh --gpu      # paper sizes (CUDA backend; see `repro run --help`)
#   scripts/reproduce.sh --out DIR --only attention,fa2,e2e,prefix,blocksparse ...   # any `repro run` option
#
# Re-render a committed folder without measuring: repro render results/<dir>
set -euo pipefail
cd "$(dirname "$0")/.."
features=()
for a in "$@"; do
  if [[ $a == --gpu ]]; then features=(--features repro/cuda,train/cuda); fi
done
# One build of both binaries; repro finds `train` next to itself.
cargo build --release -p repro -p train "${features[@]}"
target="${CARGO_TARGET_DIR:-target}"
start=$(date +%s)
"$target/release/repro" run "$@"
echo "reproduce.sh: $(( $(date +%s) - start )) s"
