#!/usr/bin/env bash
# Training samples/s of DLRM at Criteo-like shapes (26 sparse features, dim 16, 13 dense),
# our fused CPU kernel vs FBGEMM TBE vs the pure-torch lookup, same data, same model, same seed.
# Usage: benchmarks/train_backends.sh [ROWS]   (default 400000; writes under ${BENCH_DIR:-/tmp/embtables-bench})
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${1:-400000}
DIR=${BENCH_DIR:-/tmp/embtables-bench}
BIN=.venv/bin/embtables
mkdir -p "$DIR"
test -f "$DIR/synth-$ROWS/stats.json" || $BIN data synth "$DIR/synth-$ROWS" --preset criteo26 --rows "$ROWS"
for backend in cpu_fused fbgemm torch; do
  rm -rf "$DIR/run-$backend"
  $BIN train configs/synth_dlrm.yaml --out "$DIR/run-$backend" --quiet \
    --set data.train="$DIR/synth-$ROWS" --set embedding.backend=$backend --set train.epochs=1 \
    --set train.batch_size=2048 --set "model.bottom_mlp=[512,256,64]" --set "model.top_mlp=[512,256]"
done
.venv/bin/python - "$DIR" <<'PY'
import json, sys
print("| backend | samples/s | valid AUC | train rows |")
print("|---|---|---|---|")
for b in ("cpu_fused", "fbgemm", "torch"):
    m = json.load(open(f"{sys.argv[1]}/run-{b}/metrics.json"))
    print(f"| {b} | {m['samples_per_sec']:,.0f} | {m['auc']:.4f} | {m['train_rows_seen']:,} |")
PY
