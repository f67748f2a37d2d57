# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all bench bench-small lint format notebooks clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch pinned first: the CPU wheel on this machine, not the registry's CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/latentdist demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile -q -m ""

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

bench-small: $(STAMP)
	$(BIN)/python benchmarks/run_all.py --small

lint: $(STAMP)
	$(BIN)/ruff check latentdist tests benchmarks
	$(BIN)/ruff format --check latentdist tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format latentdist tests benchmarks
	$(BIN)/ruff check --fix latentdist tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis demo_out runs
