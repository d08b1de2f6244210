"""DVC stage ``split``: manifest + verified diagnoses -> ``artifacts/split/dataset.csv``.

Patient-level train/val/test split stratified on the finding (and site), with the unseen scanner's
series kept apart as the external test set. Config: the ``split`` section of ``params.yaml``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from shiftguard.config import SplitConfig, load_section
from shiftguard.data import split
from shiftguard.utils import setup_logging, write_json

MANIFEST = Path("artifacts/ingest/manifest.csv")
DIAGNOSES = Path("data/ris/verified_diagnoses.csv")
OUT = Path("artifacts/split")
METRICS = Path("reports/split/metrics.json")


def main() -> int:
    setup_logging()
    cfg = load_section("split", SplitConfig)
    summary = split.run(cfg, MANIFEST, DIAGNOSES, OUT)
    write_json(METRICS, summary.to_metrics())
    return 0


if __name__ == "__main__":
    sys.exit(main())
