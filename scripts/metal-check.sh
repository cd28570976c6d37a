#!/usr/bin/env bash
# The Metal backend on a Mac (Apple silicon, macOS 14+ for bf16): build with `--features metal`,
# run the test suite on the GPU, and print the benchmark table.
#
#   scripts/metal-check.sh              # tests + benchmark
#   scripts/metal-check.sh test         # tests only
#   scripts/metal-check.sh bench        # benchmark only
#
# Steps:
#   1. cargo build -p flash-ops --features metal --release (the kernels themselves are compiled
#      by the Metal driver at the first call: kernels/metal/*.metal, newLibraryWithSource)
#   2. the library's own tests and tests/metal.rs (every option against the f64 oracle: dense,
#      GQA, causal, window, ALiBi, softcap, dropout, key_lengths, varlen, V1 statistics, head
#      dims 32..256, f32/f16/bf16), printing the relative errors
#   3. the benchmark of the CUDA protocol (bf16, 16k tokens per batch, hidden 2048, d 64 and 128,
#      causal and not): flash-ops V2 and V1 forward and forward+backward, candle's naive
#      attention, and candle's fused Metal `sdpa` (forward only), as a Markdown table
# Env: FLASH_BENCH_SEQS (default 512,1024,2048,4096,8192), METAL_CHECK_OUT (report folder,
#      default results/).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[[ "$(uname -s)" == Darwin ]] || { echo "metal-check: needs macOS with a Metal GPU" >&2; exit 1; }
MODE="${1:-all}"
OUT="${METAL_CHECK_OUT:-$ROOT/results}"
mkdir -p "$OUT"
STAMP="$(date +%Y-%m-%d)-$(sysctl -n machdep.cpu.brand_string 2>/dev/null | tr ' ' '-' || echo mac)"

echo "== build (--features metal)"
cargo build -p flash-ops --features metal --release

if [[ "$MODE" == all || "$MODE" == test ]]; then
  echo "== tests on the GPU"
  # A GPU is promised here: a suite that cannot open the device fails instead of skipping.
  export FLASH_OPS_REQUIRE_GPU=1
  cargo test -p flash-ops --features metal --release --test metal -- --nocapture --test-threads=1 \
    | tee "$OUT/$STAMP-metal-tests.log"
  cargo test -p flash-ops --features metal --release --lib
fi

if [[ "$MODE" == all || "$MODE" == bench ]]; then
  echo "== benchmark"
  export FLASH_BENCH_SEQS="${FLASH_BENCH_SEQS:-512,1024,2048,4096,8192}"
  log="$OUT/$STAMP-metal-bench.log"
  cargo test -p flash-ops --features metal --release --test metal -- --ignored --nocapture bench \
    | tee "$log"
  python3 - "$log" > "$OUT/$STAMP-metal-bench.md" <<'PY'
import json, sys
rows = [json.loads(l[6:]) for l in open(sys.argv[1]) if l.startswith("BENCH ")]
print("| impl | d | causal | seq | fwd ms | fwd+bwd ms | fwd TFLOP/s | bwd TFLOP/s | fwd+bwd TFLOP/s |")
print("|---|---|---|---|---|---|---|---|---|")
f = lambda r, k, p=2: ("%.*f" % (p, r[k])) if k in r else ("error" if "error" in r else "—")
for r in rows:
    print(f"| {r['impl']} | {r['d']} | {r['causal']} | {r['seq']} | {f(r,'fwd_ms',3)} | {f(r,'fwdbwd_ms',3)} "
          f"| {f(r,'fwd_tflops')} | {f(r,'bwd_tflops')} | {f(r,'fwdbwd_tflops')} |")
PY
  cat "$OUT/$STAMP-metal-bench.md"
fi
