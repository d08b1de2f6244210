"""DVC stage ``scenarios``: the drift scenarios of ``conf/monitor/scenarios/`` (a new scanner, a
protocol change, a prevalence shift, a gradual drift, and none) run against the exported bundle:
simulated pools of studies through the edge runner (cached under ``artifacts/scenarios/pools``),
streams drawn from them, windows judged and the alert rules applied. The detection delay and the
false alarms of each land in ``reports/monitor/scenarios.json`` (see
:mod:`shiftguard.monitor.scenarios`).

Config: the ``monitor``, ``cohort`` and ``split`` sections of ``params.yaml``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from shiftguard.config import CohortConfig, MonitorConfig, SplitConfig, load_section
from shiftguard.edge.service import resolve_bundle
from shiftguard.monitor.scenarios import run_all, table
from shiftguard.utils import setup_logging, write_json

BUNDLES = Path("artifacts/export")
OUT = Path("reports/monitor/scenarios.json")

log = logging.getLogger("scenarios")


def main() -> int:
    setup_logging()
    summary = run_all(
        load_section("monitor", MonitorConfig),
        load_section("cohort", CohortConfig),
        load_section("split", SplitConfig),
        resolve_bundle(BUNDLES),
    )
    write_json(OUT, summary)
    for line in table(summary).splitlines():
        log.info("%s", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
