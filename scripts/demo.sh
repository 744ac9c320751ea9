#!/usr/bin/env bash
# Set up, then train the residual CNN on MNIST-1D (generated offline) with DemonPruning: the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/lightning-demp fit "$@"
