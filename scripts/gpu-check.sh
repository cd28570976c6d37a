#!/usr/bin/env bash
# One command for a session that has a GPU (the `device` tool), in two halves, because the GPU
# machine has no Rust toolchain and no network and a call carries at most 64 MiB:
#
#   scripts/gpu-check.sh build   # here: CUDA 13.0 wheels, CUDA_COMPUTE_CAP=90 (H100/H200),
#                                # builds the CUDA test + bench binaries and the `repro` binary,
#                                # strips and packs them (gpu-carry/bin.tar.xz, ~20 MB; gitignored)
#                                # with the SDPA script and, if it fits, compute-sanitizer
#   device run: command "bash scripts/gpu-check.sh run", carry ["gpu-carry"], timeout_s 540
#                                # there: probe, CUDA test suite, compute-sanitizer memcheck and
#                                # racecheck on a small case, benchmark (ours V2/V1, candle naive,
#                                # PyTorch SDPA flash), report results/<date>-<gpu>.md, then the
#                                # papers' attention tables at GPU sizes (`repro run --gpu --only
#                                # attention,fa2`, issue 7) into results/repro-gpu/
#
# The report comes back under $OUT (the device tool's output folder) and is copied into
# results/ on the GPU machine's work tree; commit the returned file from $OUT's copy.
# Env: FLASH_BENCH_SEQS (default 512,...,16384), GPU_CHECK_SKIP_SANITIZER=1.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARRY="$ROOT/gpu-carry"

build() {
  eval "$("$ROOT/scripts/setup-cuda-toolchain.sh")"
  export CUDA_COMPUTE_CAP="${GPU_CHECK_COMPUTE_CAP:-90}"
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/work/target-cuda}"
  export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-2}"
  local json; json="$(mktemp)"
  (cd "$ROOT" && cargo test -p flash-ops --features cuda --release --no-run --message-format=json >"$json")
  # repro is another package, so flash-ops' build.rs link flags do not reach it: its driver
  # symbols (no libcuda here, only the stub) are left for the GPU machine's libcuda to resolve.
  (cd "$ROOT" && cargo rustc -p repro --bin repro --features cuda --release -- \
      -C link-arg=-Wl,--unresolved-symbols=ignore-in-object-files -C link-arg=-Wl,-z,lazy)
  # Each stripped binary is 70-85 MB (candle's and our PTX as text), far over the 64 MiB a call
  # carries; PTX compresses well and the three share most of it, so they travel as one tar.xz
  # (~20 MB measured) that `run` unpacks with Python's lzma.
  local stage="$CARRY.stage"
  rm -rf "$CARRY" "$stage"; mkdir -p "$CARRY" "$stage/bin"
  python3 - "$json" "$stage/bin" <<'PY'
import json, shutil, subprocess, sys
found = {}
for line in open(sys.argv[1]):
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable") or not m["profile"]["test"]: continue
    t = m["target"]
    if t["name"] == "flash_ops" and "lib" in t["kind"]: found["flash_ops_unit"] = m["executable"]
    if t["name"] == "cuda" and "test" in t["kind"]: found["cuda_tests"] = m["executable"]
for k in ("flash_ops_unit", "cuda_tests"):
    if k not in found: sys.exit(f"gpu-check: test binary {k} not built")
    subprocess.run(["strip", "-o", f"{sys.argv[2]}/{k}", found[k]], check=True)
