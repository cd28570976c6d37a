#!/usr/bin/env bash
# Reproduces the FlashAttention papers' tables (issue 7): attention speed and memory
# (FlashAttention 2022 protocol), GFLOP/s (FlashAttention-2 Fig. 4–6 protocol), end-to-end training
# throughput (train bench), and shared-prefix decoding (Hydragen protocol scaled to the CPU:
# attention of one decoding step and sampling tokens/s, issue 13), block-sparse attention (time
# vs density, FlashAttention §3.3, issue 12), and model quality (issue 14): GPT-2 perplexity
# against context length at equal training tokens, and Long Range Arena ListOps speed and accuracy
# at equal wall clock; as JSON, markdown and PNG under
# results/<machine>-<date>[-quick|-gpu]/.
#
#   scripts/reproduce.sh            # full CPU run (scaled-down protocols; ~15 min for the speed
#                                   # tables, < 60 min for context, ~30 min for listops, 2 cores)
#   scripts/reproduce.sh --quick    # tiny sizes, ~2–3 min: smoke test, not a reproduction
#   scripts/reproduce.sh --gpu      # paper sizes (CUDA backend; see `repro run --help`)
#   scripts/reproduce.sh --out DIR --only attention,fa2,e2e,prefix,blocksparse,context,listops ...   # any `repro run` option
#   scripts/reproduce.sh --only context --context-data corpus.txt   # a larger corpus (crates/train/scripts/fetch-corpus.sh)
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
