"""DVC stage ``validate``: the trained model judged in distribution, on the unseen scanners (pooled
and each scanner model on its own), under simulated scanner shift, and per segment (see
:mod:`shiftguard.evaluation.validate`).

Writes ``reports/validate/`` (metrics.json for ``dvc metrics``; ROC, reliability and robustness
plots for ``dvc plots``; predictions, segments and robustness tables) and logs an MLflow ``validate``
run; the headline figures also go onto the training run and the registered model version.
Config: the ``evaluate`` section of ``params.yaml``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from shiftguard.config import EvaluateConfig, load_section, read_params
from shiftguard.evaluation import validate
from shiftguard.utils import run_stage, setup_logging, write_json

MODEL = Path("artifacts/train/model.pt")
DATASET = Path("artifacts/split/dataset.csv")
INGEST = Path("artifacts/ingest")
AUGMENT = Path("artifacts/augment")
REPORTS = Path("reports/validate")


def main() -> int:
    setup_logging()
    cfg = load_section("evaluate", EvaluateConfig)
    result = validate.run(cfg, MODEL, DATASET, INGEST, AUGMENT, REPORTS, params=read_params())
    write_json(REPORTS / "metrics.json", result.to_metrics())
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
