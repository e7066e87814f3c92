#!/usr/bin/env bash
# Trains every adapter method of recipes/methods/ on CoNLL-2003 with all-MiniLM-L6-v2 on the same
# budget (full fine-tuning first) and writes the comparison table: test entity F1, trainable
# parameters, adapter bytes, training step time and peak RSS.
#
#   scripts/compare-methods.sh                 # every method, LIMIT=2000 sentences, EPOCHS=2
#   LIMIT=0 EPOCHS=3 scripts/compare-methods.sh lora dora ia3   # full training set, some methods
#
# Each run writes runs/methods/<method>/ (summary.json, metrics, the adapter, peak RSS); the table
# goes to runs/methods/table.md and, with --write, into BENCHMARKS.md between its markers.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
LIMIT="${LIMIT:-2000}"
EPOCHS="${EPOCHS:-2}"
write=0
methods=()
for arg in "$@"; do
  case "$arg" in
    --write) write=1 ;;
    *) methods+=("$arg") ;;
  esac
done
if [ ${#methods[@]} -eq 0 ]; then
  methods=(full lora lora-all rslora dora pissa ia3 houlsby pfeiffer parallel prefix prompt bitfit layernorm)
fi
scripts/setup-assets.sh
cargo build --release -p peft-cli
bin=./target/release/peft-rs
overrides=(--set "train.epochs=$EPOCHS")
if [ "$LIMIT" != 0 ]; then
  overrides+=(--set "data.limit_train=$LIMIT")
fi
for m in "${methods[@]}"; do
  run="runs/methods/$m"
  mkdir -p "$run"
  echo "::: $m: $bin train recipes/methods/$m.toml ${overrides[*]}"
  /usr/bin/time -f '%M' -o "$run/max_rss_kb.txt" \
    "$bin" train "recipes/methods/$m.toml" --quiet "${overrides[@]}"
done
python3 benches/compare/methods_table.py runs/methods "${methods[@]}" \
  --budget "$( [ "$LIMIT" = 0 ] && echo "all 14,041" || echo "$LIMIT") training sentences, $EPOCHS epochs" \
  > runs/methods/table.md
cat runs/methods/table.md
if [ "$write" = 1 ]; then
  python3 benches/compare/methods_table.py --insert BENCHMARKS.md runs/methods/table.md
fi
