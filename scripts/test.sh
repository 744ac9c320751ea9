#!/usr/bin/env bash
# Set up, then run the test suite (unit, Lightning and CLI tests plus the docstring examples).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
