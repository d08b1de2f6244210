# Two set-up commands on a fresh machine (see README):
#   make demo   build the environment and run the main job end to end on the synthetic cohort
#   make test   build the environment and run the whole test suite
.PHONY: env demo experiment test test-gpu lint bench bench-estimate bench-collector screenshots clean

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

# The augmentation experiment (README, "Does augmentation help?"): every arm x training seed x split
# seed of conf/design/$(DESIGN).yaml with Hydra's multirun sweeper, then the paired report in
# reports/experiment/ and MLflow (`shiftguard compare --experiment`). Generates its hold-out and
# unseen-scanner sets on the first run. DESIGN=full is the GPU machine's design.
DESIGN ?= reduced
experiment: $(DEMO_STAMP)
	bash scripts/experiment.sh $(DESIGN)

test: env
	$(BIN)/pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=15

# On a GPU machine: the environment with ONNX Runtime's GPU build (CUDA, TensorRT), then the
# gpu-marked tests (AMP training and the scanner simulation on CUDA, the edge runner's GPU providers
# against its CPU results); they skip on a machine without a GPU
test-gpu:
	bash scripts/setup.sh gpu
	touch $(STAMP) $(DEMO_STAMP)
	$(BIN)/pytest -m gpu

lint: env
	$(BIN)/ruff check src tests pipelines benchmarks
	$(BIN)/ruff format --check src tests pipelines benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports --no-logo

bench: env
	$(BIN)/python benchmarks/ingest_vs_dcm2niix.py

# label-free estimation against NannyML's CBPE on one 10,000-study window (the `bench` extra)
bench-estimate: env
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python benchmarks/estimate_vs_nannyml.py

# 50 sites at once against the collector, PostgreSQL beside SQLite (starts a throwaway cluster)
bench-collector: env
	$(BIN)/python benchmarks/collector_load.py

# After make demo: headless-Chromium screenshots of the MLflow model version, the drift dashboard,
# drift.html, the shadow report and dvc plots, each checked for the text it must show
screenshots: env
	$(BIN)/python scripts/screenshots.py

clean:
	rm -rf artifacts .pytest_cache .mypy_cache .ruff_cache
