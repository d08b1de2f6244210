"""DVC stage ``ingest``: the data source's DICOM tree (``data.dicom``) -> ``artifacts/ingest/``.

Validated series become canonical volumes (``volumes/``) listed in ``manifest.csv``; every rejected file
or series is listed with its reason and fix in ``quarantine.csv``. With ``data.identifiers:
pseudonymize`` both tables hold pseudonyms, never patient IDs, accession numbers, paths or days.
Config: the ``data`` and ``ingest`` sections of ``params.yaml``. Worker processes:
``$SHIFTGUARD_WORKERS`` (default: all cores).
"""

from __future__ import annotations

import sys
from pathlib import Path

from shiftguard.config import DataConfig, IngestConfig, load_section
from shiftguard.data import ingest
from shiftguard.data.identifiers import pseudonymizer
from shiftguard.utils import env_workers, run_stage, setup_logging, write_json

OUT = Path("artifacts/ingest")
METRICS = Path("reports/ingest/metrics.json")


def main() -> int:
    setup_logging()
    data = load_section("data", DataConfig)
    cfg = load_section("ingest", IngestConfig)
    ids = pseudonymizer(data.name, data.identifiers, data.key_id)
    summary = ingest.run(cfg, Path(data.dicom), OUT, workers=env_workers(), identifiers=ids)
    write_json(METRICS, summary.to_metrics())
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
