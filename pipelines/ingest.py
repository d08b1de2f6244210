"""DVC stage ``ingest``: the raw DICOM tree under ``data/dicom`` -> ``artifacts/ingest/``.

Validated series become canonical volumes (``volumes/``) listed in ``manifest.csv``; every rejected file
or series is listed with its reason and fix in ``quarantine.csv``. Config: the ``ingest`` section of
``params.yaml``. Worker processes: ``$SHIFTGUARD_WORKERS`` (default: all cores).
"""

from __future__ import annotations

import sys
from pathlib import Path

from shiftguard.config import IngestConfig, load_section
from shiftguard.data import ingest
from shiftguard.utils import env_workers, setup_logging, write_json

SOURCE = Path("data/dicom")
OUT = Path("artifacts/ingest")
METRICS = Path("reports/ingest/metrics.json")


def main() -> int:
    setup_logging()
    cfg = load_section("ingest", IngestConfig)
    summary = ingest.run(cfg, SOURCE, OUT, workers=env_workers())
    write_json(METRICS, summary.to_metrics())
    return 0


if __name__ == "__main__":
    sys.exit(main())
