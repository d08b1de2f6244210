# Two set-up commands on a fresh machine (see README):
#   make demo   build the environment and run the main job end to end on the synthetic cohort
#   make test   build the environment and run the whole test suite
.PHONY: env demo experiment test lint bench clean

VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# the main job's part of the environment: no system packages, no dev tools
DEMO_STAMP := $(VENV)/.installed-demo

env: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP) $(DEMO_STAMP)

$(DEMO_STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh demo
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	bash scripts/demo.sh

# The scanner-shift experiment: both arms with `dvc exp run`, then side by side (also in the MLflow UI
# and notebooks/03_compare_runs.ipynb). Needs the cohort in place: run `make demo` first.
experiment: env
	-$(BIN)/dvc exp remove sim-on sim-off 2>/dev/null  # re-running replaces the previous pair
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc exp run -n sim-on -S experiment=sim_on
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc exp run -n sim-off -S experiment=sim_off
	$(BIN)/dvc exp show --drop '.*' --keep 'Experiment|augment.enabled|best_val_auroc|^test.auroc.value|^external.auroc.value'
	$(BIN)/shiftguard compare

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