PY
  strip -o "$stage/bin/repro" "$CARGO_TARGET_DIR/release/repro"
  tar -C "$stage" -cf - bin | xz -9 -T2 >"$CARRY/bin.tar.xz"
  rm -rf "$stage"
  cp "$ROOT/scripts/bench_sdpa.py" "$CARRY/"
  # compute-sanitizer from its wheel, if the carry stays under the 64 MiB limit.
  local tc="$ROOT/.cuda-toolchain/sanitizer"
  if [[ ! -d "$tc/nvidia" ]]; then
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$tc" \
      "nvidia-cuda-sanitizer-api==13.0.*" || true
  fi
  local san; san="$(find "$tc" -name compute-sanitizer -type f 2>/dev/null | head -1 || true)"
  if [[ -n "$san" ]]; then
    local dir; dir="$(dirname "$san")"
    local have want; have=$(du -sm "$CARRY" | cut -f1); want=$(du -sm "$dir" | cut -f1)
    if (( have + want < 60 )); then cp -r "$dir" "$CARRY/sanitizer"; chmod +x "$CARRY/sanitizer/compute-sanitizer"
    else echo "gpu-check: compute-sanitizer (${want} MB) does not fit the carry; skipped" >&2; fi
  fi
  du -sh "$CARRY"
  (( $(du -sm "$CARRY" | cut -f1) < 62 )) || { echo "gpu-check: the carry is over 62 MB" >&2; return 1; }
  echo "now: device run, command 'bash scripts/gpu-check.sh run', carry [\"gpu-carry\"]"
}

# Point the binaries' unversioned NEEDED names (libcublas.so, libcublasLt.so, libcurand.so,
# libnvrtc.so, libcudart.so; see setup-cuda-toolchain.sh) at the machine's own CUDA libraries.
link_machine_libs() {
  local dir=/tmp/flash-ops-libs; mkdir -p "$dir"
  local roots=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu)
  local site; site="$(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null || true)"
  for s in $site; do roots+=("$s/nvidia" "$s/torch/lib"); done
  for lib in cublas cublasLt curand nvrtc cudart; do
    local f; f="$(find "${roots[@]}" -name "lib$lib.so.[0-9]*" 2>/dev/null | sort -V | tail -1 || true)"
    if [[ -n "$f" ]]; then ln -sf "$f" "$dir/lib$lib.so"; echo "lib$lib.so -> $f"
    else echo "gpu-check: lib$lib not found on this machine" >&2; fi
  done
  export LD_LIBRARY_PATH="$dir:${LD_LIBRARY_PATH:-}"
}

run() {
  local out="${OUT:-$ROOT/results}"; mkdir -p "$out" "$ROOT/results"
  local gpu; gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' /' '--')"
  local date; date="$(date -u +%Y-%m-%d)"
  local log="$out/gpu-check.log"; : >"$log"
  # Not in a pipe: its LD_LIBRARY_PATH export must reach this shell.
  link_machine_libs > >(tee -a "$log")
  nvidia-smi | tee -a "$log"
  local bin=/tmp/flash-ops-carry/bin status=0
  python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
    "$CARRY/bin.tar.xz" /tmp/flash-ops-carry
  echo "## probe: emulated mma/ldmatrix layouts vs the hardware" | tee -a "$log"
  "$bin/flash_ops_unit" mma_probe --nocapture 2>&1 | tee -a "$log" || status=1
  echo "## CUDA test suite" | tee -a "$log"
  # A GPU is promised here: a suite that cannot open the device fails instead of skipping.
  export FLASH_OPS_REQUIRE_GPU=1
  "$bin/cuda_tests" --nocapture --test-threads=1 2>&1 | tee -a "$log" || status=1
  local san="$CARRY/sanitizer/compute-sanitizer"
  command -v compute-sanitizer >/dev/null && san="$(command -v compute-sanitizer)"
  if [[ -z "${GPU_CHECK_SKIP_SANITIZER:-}" && -x "$san" ]]; then
    echo "## compute-sanitizer memcheck / racecheck (varlen case, probe)" | tee -a "$log"
    "$san" --tool memcheck --error-exitcode 9 "$bin/cuda_tests" varlen_matches_oracle 2>&1 | tail -25 | tee -a "$log" || status=1
    "$san" --tool racecheck --error-exitcode 9 "$bin/cuda_tests" varlen_matches_oracle 2>&1 | tail -25 | tee -a "$log" || status=1
    "$san" --tool racecheck --error-exitcode 9 "$bin/flash_ops_unit" mma_probe 2>&1 | tail -10 | tee -a "$log" || status=1
  else
    echo "## compute-sanitizer: not available, skipped" | tee -a "$log"
  fi
  echo "## benchmark" | tee -a "$log"
  local bench="$out/bench.jsonl"
  "$bin/cuda_tests" --ignored --nocapture --exact bench 2>&1 | tee -a "$log" | sed -n 's/^BENCH //p' >"$bench" || status=1
  python3 "$CARRY/bench_sdpa.py" 2>>"$log" | sed -n 's/^BENCH //p' >>"$bench" || echo "SDPA bench failed" | tee -a "$log"
  local report="$out/$date-$gpu.md"
  python3 - "$bench" "$gpu" "$date" "$status" >"$report" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
