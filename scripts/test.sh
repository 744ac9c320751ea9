#!/usr/bin/env bash
# Set up, then check: ruff (lint), mypy (types, package and benchmarks), the docs (mkdocs --strict) and the test suite (unit, Lightning, DDP and CLI tests plus the
# docstring examples).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check lightning_demp tests benchmarks scripts
.venv/bin/ruff format --check lightning_demp tests benchmarks scripts
.venv/bin/mypy
.venv/bin/mypy benchmarks
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet -d "$(mktemp -d)"
exec .venv/bin/python -m pytest -q "$@"
