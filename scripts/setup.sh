#!/usr/bin/env bash
# Create .venv and install safesteer with the CPU runtime, the exporter and the test tools, at the versions in
# constraints.txt (the ones the tests and the published results were verified with).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e '.[cpu,export,eval,serve,dev]'
