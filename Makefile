# One-command set-up: `make demo` and `make test` build .venv first when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The install set: CUDA (torch CUDA build + fbgemm-gpu) when nvidia-smi lists a GPU or GPU=1,
# else CPU (fbgemm-gpu-cpu). GPU=0 forces the CPU set.
GPU ?= $(shell nvidia-smi -L 2>/dev/null | grep -q '^GPU' && echo 1 || echo 0)
SET := $(if $(filter 1,$(GPU)),cuda,cpu)
# TORCH=keep: build the venv on top of the torch 2.13 already installed for $(PYTHON) (e.g. your
# CUDA build): the venv sees system site-packages and pip keeps that torch (it satisfies ==2.13.0).
TORCH ?= install
# The CPU-only torch build; used for the CPU set when reachable (PyPI has only the CUDA build).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.installed-$(SET)

.PHONY: install demo test test-slow test-gpu clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-$(SET).txt setup.py
	@# fbgemm-gpu and fbgemm-gpu-cpu both install `fbgemm_gpu`: switching sets starts a fresh venv.
	@if ls $(VENV)/.installed-* 2>/dev/null | grep -qv '$(STAMP)'; then \
		echo "switching to the $(SET) set: rebuilding $(VENV)"; rm -rf $(VENV); fi
	$(PYTHON) -m venv $(if $(filter keep,$(TORCH)),--system-site-packages) $(VENV)
	@test "$(TORCH)" != keep || $(PY) -c "import sys, importlib.metadata as m; \
		v = next((d.version for d in m.distributions() if d.metadata['Name'] == 'torch'), 'none'); \
		sys.exit(None if v.startswith('2.13.') else f'error: TORCH=keep needs torch 2.13.x (fbgemm 1.8 pairs with it), found {v}')"
	$(PY) -m pip install --upgrade pip wheel setuptools
	@index=; if [ "$(SET)" = cpu ] && [ "$(TORCH)" != keep ]; then \
		if $(PY) -c "import urllib.request as u; u.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=5)" 2>/dev/null; \
		then index="--extra-index-url $(TORCH_CPU_INDEX)"; \
		else echo "note: $(TORCH_CPU_INDEX) unreachable; torch comes from PyPI (its CUDA build, runs on CPU)"; fi; fi; \
		echo "$(PY) -m pip install $$index -r requirements-$(SET).txt"; \
		$(PY) -m pip install $$index -r requirements-$(SET).txt
	@# torchrec's metadata asks for an unpinned fbgemm-gpu (the CUDA build, latest release) and
	@# torchmetrics==1.0.3; its real runtime needs are in requirements.txt.
	$(PY) -m pip install --no-deps torchrec==1.8.0
	$(PY) -m pip install --no-deps -e .
	touch $(STAMP)

# A real training run on the shipped MovieLens data: ingest, train, print AUC.
demo: install
	test -f data/prepared/movielens/stats.json || \
		$(VENV)/bin/embtables data movielens data/ml-latest-small data/prepared/movielens
	rm -rf runs/demo
	$(VENV)/bin/embtables train configs/demo.yaml --out runs/demo
	@$(PY) -c "import json; m = json.load(open('runs/demo/metrics.json')); print(f\"demo AUC {m['auc']:.4f}  logloss {m['logloss']:.4f}  {m['samples_per_sec']:.0f} samples/s\")"

# The fast suite (< 10 min with set-up on 2 cores); the Ray job tests are `make test-slow`.
test: install
	$(VENV)/bin/python -m pytest -q -m "not slow and not gpu" tests

test-slow: install
	$(VENV)/bin/python -m pytest -q -m slow tests

# GPU tests (skipped without CUDA). Alone: tests/test_triton.py would switch Triton to its interpreter.
test-gpu: install
	$(VENV)/bin/python -m pytest -q -m gpu tests/test_gpu.py

clean:
	rm -rf $(VENV) runs data/prepared build *.egg-info
