# msm-lightning: every target creates .venv and installs the project when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build this machine has on disk; set TORCH_SPEC= to keep whatever torch pip picks elsewhere.
TORCH_SPEC ?= torch==2.14.1 torchaudio==2.11.0
STAMP := $(VENV)/.installed

.PHONY: install test test-slow demo bench lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(if $(strip $(TORCH_SPEC)),$(PY) -m pip install $(TORCH_SPEC))
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

demo: $(STAMP)
	$(VENV)/bin/msm synth data/demo --n-files 64 --n-corrupt 2
	$(VENV)/bin/msm fit --config demo.yaml

bench: $(STAMP)
	$(PY) bench/bench_step.py
	$(PY) bench/bench_scan.py

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf runs data/demo .pytest_cache
