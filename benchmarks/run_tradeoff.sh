#!/usr/bin/env bash
# Memory/AUC tradeoff sweeps behind benchmarks/RESULTS.md: every method at ratios 1, 10, 100, 1000
# on the same data and model, then the side-by-side comparison with the published anchors.
#
# Usage: benchmarks/run_tradeoff.sh movielens|synth1m|anchors|all [SEEDS]
#   movielens  ml-latest-small, configs/demo.yaml (DLRM, dim 16, 2 epochs)      ~20 min on 2 cores
#   synth1m    1M-row synth, criteo26 cardinalities (26 features, 1e5–3e5 ids in the largest),
#              configs/synth_dlrm.yaml (DLRM, dim 16, 2 epochs, batch 2048)      hours on 2 cores
#   anchors    the anchors table from whichever sweeps exist, and the tradeoff block of RESULTS.md
# Sweeps resume: re-running a command skips finished cells (and retries failed ones).
# Env: SWEEP_DIR (default /tmp/embtables-tradeoff), METHODS (comma-separated; default all below).
set -euo pipefail
cd "$(dirname "$0")/.."
WHAT=${1:-all}
SEEDS=${2:-1}
DIR=${SWEEP_DIR:-/tmp/embtables-tradeoff}
METHODS=${METHODS:-hash,qr,mixed_dim,multiplexed,low_rank,binary_code,optembed}
RATIOS=1,10,100,1000
BIN=.venv/bin/embtables
KEEP=benchmarks/tradeoff   # the committed copies: results.md, results.csv, pareto.png
mkdir -p "$DIR"

publish() {  # sweep dir → committed copy
  mkdir -p "$KEEP/$2"
  cp "$1/results.md" "$1/results.csv" "$1/pareto.png" "$KEEP/$2/"
}

if [[ $WHAT == movielens || $WHAT == all ]]; then
  test -f "$DIR/movielens/stats.json" || $BIN data movielens data/ml-latest-small "$DIR/movielens"
  # `|| true`: a failed cell is reported in the table and retried by the next run; publish anyway.
  $BIN bench tradeoff configs/demo.yaml --methods "$METHODS" --ratios $RATIOS --seeds "$SEEDS" \
    --out "$DIR/sweep-movielens" --set data.train="$DIR/movielens" || true
  publish "$DIR/sweep-movielens" movielens
fi

if [[ $WHAT == synth1m || $WHAT == all ]]; then
  test -f "$DIR/synth-1m/stats.json" || \
    $BIN data synth "$DIR/synth-1m" --preset criteo26 --rows 1000000
  $BIN bench tradeoff configs/synth_dlrm.yaml --methods "$METHODS" --ratios $RATIOS --seeds "$SEEDS" \
    --out "$DIR/sweep-synth1m" --set data.train="$DIR/synth-1m" || true
  publish "$DIR/sweep-synth1m" synth1m
fi

if [[ $WHAT == anchors || $WHAT == all || $WHAT == movielens || $WHAT == synth1m ]]; then
  .venv/bin/python benchmarks/anchors.py --sweep "ml-latest-small=$KEEP/movielens" \
    --sweep "synth 1M rows, criteo26=$KEEP/synth1m" --out "$KEEP/anchors.md" --section benchmarks/RESULTS.md
  echo "→ $KEEP/{movielens,synth1m}/results.md, pareto.png, $KEEP/anchors.md and benchmarks/RESULTS.md"
fi
