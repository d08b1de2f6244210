"""DVC stage ``export``: the trained model to ONNX and TorchScript, parity-checked, packed with its
preprocessing, threshold, drift baseline and model card into one verified edge bundle
(``artifacts/export/NAME.sgbundle``, the same bytes for the same inputs), logged to the MLflow run
that trained the model (see :mod:`shiftguard.export`).

Config: the ``export`` and ``ingest`` sections of ``params.yaml``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from shiftguard.config import ExportConfig, IngestConfig, load_section
from shiftguard.export import run
from shiftguard.utils import setup_logging, write_json

MODEL = Path("artifacts/train/model.pt")
DATASET = Path("artifacts/split/dataset.csv")
INGEST = Path("artifacts/ingest")
VALIDATION = Path("reports/validate")
OUT = Path("artifacts/export")
DICOM = Path("data/dicom")  # the training series, run through the edge runner for the reference
REPORTS = Path("reports/export")


def main() -> int:
    setup_logging()
    summary = run(
        load_section("export", ExportConfig),
        load_section("ingest", IngestConfig),
        MODEL,
        DATASET,
        INGEST,
        VALIDATION,
        OUT,
        dicom_dir=DICOM,
    )
    write_json(REPORTS / "metrics.json", summary.to_metrics())
    return 0


if __name__ == "__main__":
    sys.exit(main())
