#!/usr/bin/env bash
# Memory/AUC tradeoff sweeps behind benchmarks/RESULTS.md: every method at ratios 1, 10, 100, 1000
# on the same data and model, then the side-by-side comparison with the published anchors.
#
# Usage: benchmarks/run_tradeoff.sh movielens|synth400k|synth1m|anchors|all [SEEDS]
#   movielens  ml-latest-small, configs/demo.yaml (DLRM, dim 16, 2 epochs)           ~20 min on 2 cores
#   synth400k  400k-row synth, preset criteo26-tail (26 power-law features, ~1.35M ids),
#              configs/synth_tail.yaml (DLRM, dim 16, 1 epoch, batch 2048)            ~15 min
#   synth1m    the same generator at 1M rows (~2.5M ids; 1e5–6e5 in the largest)      ~40 min
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

rows_of() { local n=${1/k/000}; echo "${n/m/000000}"; }  # 400k → 400000, 1m → 1000000

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

for rows in 400k 1m; do
  if [[ $WHAT == synth$rows || $WHAT == all ]]; then
    test -f "$DIR/synth-$rows/stats.json" || \
      $BIN data synth "$DIR/synth-$rows" --preset criteo26-tail --rows "$(rows_of "$rows")"
    $BIN bench tradeoff configs/synth_tail.yaml --methods "$METHODS" --ratios $RATIOS --seeds "$SEEDS" \
      --out "$DIR/sweep-synth$rows" --set data.train="$DIR/synth-$rows" || true
    publish "$DIR/sweep-synth$rows" "synth$rows"
  fi
done

if [[ $WHAT != none ]]; then  # every target ends by rebuilding the tables from the committed copies
  .venv/bin/python benchmarks/anchors.py --sweep "ml-latest-small=$KEEP/movielens" \
    --sweep "synth 400k rows, criteo26-tail=$KEEP/synth400k" --sweep "synth 1M rows, criteo26-tail=$KEEP/synth1m" \
    --out "$KEEP/anchors.md" --section benchmarks/RESULTS.md
  echo "→ $KEEP/{movielens,synth400k,synth1m}/results.md, pareto.png, $KEEP/anchors.md and benchmarks/RESULTS.md"
fi
