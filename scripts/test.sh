#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Extra arguments go to pytest (e.g. -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the tests also cover safesteer-serve --ray (the serve-ray extra, which the main job does not need)
.venv/bin/python -m pip install --quiet -c constraints.txt -e '.[serve-ray]'
.venv/bin/python -m pytest -q "$@"
