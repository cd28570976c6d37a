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
# cuobjdump (and nvdisasm, which `cuobjdump -sass` runs) have no 13.0 wheels (first: 13.2);
# they only read cubins, so newer ones are fine.
CUOBJDUMP_VER="${CUOBJDUMP_WHEEL_VERSION:-13.2.*}"
PKGS=("nvidia-cuda-nvcc==$CUDA_VER" "nvidia-nvvm==$CUDA_VER" "nvidia-cuda-crt==$CUDA_VER"
      "nvidia-cuda-runtime==$CUDA_VER" "nvidia-cuda-nvrtc==$CUDA_VER" "nvidia-cuda-cccl==$CUDA_VER"
      "nvidia-cuda-cuobjdump==$CUOBJDUMP_VER" "nvidia-cuda-nvdisasm==$CUOBJDUMP_VER")

print_env() {
  cat <<ENV
export CUDA_ROOT="$CUDA"
export CUDA_PATH="$CUDA"
export CUDA_HOME="$CUDA"
export PATH="$CUDA/bin:\$PATH"
export LD_LIBRARY_PATH="$TC/stub:\${LD_LIBRARY_PATH:-}"
export LIBRARY_PATH="$TC/stub:\${LIBRARY_PATH:-}"
export FLASH_OPS_STUB_LINK=1
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-80}"
ENV
}

if [[ "${1:-}" == "--env" ]]; then print_env; exit 0; fi

if [[ ! -x "$CUDA/bin/nvcc" || "$(cat "$TC/.complete" 2>/dev/null)" != "${PKGS[*]}" ]]; then
  echo "[setup-cuda] installing ${PKGS[*]} into $TC" >&2
  rm -rf "$TC/nvidia" "$TC/.complete"
  mkdir -p "$TC"
  # One pip call: the wheels share the nvidia/ namespace folder, and a second `pip --target`
  # into an existing folder skips (or, with --upgrade, replaces) what is there.
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --upgrade \
    --target "$TC" "${PKGS[@]}"
fi

# nvcc looks for nvvm/ and the host-side crt headers relative to its bin dir.
[[ -x "$CUDA/bin/nvcc" ]] || { echo "[setup-cuda] nvcc missing in $CUDA/bin" >&2; exit 1; }
chmod +x "$CUDA"/bin/* "$CUDA"/nvvm/bin/* 2>/dev/null || true

# Link-time stubs. No wheel ships libcuda (it comes with the driver), and candle links cublas,
# cublasLt, curand and nvrtc dynamically. The stubs are plain `lib*.so` with that SONAME, so a
# test binary records unversioned NEEDED names: on a GPU machine scripts/gpu-check.sh points
# them at whatever CUDA 12/13 libraries are there. Their symbols are left unresolved at link
# time and bound lazily (build.rs of flash-ops adds the linker flags to the cuda tests when
# FLASH_OPS_STUB_LINK=1); libcuda's stub answers cuInit with CUDA_ERROR_NO_DEVICE (100), so
# Device::new_cuda fails cleanly and the CUDA tests skip on CPU machines.
STUB="$TC/stub"
if [[ ! -f "$STUB/.v3" ]]; then
  rm -rf "$STUB"; mkdir -p "$STUB"
  cat > "$STUB/cuda_stub.c" <<'C'
/* Stub libcuda: the driver entry points candle/cudarc call first report "no device". */
int cuInit(unsigned flags) { (void)flags; return 100; }
int cuDriverGetVersion(int *v) { if (v) *v = 13000; return 0; }
int cuDeviceGetCount(int *n) { if (n) *n = 0; return 100; }
int cuDeviceGet(int *d, int o) { (void)d; (void)o; return 100; }
int cuGetErrorString(int e, const char **s) { (void)e; if (s) *s = "no CUDA device (stub libcuda)"; return 0; }
int cuGetErrorName(int e, const char **s) { (void)e; if (s) *s = "CUDA_ERROR_NO_DEVICE"; return 0; }
C
  cc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$STUB/libcuda.so.1" "$STUB/cuda_stub.c"
  ln -sf libcuda.so.1 "$STUB/libcuda.so"
  echo 'void flash_ops_link_stub(void) {}' > "$STUB/empty.c"
  # cudart: candle-kernels 0.11 links it for its MoE kernels (libmoe.a), which we never call.
  for lib in nvrtc cublas cublasLt curand cudart; do
    cc -shared -fPIC -O1 -Wl,-soname,lib$lib.so -o "$STUB/lib$lib.so" "$STUB/empty.c"
  done
  touch "$STUB/.v3"
fi

# --stubs-for BIN...: rebuild the stub libcuda so that it also defines every CUDA-library symbol
# those binaries import (as "return CUDA_ERROR_NO_DEVICE"). Functions called directly bind
# lazily and never run, but cudarc also takes some as function pointers, and the loader must
# resolve those when the binary starts. The symbol set depends on the candle/cudarc versions,
# so it is read from the binaries rather than written down. The loader searches every loaded
# library, so one stub library can define them all.
if [[ "${1:-}" == "--stubs-for" ]]; then
  shift
  {
    cat "$STUB/cuda_stub.c"
    for b in "$@"; do nm -D --undefined-only "$b"; done | awk '{print $NF}' | sed 's/@.*//' |
      grep -E '^(cu[A-Z]|cublas|curand|nvrtc|cuda|__cuda)' | sort -u |
      while read -r s; do
        grep -q "^int $s(" "$STUB/cuda_stub.c" || echo "int $s(void) { return 100; }"
      done
  } > "$STUB/cuda_all.c"
  cc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$STUB/libcuda.so.1" "$STUB/cuda_all.c"
  echo "[setup-cuda] stub libcuda: $(grep -c '^int ' "$STUB/cuda_all.c") symbols" >&2
  exit 0
fi

echo "${PKGS[*]}" > "$TC/.complete"
"$CUDA/bin/nvcc" --version | tail -2 >&2
print_env
