"""DVC stage ``split``: manifest + the data source's labels -> ``artifacts/split/``.

The label file(s) (``data.labels``) join the ingested studies by ``data.key``; every study and label
row is accounted for in ``reports/split/labels.csv`` (and summed up in the terminal). Patient-level
train/val/test split stratified on the finding (and site), with the series ``split.external`` selects
kept apart as the external test set. Config: the ``data`` and ``split`` sections of ``params.yaml``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from shiftguard.config import DataConfig, SplitConfig, load_section
from shiftguard.data import split
from shiftguard.data.identifiers import pseudonymizer
from shiftguard.utils import run_stage, setup_logging, write_json

MANIFEST = Path("artifacts/ingest/manifest.csv")
QUARANTINE = Path("artifacts/ingest/quarantine.csv")
OUT = Path("artifacts/split")
LABELS_REPORT = Path("reports/split/labels.csv")
METRICS = Path("reports/split/metrics.json")


def main() -> int:
    setup_logging()
    data = load_section("data", DataConfig)
    ids = pseudonymizer(data.name, data.identifiers, data.key_id)
    summary, _ = split.run(
        load_section("split", SplitConfig), data, MANIFEST, OUT, LABELS_REPORT, QUARANTINE, ids
    )
    write_json(METRICS, summary.to_metrics())
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
