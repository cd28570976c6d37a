#!/usr/bin/env bash
# Install a CUDA 13.0 compiler toolchain (nvcc, ptxas, headers, NVRTC, cuobjdump)
# from PyPI wheels into .cuda-toolchain/ — no GPU, no root, no NVIDIA apt repo.
#
# Why these wheels: the `-cu12` nvcc wheels ship only ptxas, not nvcc; the
# CUDA 13 wheels without suffix give a full nvidia/cu13/{bin,include,lib} tree,
# but only when installed in ONE pip call (separate calls overwrite each other's
# nvidia/ folder). Pinned to 13.0.x: the GPU machines run driver 580 (CUDA 13.0),
# which cannot JIT newer PTX, and cudarc 0.19 knows versions up to 13.4 only.
#
# Idempotent: re-running with a complete tree does nothing.
# Usage:  source <(scripts/setup-cuda-toolchain.sh --env)   # after install
#         scripts/setup-cuda-toolchain.sh                    # install, print env
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TC="${CUDA_TOOLCHAIN_DIR:-$ROOT/.cuda-toolchain}"
CUDA="$TC/nvidia/cu13"
CUDA_VER="${CUDA_WHEEL_VERSION:-13.0.*}"
# cuobjdump has no 13.0 wheel (first is 13.2); it only reads cubins, so a newer one is fine.
CUOBJDUMP_VER="${CUOBJDUMP_WHEEL_VERSION:-13.2.*}"

print_env() {
  cat <<ENV
export CUDA_ROOT="$CUDA"
export CUDA_PATH="$CUDA"
export CUDA_HOME="$CUDA"
export PATH="$CUDA/bin:\$PATH"
export LD_LIBRARY_PATH="$CUDA/lib:$TC/stub:\${LD_LIBRARY_PATH:-}"
export LIBRARY_PATH="$CUDA/lib:$TC/stub:\${LIBRARY_PATH:-}"
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-80}"
ENV
}

if [[ "${1:-}" == "--env" ]]; then print_env; exit 0; fi

if [[ ! -x "$CUDA/bin/nvcc" || ! -f "$CUDA/include/cuda_runtime.h" || ! -f "$TC/.complete" ]]; then
  echo "[setup-cuda] installing CUDA $CUDA_VER wheels into $TC" >&2
  mkdir -p "$TC"
  # One pip call: the wheels share the nvidia/ namespace folder.
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --upgrade \
    --target "$TC" \
    "nvidia-cuda-nvcc==$CUDA_VER" "nvidia-nvvm==$CUDA_VER" "nvidia-cuda-crt==$CUDA_VER" \
    "nvidia-cuda-runtime==$CUDA_VER" "nvidia-cuda-nvrtc==$CUDA_VER" \
    "nvidia-cuda-cccl==$CUDA_VER" "nvidia-cuda-cuobjdump==$CUOBJDUMP_VER"
fi

# nvcc looks for nvvm/ and the host-side crt headers relative to its bin dir.
[[ -x "$CUDA/bin/nvcc" ]] || { echo "[setup-cuda] nvcc missing in $CUDA/bin" >&2; exit 1; }
chmod +x "$CUDA"/bin/* "$CUDA"/nvvm/bin/* 2>/dev/null || true

# Linkers want plain lib*.so; the wheels ship only versioned names (libcudart.so.13).
mkdir -p "$CUDA/lib"
for f in "$CUDA"/lib/lib*.so.*; do
  [[ -e "$f" ]] || continue
  base="${f##*/}"; plain="${base%%.so.*}.so"
  [[ -e "$CUDA/lib/$plain" ]] || ln -s "$base" "$CUDA/lib/$plain"
done
# Some build scripts look in lib64.
[[ -e "$CUDA/lib64" ]] || ln -s lib "$CUDA/lib64"

# No wheel ships libcuda (it comes with the driver). A stub lets binaries link and
# load; every call returns CUDA_ERROR_NO_DEVICE (100), so CUDA tests skip cleanly.
STUB="$TC/stub"
if [[ ! -f "$STUB/libcuda.so.1" ]]; then
  mkdir -p "$STUB"
  cat > "$STUB/cuda_stub.c" <<'C'
/* Stub libcuda: any driver entry point reports "no device". cudarc loads
   symbols dynamically by name, so a handful of symbols is enough. */
int cuInit(unsigned flags) { (void)flags; return 100; }
int cuDriverGetVersion(int *v) { if (v) *v = 13000; return 0; }
int cuDeviceGetCount(int *n) { if (n) *n = 0; return 100; }
int cuDeviceGet(int *d, int o) { (void)d; (void)o; return 100; }
int cuGetErrorString(int e, const char **s) { (void)e; if (s) *s = "no CUDA device (stub libcuda)"; return 0; }
int cuGetErrorName(int e, const char **s) { (void)e; if (s) *s = "CUDA_ERROR_NO_DEVICE"; return 0; }
C
  cc -shared -fPIC -O1 -o "$STUB/libcuda.so.1" "$STUB/cuda_stub.c"
  ln -sf libcuda.so.1 "$STUB/libcuda.so"
fi

touch "$TC/.complete"
"$CUDA/bin/nvcc" --version | tail -2 >&2
print_env
