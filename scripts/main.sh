#!/usr/bin/env bash
# Set up, build the embedded default artifact from packaged weights (LLaVA: DINOv2-S + Qwen2.5-Coder-0.5B,
# SafeSteer calibrated), then run the quick evaluation: a table of refusal rates per suite and mode, and one
# defended vs undefended example. Everything is cached: a second run reuses the artifact and the finished
# generations (safesteer-eval resumes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/safesteer-export -o artifacts/default --reuse
.venv/bin/safesteer-eval artifacts/default --suite quick --out artifacts/eval-quick