gpu, date, status = sys.argv[2], sys.argv[3], sys.argv[4]
print(f"# flash-ops GPU check: {gpu}, {date}\n")
print(f"Correctness (probe, CUDA test suite, sanitizer): {'PASS' if status == '0' else 'FAIL (see gpu-check.log)'}\n")
print("Benchmark: bf16, batch x seq = 16k tokens, hidden 2048 (heads = 2048 / d), FlashAttention-2 paper protocol;")
print("TFLOP/s with forward FLOPs 4·b·h·s²·d (halved when causal), backward 2.5x forward.\n")
impls = sorted({r["impl"] for r in rows})
for d in (64, 128):
    for causal in (False, True):
        sel = [r for r in rows if r["d"] == d and r["causal"] == causal]
        if not sel: continue
        print(f"## d = {d}, {'causal' if causal else 'non-causal'}\n")
        print("| seq | " + " | ".join(f"{i} fwd / bwd / fwd+bwd" for i in impls) + " |")
        print("|---|" + "---|" * len(impls))
        for s in sorted({r["seq"] for r in sel}):
            cells = []
            for i in impls:
                r = next((r for r in sel if r["seq"] == s and r["impl"] == i), None)
                if r is None: cells.append("-")
                elif "error" in r: cells.append("error: " + r["error"][:40])
                else: cells.append(f"{r['fwd_tflops']:.0f} / {r['bwd_tflops']:.0f} / {r['fwdbwd_tflops']:.0f}")
            print(f"| {s} | " + " | ".join(cells) + " |")
        print()
t = {r["impl"]: r for r in rows if r["d"] == 128 and not r["causal"] and r["seq"] == 8192 and "error" not in r}
ours, sdpa = t.get("flash-ops v2"), t.get("pytorch sdpa (flash)")
if ours:
    print("## Targets (bf16, d 128, non-causal, seq 8k)\n")
    print(f"- forward {ours['fwd_tflops']:.0f} TFLOP/s (target >= 350)")
    print(f"- fwd+bwd {ours['fwdbwd_tflops']:.0f} TFLOP/s (target >= 300)")
    if sdpa: print(f"- vs PyTorch SDPA fwd+bwd: {ours['fwdbwd_tflops'] / sdpa['fwdbwd_tflops']:.2f}x (target >= 1.0x)")
PY
  cp "$report" "$ROOT/results/" 2>/dev/null || true
  cat "$report"
  # The reproduction's attention tables at the papers' sizes (bf16), PyTorch SDPA beside them.
  echo "## repro run --gpu --only attention,fa2" | tee -a "$log"
  if [[ -x "$bin/repro" ]]; then
    (cd "$ROOT" && timeout "${GPU_CHECK_REPRO_TIMEOUT:-240}" "$bin/repro" run --gpu --only attention,fa2 \
        --torch python3 --out "$out/repro-gpu") 2>&1 | tail -60 | tee -a "$log" || echo "repro --gpu failed" | tee -a "$log"
  else
    echo "repro was not carried (see the build step); skipped" | tee -a "$log"
  fi
  return $status
}

case "${1:-}" in
  build) build ;;
  run) run ;;
  *) echo "usage: $0 build|run" >&2; exit 2 ;;
esac
