#!/usr/bin/env bash
# Rerun every benchmark in the order the committed results were produced; `--quick` runs each one's smoke mode
# (its files end in `_quick` and are not committed). Accuracy benchmarks run side by side, one process per core
# (BENCH_JOBS overrides); the timing benchmarks (selection_speed, speed, removal_cost) run alone, last.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
QUICK=${1:-}
run() { echo "== $*"; start=$(date +%s); "$PY" "$@" $QUICK; echo "== $1 took $(( $(date +%s) - start )) s"; }
run benchmarks/frontier.py --model cnn
run benchmarks/frontier.py --model cnn --decoupled
run benchmarks/frontier.py --model mlp
run benchmarks/frontier.py --model mlp --add-reg-max 0.15 0.3 1.0
run benchmarks/frontier.py --model cnn --decoupled --add-reg-max 0.002 0.07 0.08 0.09 0.1
run benchmarks/validation_dip.py
run benchmarks/validation_dip.py --recalibration-batches 12
run benchmarks/validation_dip.py --dense
run benchmarks/validation_dip.py --variants
run benchmarks/target.py
run benchmarks/target.py --models mlp --targets 0.8 --force-target --append
run benchmarks/frontier.py --model transformer --epochs 20
run benchmarks/frontier.py --model transformer --epochs 20 --add-reg-max 3 --penalize prunable
run benchmarks/frontier.py --model cnn --fair      # resumes: runs only the grid points its JSON lacks
run benchmarks/frontier.py --model mlp --fair
run benchmarks/frontier.py --model transformer --fair --epochs 20
run benchmarks/collapse.py --seeds 0 1 2
run benchmarks/collapse.py --seeds 0 1 2 --floors 0.05 --death-fractions 0.5
run benchmarks/collapse.py --models unseen unseen_mlp --seeds 0 1 2 --floors 0.05 --death-fractions 1 0.5
run benchmarks/collapse.py --models unseen_mlp --reg-max 0.03 0.1 0.3 1 3 --seeds 0 1 2 --floors 0.05 --death-fractions 1 0.5
run benchmarks/demo_vs_dense.py
run benchmarks/death.py
run benchmarks/selection_speed.py
run benchmarks/step_pieces.py
run benchmarks/overhead.py
run benchmarks/index_add_cost.py
run benchmarks/speed.py
run benchmarks/removal_cost.py
run benchmarks/round_to.py
run benchmarks/coverage.py
run benchmarks/hf_end_to_end.py
