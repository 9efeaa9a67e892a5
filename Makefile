# amorlip: two commands on a fresh machine -- `make demo` and `make test`.
SHELL := /bin/bash
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CORES   ?= 2
# Offline-friendly defaults for the stack (see README "Environment").
export HF_HUB_OFFLINE := 1
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE := disabled
export DS_BUILD_OPS := 0
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-fast lint data train evaluate report bench bench-quality slurm-up slurm-down clean-demo help

help:
	@echo "make setup | demo | test | lint | bench | bench-quality | slurm-up | slurm-down"

# Idempotent: (re)installs only when requirements.txt or pyproject.toml changed.
setup: $(STAMP)
$(STAMP): requirements.txt requirements-oracles.txt pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install --no-deps -r requirements-oracles.txt
	$(BIN)/pip install --no-deps -e .
	@touch $(STAMP)

demo: setup
	$(BIN)/snakemake all --cores $(CORES) --configfile config/config.yaml
	@$(BIN)/amorlip demo-summary --config config/config.yaml

data train evaluate report: setup
	$(BIN)/snakemake $@ --cores $(CORES) --configfile config/config.yaml

test: setup
	bash scripts/run-tests.sh

test-fast: setup
	$(BIN)/pytest -q -m "not slow and not slurm"

lint: setup
	$(BIN)/ruff check amorlip tests benchmarks

# CPU benchmarks (step time, vs open_clip_train, data throughput): ~8 min on 2 idle cores.
# Figures, goals and method: benchmarks/RESULTS.md. GPU: bash benchmarks/gpu.sh on a GPU machine.
bench: setup
	$(BIN)/python -m benchmarks.run_all

# The small-batch comparison (40 runs through the pipeline, about 3 h on 2 idle cores; see
# benchmarks/RESULTS.md, section 4a). One seed at a time (benchmarks/quality_targets.py), so an
# interrupted sweep holds complete seeds to pair. Resumable: rerun to continue. --keep-going: one
# failed run does not stop the others, and the summary reports what finished (missing runs are
# listed, never zero). --rerun-triggers mtime input: the sweep outlives code updates, and a
# setting a newer version adds must not retrain finished runs (delete bench/quality/runs/<run> to
# retrain one).
QUALITY := config/bench-quality.yaml
bench-quality: setup
	@rc=0; for seed in $$($(BIN)/python -m benchmarks.quality_targets --config $(QUALITY) --seeds); do \
	  echo "bench-quality: seed $$seed"; \
	  $(BIN)/snakemake $$($(BIN)/python -m benchmarks.quality_targets --config $(QUALITY) --seed $$seed) \
	    --cores $(CORES) --keep-going --rerun-triggers mtime input --configfile $(QUALITY) || rc=$$?; \
	done; \
	$(BIN)/snakemake report --cores $(CORES) --keep-going --rerun-triggers mtime input --configfile $(QUALITY) || rc=$$?; \
	$(BIN)/python -m benchmarks.quality_summary --config $(QUALITY); exit $$rc

slurm-up:
	bash scripts/slurm-up.sh

slurm-down:
	bash scripts/slurm-down.sh
