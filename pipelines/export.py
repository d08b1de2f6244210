"""DVC stage ``export``: the trained model to ONNX and TorchScript, parity-checked, packed with its
preprocessing, threshold, drift baseline and model card into one verified edge bundle
(``artifacts/export/NAME.sgbundle``, the same bytes for the same inputs), logged to the MLflow run
that trained the model (see :mod:`shiftguard.export`).

Config: the ``export``, ``ingest`` and ``data`` sections of ``params.yaml``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from shiftguard.config import DataConfig, ExportConfig, IngestConfig, load_section
from shiftguard.data.identifiers import pseudonymizer
from shiftguard.export import run
from shiftguard.utils import run_stage, setup_logging, write_json

MODEL = Path("artifacts/train/model.pt")
DATASET = Path("artifacts/split/dataset.csv")
INGEST = Path("artifacts/ingest")
VALIDATION = Path("reports/validate")
OUT = Path("artifacts/export")
REPORTS = Path("reports/export")


def main() -> int:
    setup_logging()
    # the training series (data.dicom) run through the edge runner: the drift monitor's reference
    data = load_section("data", DataConfig)
    ids = pseudonymizer(data.name, data.identifiers, data.key_id)  # the split table's UIDs
    summary = run(
        load_section("export", ExportConfig),
        load_section("ingest", IngestConfig),
        MODEL,
        DATASET,
        INGEST,
        VALIDATION,
        OUT,
        dicom_dir=Path(data.dicom),
        uid_of=ids.uid,
    )
    write_json(REPORTS / "metrics.json", summary.to_metrics())
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
