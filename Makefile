# One-command set-up: `make demo` and `make test` build .venv first when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow clean

install: $(STAMP)

$(STAMP): requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip wheel setuptools
	$(PY) -m pip install -r requirements.txt
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
	$(VENV)/bin/python -m pytest -q -m "not slow" tests

test-slow: install
	$(VENV)/bin/python -m pytest -q -m slow tests

clean:
	rm -rf $(VENV) runs data/prepared build *.egg-info
