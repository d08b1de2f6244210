"""DVC stage ``train``: the classifier, trained on the ``train`` split and selected on ``val``.

Writes ``artifacts/train/`` (``model.pt``, checkpoints), ``reports/train/metrics.json`` and the
per-epoch ``reports/train/history.csv``; logs an MLflow run (tagged with ``model.pt``'s SHA-256) and
registers the model as a new version aliased ``challenger``. Config: the ``train``, ``model`` and
``augment`` sections of ``params.yaml``. Runs unchanged under
``torchrun --nproc_per_node N pipelines/train.py`` (DDP).
Tracking store: ``$MLFLOW_TRACKING_URI`` (default: ``mlflow.db`` here).
"""

from __future__ import annotations

import sys
from pathlib import Path

from shiftguard.config import AugmentConfig, ModelConfig, TrainConfig, load_section, read_params
from shiftguard.training import stage
from shiftguard.utils import run_stage, setup_logging, write_json

DATASET = Path("artifacts/split/dataset.csv")
INGEST = Path("artifacts/ingest")
OUT = Path("artifacts/train")
METRICS = Path("reports/train/metrics.json")
HISTORY = Path("reports/train/history.csv")


def main() -> int:
    setup_logging()
    summary = stage.run(
        load_section("train", TrainConfig),
        load_section("model", ModelConfig),
        load_section("augment", AugmentConfig),
        DATASET,
        INGEST,
        OUT,
        params=read_params(),
        history_csv=HISTORY,
    )
    if summary.main_process:  # rank 0 under torchrun
        write_json(METRICS, summary.to_metrics())
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
