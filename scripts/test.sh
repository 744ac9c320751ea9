#!/usr/bin/env bash
# Set up, then check: ruff (lint), mypy (types) and the test suite (unit, Lightning, DDP and CLI tests plus the
# docstring examples).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check lightning_demp tests benchmarks
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
