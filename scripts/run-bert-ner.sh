#!/usr/bin/env bash
# The main job, from a fresh clone: fetch the assets, build peft-rs, train recipes/bert-ner.toml
# (all-MiniLM-L6-v2 + LoRA on CoNLL-2003) and print the test-set entity F1.
# Extra arguments go to `peft-rs train` (e.g. --set train.epochs=1).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup-assets.sh
cargo build --release -p peft-cli
./target/release/peft-rs train recipes/bert-ner.toml "$@"
