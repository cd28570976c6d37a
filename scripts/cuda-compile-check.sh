#!/usr/bin/env bash
# Compile gate for the CUDA kernels (no GPU needed): every crates/flash-ops/kernels/cuda/*.cu is compiled to a
# cubin for each architecture with `-Xptxas -v`; the script prints a register / shared-memory /
# spill table and fails when a kernel spills registers or has a local-memory stack frame
# (both mean slow local-memory traffic in the inner loop). It also checks with cuobjdump that
# the f16/bf16 kernels really use tensor cores (HMMA) and ldmatrix (LDSM), and that every kernel
# family with a head-dim suffix (_d<D>) has one kernel per head dim of kernels/head_dims.h.
#
# Usage: scripts/cuda-compile-check.sh [ARCH...]     (default: 80 90)
# Env:   CUDA_CHECK_JOBS (parallel nvcc, default 2), CUDA_CHECK_OUT (cubins + logs, default
#        target/cuda-check), CUDA_CHECK_ALLOW_SPILL_F32=1 to report f32 spills without failing,
#        CUDA_CHECK_SKIP_COMPILE=1 to only re-read an earlier run's logs and cubins.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
eval "$("$ROOT/scripts/setup-cuda-toolchain.sh" --env)"
"$ROOT/scripts/setup-cuda-toolchain.sh" >/dev/null
ARCHS=("${@:-80 90}")
[[ $# -eq 0 ]] && ARCHS=(80 90)
OUT="${CUDA_CHECK_OUT:-$ROOT/target/cuda-check}"
JOBS="${CUDA_CHECK_JOBS:-2}"
mkdir -p "$OUT"

jobs_list=()
for arch in "${ARCHS[@]}"; do
  for src in "$ROOT"/crates/flash-ops/kernels/cuda/*.cu; do
    jobs_list+=("$arch $src")
  done
done

compile_one() {
  local arch="$1" src="$2" name; name="$(basename "$src" .cu)"
  local t0; t0=$(date +%s.%N)
  if nvcc -arch="sm_$arch" -O3 -std=c++17 -cubin -Xptxas -v -lineinfo \
       -o "$OUT/${name}.sm_$arch.cubin" "$src" >"$OUT/${name}.sm_$arch.log" 2>&1; then
    printf '%s sm_%s %.1fs\n' "$name" "$arch" "$(echo "$(date +%s.%N) - $t0" | bc)" >&2
  else
    cat "$OUT/${name}.sm_$arch.log" >&2; echo "FAILED: $name sm_$arch" >&2; return 1
  fi
}
export -f compile_one; export OUT
if [[ -z "${CUDA_CHECK_SKIP_COMPILE:-}" ]]; then  # =1: re-read the logs/cubins already in $OUT
  printf '%s\n' "${jobs_list[@]}" | xargs -P "$JOBS" -L 1 bash -c 'compile_one $0 $1'
fi

python3 - "$OUT" "${CUDA_CHECK_ALLOW_SPILL_F32:-0}" "$ROOT/crates/flash-ops/kernels/head_dims.h" "${ARCHS[@]}" <<'PY'
import glob, os, re, subprocess, sys
out, allow_f32, head_dims_h, archs = sys.argv[1], sys.argv[2] == "1", sys.argv[3], sys.argv[4:]
rows, bad = [], []
define = next(l for l in open(head_dims_h) if l.startswith("#define FLASH_HEAD_DIMS("))
head_dims = sorted(int(d) for d in re.findall(r"X\((\d+),", define))
for arch in archs:
    for log in sorted(glob.glob(f"{out}/*.sm_{arch}.log")):
        cur = None
        for line in open(log):
            m = re.search(r"Compiling entry function '(\w+)'", line)
            if m: cur = {"name": m.group(1), "arch": arch}; rows.append(cur); continue
            if cur is None: continue
            m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m: cur["stack"], cur["st"], cur["ld"] = map(int, m.groups())
            m = re.search(r"Used (\d+) registers", line)
            if m: cur["regs"] = int(m.group(1))
            m = re.search(r"(\d+) bytes smem", line)
            if m: cur["smem"] = int(m.group(1))
# SASS: count HMMA / LDSM per kernel for the tensor-core types.
sass = {}
for arch in archs:
    for cub in sorted(glob.glob(f"{out}/*.sm_{arch}.cubin")):
        try:
            txt = subprocess.run(["cuobjdump", "-sass", cub], capture_output=True, text=True, check=True).stdout
        except Exception as e:
            print(f"cuobjdump failed on {cub}: {e}"); continue
        cur = None
        for line in txt.splitlines():
            m = re.search(r"Function : (\w+)", line)
            if m: cur = (m.group(1), arch); sass[cur] = [0, 0]; continue
            if cur:
                if "HMMA" in line: sass[cur][0] += 1
                if "LDSM" in line: sass[cur][1] += 1
print(f"{'kernel':34} {'arch':>5} {'regs':>5} {'stack':>6} {'spill st/ld':>12} {'HMMA':>5} {'LDSM':>5}")
for r in rows:
    h, l = sass.get((r["name"], r["arch"]), [0, 0])
    print(f"{r['name']:34} sm_{r['arch']:>2} {r.get('regs', 0):>5} {r.get('stack', 0):>6} "
          f"{str(r.get('st', 0)) + '/' + str(r.get('ld', 0)):>12} {h:>5} {l:>5}")
    f32 = "_f32_" in r["name"]
    if r.get("stack", 0) or r.get("st", 0) or r.get("ld", 0):
        if not (f32 and allow_f32): bad.append(f"{r['name']} sm_{r['arch']}: stack {r.get('stack')} spill {r.get('st')}/{r.get('ld')}")
    tc = ("_f16_" in r["name"] or "_bf16_" in r["name"]) and ("fwd" in r["name"] or "bwd_v" in r["name"] or "bwd_dq" in r["name"])
    if tc and (h == 0 or l == 0):
        bad.append(f"{r['name']} sm_{r['arch']}: no HMMA/LDSM in SASS")
# Every family (name without its _d<D>) has a kernel per head dim, on every arch.
families = {}
for r in rows:
    m = re.fullmatch(r"(\w+)_d(\d+)", r["name"])
    if m: families.setdefault((m.group(1), r["arch"]), set()).add(int(m.group(2)))
for (fam, arch), dims in sorted(families.items()):
    if sorted(dims) != head_dims:
        bad.append(f"{fam}_d* sm_{arch}: head dims {sorted(dims)}, kernels/head_dims.h has {head_dims}")
n_fam = len({fam for fam, _ in families})
print(f"\n{len(rows)} kernels compiled for {', '.join('sm_' + a for a in archs)} "
      f"(per arch: {n_fam} families x head dims {head_dims}, "
      f"{(len(rows) - sum(len(d) for d in families.values())) // len(archs)} without a head dim)")
if bad:
    print("COMPILE GATE FAILED:"); [print("  " + b) for b in bad]; sys.exit(1)
print("compile gate passed: no spills, no stack frames, tensor cores in every f16/bf16 kernel")
PY
