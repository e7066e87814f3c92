#!/usr/bin/env bash
# peft-rs vs Python peft on the CPU: the same cases (random-weight BERT shapes, batch 16 (BATCHES), seq 128,
# f32; training steps for full fine-tuning, LoRA r=8 on query/value and on every linear; inference
# base / LoRA unmerged / merged), the same threads, interleaved A B A B so that drift on a shared
# machine hits both sides, then one table with the ratios (benches/compare/cpu_table.py), written to
# $OUT/table.md and into BENCHMARKS.md's block for $OUT's name (`<!-- cpu_compare NAME -->`), with
# the machine, versions and command.
#
#   benches/compare/cpu_compare.sh                  # REPS=2 MODELS="minilm bert-base" STEPS=5
#   REPS=1 MODELS=minilm STEPS=3 benches/compare/cpu_compare.sh
#   BATCHES="8 16" benches/compare/cpu_compare.sh     # both batch sizes of issue 6
#   PRECISION=bf16 benches/compare/cpu_compare.sh   # products with frozen weights in bf16 on AMX on
#                                                   # both sides (results/cpu-bf16)
#   GEMM=mkl benches/compare/cpu_compare.sh         # peft-rs's f32 GEMMs on MKL (scripts/install-mkl.sh,
#                                                   # PEFT_RS_MKL; results/cpu-mkl); PyTorch uses MKL anyway
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
PRECISION="${PRECISION:-f32}"
GEMM="${GEMM:-gemm}"
suffix=""
[ "$PRECISION" = f32 ] || suffix="-$PRECISION"
if [ "$GEMM" = mkl ]; then
  suffix="$suffix-mkl"
  eval "$(scripts/install-mkl.sh --export)"
else
  export PEFT_RS_MKL=off
fi
OUT="${OUT:-benches/compare/results/cpu$suffix}"
THREADS="${THREADS:-2}"
STEPS="${STEPS:-5}"
WARMUP="${WARMUP:-1}"
REPS="${REPS:-2}"
MODELS="${MODELS:-minilm bert-base}"
BATCHES="${BATCHES:-16}"
mkdir -p "$OUT"
cargo build --release -p peft-cli
scripts/python-env.sh >/dev/null
echo "# $(date -u +%FT%TZ) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), $THREADS threads, steps $STEPS, reps $REPS, matmul precision $PRECISION, peft-rs f32 GEMM $GEMM"
# Where the numbers come from, for the table's last paragraph (cpu_table.py).
python3 - "$OUT/run.json" <<PY
import json, sys
json.dump({"cpu": """$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)""", "cores": $(nproc),
           "date": "$(date -u +%F)", "commit": "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)",
           "command": "REPS=$REPS STEPS=$STEPS WARMUP=$WARMUP THREADS=$THREADS MODELS='$MODELS' BATCHES='$BATCHES' PRECISION=$PRECISION GEMM=$GEMM OUT=$OUT benches/compare/cpu_compare.sh"},
          open(sys.argv[1], "w"), indent=2)
PY
for rep in $(seq 1 "$REPS"); do
  for tag in $(for b in $BATCHES; do for m in $MODELS; do echo "$m-b$b"; done; done); do
    model="${tag%-b*}" batch="${tag##*-b}"
    echo "== rep $rep $model batch $batch: peft-rs"
    RAYON_NUM_THREADS="$THREADS" ./target/release/peft-rs bench --model "$model" --batch "$batch" --seqs 128 \
      --steps "$STEPS" --warmup "$WARMUP" --matmul-precision "$PRECISION" --out "$OUT/rep$rep-$tag-rust.json"
    echo "== rep $rep $model batch $batch: Python peft, one process per case"
    # One process per case: CPython's heap keeps what a case freed, so a case run after another
    # would report the earlier case's memory in its peak RSS.
    parts=()
    for case in full lora-qv lora-all base lora-unmerged lora-merged; do
      part="$OUT/.rep$rep-$tag-python-$case.json"
      OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS" .venv-py/bin/python \
        benches/compare/peft_gpu_bench.py --device cpu --dtype f32 --model "$model" --threads "$THREADS" \
        --batch "$batch" --seqs 128 --cases train,infer --methods "$case" --steps "$STEPS" --warmup "$WARMUP" \
        --matmul-precision "$PRECISION" --out "$part"
      parts+=("$part")
    done
    python3 -c 'import json, sys
docs = [json.load(open(p)) for p in sys.argv[2:]]
merged = dict(docs[0], cases=[c for d in docs for c in d["cases"]])
json.dump(merged, open(sys.argv[1], "w"), indent=2)' "$OUT/rep$rep-$tag-python.json" "${parts[@]}"
    rm -f "${parts[@]}"
  done
done
python3 benches/compare/cpu_table.py "$OUT" --into BENCHMARKS.md | tee "$OUT/table.md"
