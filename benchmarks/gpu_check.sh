#!/usr/bin/env bash
# The GPU check of issue 12, in one run (~6 min): GPU tests + `embtables bench gpu`.
#
# Run from the repo root on a CUDA machine that has torch + triton (and pytest) but maybe not our
# other dependencies: wheels found in .gpu/ (fbgemm_gpu, torchrec, tensordict, iopath, pyvers) are
# installed to /tmp/site, the package to /tmp/pkg, nothing else is touched. Ray is not needed.
# Results go to $OUT (default ./gpu_out): install.log, env.txt, test_gpu.log, bench_gpu.log,
# bench_gpu.json. Knobs for a dry run elsewhere: PY (python), WHEELS=none (skip the wheels),
# EXTRA_PATH (prepended to PYTHONPATH), SITE / PKG (install dirs).
set -u
PY=${PY:-python3}
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
SITE=${SITE:-/tmp/site} PKG=${PKG:-/tmp/pkg}
rm -rf "$PKG"
{
  if [ "${WHEELS:-}" != none ] && ls .gpu/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-deps --no-index --target "$SITE" .gpu/*.whl
  fi
  "$PY" -m pip install -q --no-deps --no-build-isolation --no-index --target "$PKG" .
} >"$OUT/install.log" 2>&1 || { echo "install failed:"; tail -20 "$OUT/install.log"; exit 1; }
export PYTHONPATH="${EXTRA_PATH:+$EXTRA_PATH:}$PKG:$SITE${PYTHONPATH:+:$PYTHONPATH}"
# -P: the repo root is not put on sys.path, so `embtables` is the installed package (with
# embtables.kernels / embtables.pipelines), not the source folder of the same name.
PYP="$PY -P"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  $PYP -c "import torch, embtables, embtables.kernels as k; from embtables.kernels.fbgemm_lookup import fbgemm_cuda_available as f
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())
print('embtables from', embtables.__file__, '| fbgemm CUDA kernels:', f())
import importlib.util as u
print('missing modules:', [m for m in ('numpy', 'pyarrow', 'pandas', 'yaml', 'tqdm', 'safetensors', 'torchrec',
      'fbgemm_gpu', 'triton', 'pytest', 'matplotlib', 'ray') if u.find_spec(m) is None] or 'none')"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

cd "$OUT"  # tests write only to pytest's tmp dirs; keep the repo clean
timeout 240 $PYP -m pytest -q -m gpu -p no:cacheprovider -rs "$OLDPWD/tests/test_gpu.py" -c "$OLDPWD/pytest.ini" \
  --rootdir "$OLDPWD" >"$OUT/test_gpu.log" 2>&1
echo "test_gpu exit $?"; tail -15 "$OUT/test_gpu.log"
timeout 150 $PYP -m embtables.pipelines.cli.main bench gpu --json "$OUT/bench_gpu.json" >"$OUT/bench_gpu.log" 2>&1
echo "bench gpu exit $?"; tail -20 "$OUT/bench_gpu.log"
