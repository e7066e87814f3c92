#!/usr/bin/env bash
# The project's test command (README, CI): fetch the real model and data the parity tests need,
# then run every test of the workspace. Assets are required here: a parity test that cannot find
# all-MiniLM-L6-v2 fails instead of skipping.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup-assets.sh
PEFT_RS_REQUIRE_ASSETS=1 cargo test --workspace "$@"
