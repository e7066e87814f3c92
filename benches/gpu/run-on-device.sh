#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (see README: CUDA). It builds nothing: it runs
# the peft-rs binary built here with `scripts/build-cuda.sh` (carried as dist/peft-rs-cuda.gz) and the
# Python peft side with the machine's own PyTorch, and writes everything under $OUT:
#   kernels.json   every op on the GPU against the CPU reference, a training step GPU vs CPU,
#                  and the LoRA linear timings (fused / unfused / frozen alone)
#   rust.json      peft-rs training steps and inference, BERT-base, bf16, batch 32, seq 128/512
#   python.json    the same cases with transformers + peft (benches/compare/peft_gpu_bench.py)
#   log.txt        everything printed
#
#   run from the repository root:  OUT=/some/dir benches/gpu/run-on-device.sh [quick]
set -uo pipefail
OUT="${OUT:?set OUT to the output folder}"
BIN="${PEFT_RS_BIN:-}"
if [ -z "$BIN" ]; then
  BIN=/tmp/peft-rs-cuda
  gunzip -c dist/peft-rs-cuda.gz >"$BIN" || { echo "no dist/peft-rs-cuda.gz (scripts/build-cuda.sh)"; exit 2; }
fi
PY="${PEFT_RS_GPU_PYTHON:-/opt/torch/.venv/bin/python}"
STEPS="${STEPS:-20}"
WARMUP="${WARMUP:-3}"
exec > >(tee -a "$OUT/log.txt") 2>&1

# CUDA 13 libraries: the PyTorch venv's wheels first, the system toolkit after (libcurand).
TORCH_LIB="$(ls -d /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib 2>/dev/null | head -1)"
export LD_LIBRARY_PATH="${TORCH_LIB}:/usr/local/cuda-13.0/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
echo "== LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
chmod +x "$BIN"
if ldd "$BIN" | grep -q "not found"; then
  echo "== missing libraries:"; ldd "$BIN" | grep "not found"
  exit 3
fi

step() { # <name> <timeout s> <command...>
  local name="$1" limit="$2"; shift 2
  echo "== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
}

step kernels 120 "$BIN" bench --suite kernels --device cuda:0 --steps "$STEPS" --warmup "$WARMUP" \
  --out "$OUT/kernels.json"
[ "${1:-}" = quick ] && exit 0
step rust 180 "$BIN" bench --suite train,infer --model bert-base --device cuda:0 --dtype bf16 \
  --batch 32 --seqs 128,512 --steps "$STEPS" --warmup "$WARMUP" --phases --out "$OUT/rust.json"
step python 180 "$PY" benches/compare/peft_gpu_bench.py --device cuda --dtype bf16 --batch 32 \
  --seqs 128,512 --steps "$STEPS" --warmup "$WARMUP" --out "$OUT/python.json"
# Where the time goes, when the machine has Nsight Systems: a kernel and API summary of a few
# LoRA training steps (BERT-base, seq 128).
NSYS="$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1)"
if [ -n "$NSYS" ]; then
  step nsys 120 "$NSYS" profile -t cuda -o "$OUT/lora-qv-seq128" --force-overwrite true --stats=false \
    "$BIN" bench --suite train --methods lora-qv --model bert-base --device cuda:0 --dtype bf16 \
    --batch 32 --seqs 128 --steps 5 --warmup 2
  step nsys-stats 90 "$NSYS" stats -r cuda_gpu_kern_sum,cuda_api_sum -f csv -o "$OUT/nsys" \
    "$OUT/lora-qv-seq128.nsys-rep" >/dev/null
  rm -f "$OUT/lora-qv-seq128.nsys-rep" "$OUT"/*.sqlite
  head -25 "$OUT"/nsys_cuda_gpu_kern_sum.csv 2>/dev/null
else
  echo "== no nsys on this machine"
fi
echo "== done $(date -u +%FT%TZ)"
