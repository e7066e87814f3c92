#!/usr/bin/env bash
# Install a GPU-less CUDA 13.0 nvcc toolchain from PyPI wheels into a prefix.
# Idempotent: re-running only re-checks / re-creates symlinks.
#
#   usage: scripts/install-cuda-toolkit.sh [PREFIX]        (default PREFIX=<repo>/.cuda)
#   then:  eval "$(scripts/install-cuda-toolkit.sh [PREFIX] --env)"
#          cargo build --release --features cuda -p peft-cli
#
# Besides nvcc this makes link-time stubs (PREFIX/stubs) for the libraries that candle-core's
# cudarc links dynamically (libcuda, libcublas, libcublasLt, libcurand, libnvrtc): one empty
# function per symbol that cudarc declares, each stub carrying the real library's SONAME. The
# binary then records the real names (libcuda.so.1, libcublas.so.13, ...) and the dynamic loader
# finds the driver's and the CUDA 13 runtime's libraries on the GPU machine (LD_LIBRARY_PATH).
# No CUDA library is downloaded for building; none is needed here to run the CPU path.
#
# Why 13.0 and not the newest 13.x: the GPU box runs driver 580 (= CUDA 13.0).
# PTX produced by a newer nvcc carries a newer PTX ISA (.version) that a 13.0
# driver refuses to JIT (CUDA_ERROR_UNSUPPORTED_PTX_VERSION), and candle-kernels
# ships PTX. So pin the nvcc wheels to 13.0.x. Also cudarc 0.19.10 only knows
# CUDA versions up to 13.4, and detects the version by parsing `nvcc --version`.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="$(realpath -m "${1:-$REPO/.cuda}")"  # absolute: the printed exports must work anywhere
MODE="${2:-install}"
PY="${PYTHON:-python3}"

# Pinned CUDA 13.0 wheels (all unpack into site-packages/nvidia/cu13/{bin,include,lib,nvvm})
PKGS=(
  "nvidia-cuda-nvcc==13.0.88"     # bin/nvcc, ptxas, fatbinary, nvlink, cudafe++, nvcc.profile
  "nvidia-cuda-crt==13.0.88"      # include/crt/*.h (host_config.h etc., needed by nvcc)
  "nvidia-nvvm==13.0.88"          # nvvm/bin/cicc, nvvm/libdevice/libdevice.10.bc, lib/libnvvm.so.4
  "nvidia-cuda-runtime==13.0.96"  # include/cuda_runtime.h, cuda_fp16.h, cuda_bf16.h, lib/libcudart.so.13, libcudart_static.a
  "nvidia-cuda-cccl==13.0.85"     # include/cccl/{cub,thrust,cuda,nv} (libcu++)
)

VENV="$PREFIX/venv"
CUDA_ROOT_DIR="$PREFIX/cuda"

print_env() {
  cat <<EOF
export CUDA_ROOT=$CUDA_ROOT_DIR
export CUDA_HOME=$CUDA_ROOT_DIR
export CUDA_PATH=$CUDA_ROOT_DIR
export CUDA_TOOLKIT_ROOT_DIR=$CUDA_ROOT_DIR
export PATH=$CUDA_ROOT_DIR/bin:\$PATH
export CUDA_COMPUTE_CAP=90
export CUDARC_CUDA_VERSION=13000
export LIBRARY_PATH=$CUDA_ROOT_DIR/lib64:$PREFIX/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}
EOF
}

if [ "$MODE" = "--env" ]; then print_env; exit 0; fi

mkdir -p "$PREFIX"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# pip is a no-op when the pinned versions are already installed
"$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-deps "${PKGS[@]}"

SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
CU="$SITE/nvidia/cu13"
[ -x "$CU/bin/nvcc" ] || { echo "nvcc not found in $CU/bin" >&2; exit 1; }

# Toolkit layout expected by nvcc / cudaforge / cudarc / cmake:  $CUDA_ROOT/{bin,include,lib64,nvvm}
ln -sfn "$CU" "$CUDA_ROOT_DIR"
ln -sfn lib "$CU/lib64"                                 # nvcc.profile & build scripts use lib64
ln -sfn libcudart.so.13 "$CU/lib/libcudart.so"          # for `-lcudart` at link time
# (no libcuda.so stub is shipped in any wheel: that's fine with cudarc dynamic-loading)

# sanity check: version + PTX for sm_90
"$CUDA_ROOT_DIR/bin/nvcc" --version
TMP="$(mktemp -d)"; trap 'rm -rf "$TMP"' EXIT
cat > "$TMP/t.cu" <<'EOF'
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
extern "C" __global__ void t(__nv_bfloat16 *x, float a) { int i = threadIdx.x; x[i] = __float2bfloat16(a * __bfloat162float(x[i]) + __expf(a)); }
EOF
"$CUDA_ROOT_DIR/bin/nvcc" --ptx -arch=sm_90 -O3 -std=c++17 -o "$TMP/t.ptx" "$TMP/t.cu"
grep -E '^\.(version|target)' "$TMP/t.ptx"

# Link-time stubs with the real SONAMEs, generated from the declarations in cudarc's sources.
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cargo fetch --manifest-path "$REPO_ROOT/Cargo.toml" -q
CUDARC="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10 | head -1)"
[ -d "$CUDARC/src" ] || { echo "cudarc 0.19.10 sources not found (cargo fetch failed?)" >&2; exit 1; }
mkdir -p "$PREFIX/stubs"
stub() { # <cudarc module> <link name> <soname>
  local names="$TMP/$2.txt"
  grep -hoE '^\s+fn [A-Za-z_][A-Za-z0-9_]*\(' "$CUDARC/src/$1/sys/mod.rs" \
    | sed -E 's/^\s+fn ([A-Za-z0-9_]+)\(/\1/' | sort -u >"$names"
  [ -s "$names" ] || { echo "no symbols found for $2 in $CUDARC/src/$1" >&2; exit 1; }
  sed 's/.*/void &(void) {}/' "$names" >"$TMP/$2.c"
  cc -shared -fPIC -Wl,-soname,"$3" -o "$PREFIX/stubs/lib$2.so" "$TMP/$2.c"
  echo "stub lib$2.so -> $3 ($(wc -l <"$names") symbols)"
}
stub driver cuda libcuda.so.1
stub cublas cublas libcublas.so.13
stub cublaslt cublasLt libcublasLt.so.13
stub curand curand libcurand.so.10
stub nvrtc nvrtc libnvrtc.so.13

echo "OK: nvcc works. Export these:"
print_env
