"""DVC stage ``augment``: robustness test sets for the validation and test splits.

Every val/test volume under every scanner profile at every severity (``artifacts/augment/``, with a
manifest of the drawn parameters), a profile x severity gallery (``reports/augment/gallery.png``), and
an MLflow run logging both. Config: the ``augment`` section of ``params.yaml``. Workers:
``$SHIFTGUARD_WORKERS``; tracking store: ``$MLFLOW_TRACKING_URI`` (default: ``mlflow.db`` here).
"""

from __future__ import annotations

import sys
from pathlib import Path

from shiftguard.augment import robustness
from shiftguard.config import AugmentConfig, load_section
from shiftguard.utils import env_workers, run_stage, setup_logging, write_json

DATASET = Path("artifacts/split/dataset.csv")
INGEST = Path("artifacts/ingest")
OUT = Path("artifacts/augment")
GALLERY = Path("reports/augment/gallery.png")
METRICS = Path("reports/augment/metrics.json")


def main() -> int:
    setup_logging()
    cfg = load_section("augment", AugmentConfig)
    summary = robustness.run_stage(cfg, DATASET, INGEST, OUT, GALLERY, workers=env_workers())
    write_json(METRICS, summary.to_metrics())
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
