"""DVC stage ``monitor``: the drift monitor on what the edge runner saw in ``edge_predict`` (the
unseen scanner's studies), against the bundle's training reference (:mod:`shiftguard.monitor.batch`).

The studies are replayed in the order of their own times and cut into a few windows
(``monitor.window.batch_windows``, each of ``monitor.window.min_size`` studies or more), each judged
per feature (Evidently's default tests) and by the unified drift score, with the alert rules
evaluated over the windows in order. Outputs: an Evidently snapshot per window in a workspace with
the ready-made dashboard (``artifacts/monitor/workspace``), the latest window's page
(``reports/monitor/drift.html``, rendered from the snapshots the workspace holds) and the figures
in ``reports/monitor/metrics.json`` (the latest window's, and every window's under ``windows``).

Time: a record's time is its study's StudyDate and StudyTime (``edge_predict``'s
``study_datetime``, the scanner's local time read as UTC), as if the edge had processed each study
when it was acquired. A window is dated by its last study, and the judging time recorded in the
state file is the last study's. So the same studies give the same files: no clock is read, and
Evidently's ids come from a fixed seed (:func:`~shiftguard.monitor.report.seeded_ids`).

On a site's pseudonymized data (``data.identifiers``) the studies are dated by month and named by
their UIDs' pseudonyms (:func:`~shiftguard.data.identifiers.lab_copy_of_results`), so no day
reaches the reports.

Config: the ``monitor`` section of ``params.yaml`` (windows, drift scoring, alert rules) and ``data``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from shiftguard.config import DataConfig, MonitorConfig, load_section
from shiftguard.data.identifiers import lab_copy_of_results, pseudonymizer
from shiftguard.edge.service import resolve_bundle
from shiftguard.monitor.batch import run
from shiftguard.utils import run_stage, setup_logging

BUNDLES = Path("artifacts/export")
RESULTS = Path("artifacts/edge/results.csv")
OUT = Path("artifacts/monitor")
REPORTS = Path("reports/monitor")
SITE = "unseen-scanner"


def main() -> int:
    setup_logging()
    cfg = load_section("monitor", MonitorConfig)
    data = load_section("data", DataConfig)
    ids = pseudonymizer(data.name, data.identifiers, data.key_id)
    with tempfile.TemporaryDirectory() as tmp:  # a site's study times: months in what it writes
        results = lab_copy_of_results(RESULTS, ids, Path(tmp)) if ids.active else RESULTS
        run(cfg, resolve_bundle(BUNDLES), results, OUT, REPORTS, SITE)
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
