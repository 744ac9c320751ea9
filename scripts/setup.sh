#!/usr/bin/env bash
# Create .venv (once) and install lightning-demp with the test and demo extras, pinned by constraints.txt.
# torch==2.13.0 is pinned there: pip takes the CPU wheel when one is on disk instead of a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet -c constraints.txt -e '.[test,docs]'
