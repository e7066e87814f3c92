#!/usr/bin/env bash
# Builds the CUDA peft-rs binary on a machine without a GPU (README: CUDA):
#   1. scripts/install-cuda-toolkit.sh: nvcc 13.0 from PyPI wheels and link-time stubs (.cuda/)
#   2. cargo build --release --features cuda (target/cuda, kept apart from the CPU build)
#   3. dist/peft-rs-cuda.gz: the stripped binary, compressed, to carry to a GPU machine
# A clean build takes ~15 minutes on 2 cores (most of it nvcc on candle's kernels); rebuilds
# after a change to peft-rs take about a minute.
#
#   scripts/build-cuda.sh            # build + copy to dist/
#   scripts/build-cuda.sh --check    # also clippy the CUDA code (what CI runs)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
scripts/install-cuda-toolkit.sh "$REPO/.cuda" >/dev/null
eval "$(scripts/install-cuda-toolkit.sh "$REPO/.cuda" --env)"
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
echo "[build-cuda] nvcc: $(nvcc --version | tail -1)"
if [ "${1:-}" = --check ]; then
  echo "[build-cuda] cargo clippy --release --features cuda --workspace --all-targets -- -D warnings"
  cargo clippy --release --features cuda --target-dir target/cuda -p peft-core -p peft-models \
    -p peft-train -p peft-cli --all-targets -- -D warnings
fi
echo "[build-cuda] cargo build --release --features cuda -p peft-cli --target-dir target/cuda"
cargo build --release --features cuda -p peft-cli --target-dir target/cuda
mkdir -p dist
# Stripped and compressed (it is mostly candle's PTX text) for carrying to a GPU machine:
# ~16 MB instead of ~58.
strip --strip-all -o dist/peft-rs-cuda.tmp target/cuda/release/peft-rs
gzip -6 -c dist/peft-rs-cuda.tmp >dist/peft-rs-cuda.gz.tmp && mv dist/peft-rs-cuda.gz.tmp dist/peft-rs-cuda.gz
rm -f dist/peft-rs-cuda.tmp dist/peft-rs-cuda
echo "[build-cuda] dist/peft-rs-cuda.gz: $(du -h dist/peft-rs-cuda.gz | cut -f1)"
echo "[build-cuda] linked CUDA libraries (resolved on the GPU machine):"
readelf -d target/cuda/release/peft-rs | grep NEEDED | grep -E "cu|nvrtc" | sed 's/^/[build-cuda]   /'
