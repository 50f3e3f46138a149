# msm-lightning: every target creates .venv and installs the project when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build this machine has on disk; set TORCH_SPEC= to keep whatever torch pip picks elsewhere.
TORCH_SPEC ?= torch==2.14.1 torchaudio==2.11.0
STAMP := $(VENV)/.installed
MSM := $(VENV)/bin/msm

# `msm data build` needs fluidsynth (apt) to render notes; installed here when running as root.
.PHONY: data install test test-slow test-slurm test-heareval test-hear demo demo-synth benchmark hear-example bench lint format clean

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

# A real two-node SLURM cluster on this machine runs slurm/pretrain.sbatch (README, "SLURM"): 2 nodes x 1
# rank, then a job sent USR1 mid-run that must save, requeue itself and match the first run step for step.
# Root only (installs slurm-wlm and munge, edits /etc/hosts, starts daemons); skipped otherwise.
test-slurm: $(STAMP)
	$(PY) slurm/cluster_test.py

# hear-eval-kit beside msm-lightning: a venv layered on .venv (it sees .venv's packages through a .pth)
# holding heareval without its stale pins (--no-deps) and the modules its embeddings runner really imports.
HEAREVAL_VENV ?= .venv-heareval
HEAREVAL_STAMP := $(HEAREVAL_VENV)/.installed

$(HEAREVAL_STAMP): $(STAMP)
	test -x $(HEAREVAL_VENV)/bin/python || $(PYTHON) -m venv $(HEAREVAL_VENV)
	$(HEAREVAL_VENV)/bin/python -c "import site, sys; open(site.getsitepackages()[0] + '/msm_venv.pth', 'w').write('import site; site.addsitedir(%r)\n' % sys.argv[1])" "$$($(PY) -c 'import site; print(site.getsitepackages()[0])')"
	$(HEAREVAL_VENV)/bin/python -m pip install --no-deps heareval==2021.1.3
	$(HEAREVAL_VENV)/bin/python -m pip install tensorflow-cpu click python-slugify intervaltree
	touch $@

test-heareval: $(HEAREVAL_STAMP)
	MSM_REQUIRE_HEAREVAL=1 $(HEAREVAL_VENV)/bin/python -m pytest -q -m slow tests/test_heareval_integration.py

# Real audio end to end (README, "msm demo"): the data if it is missing, SSAM-T pretrained for 10 min,
# then pretrained vs random weights vs log-mel on a subset of the six tasks. Options: DEMO_ARGS="--minutes 5".
DEMO_ARGS ?=
demo: $(STAMP)
	test -d data/real/tasks || $(MAKE) data
	$(MSM) demo $(DEMO_ARGS)

# The synthetic-corpus smoke run: 100 CPU steps of SSAM-T on 64 generated clips.
demo-synth: $(STAMP)
	$(MSM) synth data/demo --n-files 64 --n-corrupt 2
	$(MSM) fit --config demo.yaml

# The full comparison on the six real tasks: 600 steps per family, 64 clips per split (about 2.5 h on
# 2 cores; rerun the same command to resume). The full tasks: BENCHMARK_ARGS="--max-per-split 0".
BENCHMARK_ARGS ?=
PEERS_STAMP := $(VENV)/.installed-peers

$(PEERS_STAMP): $(STAMP)
	$(PY) -m pip install -e ".[peers]"
	touch $@

benchmark: $(PEERS_STAMP)
	test -d data/real/tasks || $(MAKE) data
	$(MSM) benchmark $(BENCHMARK_ARGS)

# The official HEAR 2021 validator (hearvalidator, which imports TensorFlow) on every HEAR module, with
# random weights and with exported bundles: installed without its pins into the heareval venv above, which
# already holds TensorFlow. The peers need the `peers` extra; CREPE at full capacity takes minutes.
HEARVALIDATOR_STAMP := $(HEAREVAL_VENV)/.installed-hearvalidator

$(HEARVALIDATOR_STAMP): $(HEAREVAL_STAMP) $(PEERS_STAMP)
	$(HEAREVAL_VENV)/bin/python -m pip install --no-deps hearvalidator==2021.0.2
	touch $@

test-hear: $(HEARVALIDATOR_STAMP)
	MSM_REQUIRE_HEARVALIDATOR=1 $(HEAREVAL_VENV)/bin/python -m pytest -q -s -m slow tests/test_hear_validator.py

data: $(STAMP)
	@if ! command -v fluidsynth >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq fluidsynth; \
	  else echo "msm data needs fluidsynth: sudo apt-get install fluidsynth"; exit 1; fi; fi
	$(MSM) data check
	$(MSM) data build --cache data/real-cache --out data/real

# From the demo checkpoint to an s(m) table on the synthetic HEAR tasks, two scene tasks and one event task
# (README, "Evaluate on HEAR").
HEAR_DIR := runs/hear-example
hear-example: $(STAMP)
	test -f runs/demo/checkpoints/last.ckpt || $(MAKE) demo-synth
	$(MSM) synth data/hear-tasks --tasks
	$(MSM) export runs/demo/checkpoints/last.ckpt $(HEAR_DIR)/ssam-tiny-demo
	$(MSM) embed --module hear_modules.ssam --model $(HEAR_DIR)/ssam-tiny-demo --tasks data/hear-tasks --out $(HEAR_DIR)/emb-pretrained
	$(MSM) embed --module hear_modules.ssam --tasks data/hear-tasks --out $(HEAR_DIR)/emb-random
	$(MSM) embed --module hear_modules.ssast --tasks data/hear-tasks --out $(HEAR_DIR)/emb-random
	$(MSM) evaluate $(HEAR_DIR)/emb-pretrained/hear_modules.ssam --name SSAM-T-demo --seeds 3 --threads 1 --out $(HEAR_DIR)/results
	$(MSM) evaluate $(HEAR_DIR)/emb-random/hear_modules.ssam --name SSAM-T-random --seeds 3 --threads 1 --out $(HEAR_DIR)/results
	$(MSM) evaluate $(HEAR_DIR)/emb-random/hear_modules.ssast --name SSAST-T-random --seeds 3 --threads 1 --out $(HEAR_DIR)/results
	$(MSM) score $(HEAR_DIR)/results --out $(HEAR_DIR)/scores

bench: $(STAMP)
	$(PY) bench/bench_step.py
	# The materialising baseline runs a 251-step autograd loop: about a minute per repetition.
	$(PY) bench/bench_scan.py --methods kernel,scan,materialise --reps 3 --warmup 1

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf runs data/demo .pytest_cache
