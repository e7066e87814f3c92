#!/usr/bin/env bash
# Adapters written by peft-rs load in Python peft and give peft-rs's logits there: one adapter per
# method that peft reads (LoRA, rsLoRA, DoRA, LoRA on embeddings, IA3, prompt tuning, prefix tuning
# with and without its MLP) on the tiny test BERT, checked by tests/fixtures/methods/check_peft_loads.py
# (PeftModel.from_pretrained, no missing/unexpected keys, logits within 1e-4); and the merged
# checkpoints of the mergeable ones load in plain transformers with the same logits
# (tests/fixtures/methods/check_merged_loads.py).
# The other direction (peft's files in peft-rs) is crates/peft-models/tests/methods_parity.rs.
#
#   scripts/check-peft-interop.sh        # installs the pinned Python env (scripts/python-env.sh) first
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/python-env.sh
VENV="${PEFT_RS_VENV:-$PWD/.venv-py}"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cargo run --quiet --release --example export_adapters -- "$out"
failed=()
for logits in "$out"/*.safetensors; do
  case=$(basename "$logits" .safetensors)
  echo "::: $case"
  if ! "$VENV/bin/python" tests/fixtures/methods/check_peft_loads.py "$out/$case" "$logits"; then
    failed+=("$case")
  fi
  if [ -d "$out/merged_$case" ]; then
    echo "::: $case merged (peft-rs merge's checkpoint in plain transformers)"
    if ! "$VENV/bin/python" tests/fixtures/methods/check_merged_loads.py "$out/merged_$case" "$logits"; then
      failed+=("merged_$case")
    fi
  fi
done
if [ ${#failed[@]} -ne 0 ]; then
  echo "Python peft does not reproduce peft-rs for: ${failed[*]}"
  exit 1
fi
echo "Python peft loads every peft-rs adapter and reproduces its logits"
