# Two set-up commands on a fresh machine (see README):
#   make demo   build the environment and run the main job end to end on the synthetic cohort
#   make test   build the environment and run the whole test suite
.PHONY: env demo test lint bench clean

VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

env: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

demo: env
	bash scripts/demo.sh

test: env
	$(BIN)/pytest -n 2 --durations=15

lint: env
	$(BIN)/ruff check src tests pipelines benchmarks
	$(BIN)/ruff format --check src tests pipelines benchmarks
	$(BIN)/mypy

bench: env
	$(BIN)/python benchmarks/ingest_vs_dcm2niix.py

clean:
	rm -rf artifacts .pytest_cache .mypy_cache .ruff_cache
