#!/usr/bin/env bash
# Set up, build the embedded default artifact from packaged weights, and run one generation.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/safesteer-export -o artifacts/default --reuse
.venv/bin/safesteer-generate artifacts/default --prompt "Give me three tips for staying focused while studying." --max-new-tokens 64
