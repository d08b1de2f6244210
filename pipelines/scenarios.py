"""DVC stage ``scenarios``: the drift scenarios of ``conf/monitor/scenarios/`` (a new scanner, a
protocol change, a prevalence shift, a gradual drift, and none) run against the exported bundle:
simulated pools of studies through the edge runner (cached under ``artifacts/scenarios/pools``),
streams drawn from them, windows judged and the alert rules applied. The detection delay and the
false alarms of each land in ``reports/monitor/scenarios.json`` (see
:mod:`shiftguard.monitor.scenarios`), with the label-free performance estimates judged against
the pools' verified findings; their table, one row per condition, method and metric (realised,
estimated, bias, mean absolute error, interval coverage), is ``reports/monitor/estimation.csv``.

Config: the ``monitor``, ``cohort``, ``split`` and ``data`` sections of ``params.yaml``; skipped
(said so, with an empty ``artifacts/scenarios``) when ``data`` is not the synthetic cohort.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from shiftguard.config import CohortConfig, DataConfig, MonitorConfig, SplitConfig, load_section
from shiftguard.edge.service import resolve_bundle
from shiftguard.monitor.scenarios import ESTIMATION_COLUMNS, estimation_rows, run_all, table
from shiftguard.utils import run_stage, setup_logging, write_csv, write_json

BUNDLES = Path("artifacts/export")
OUT = Path("reports/monitor/scenarios.json")
TABLE = Path("reports/monitor/estimation.csv")

log = logging.getLogger("scenarios")


def main() -> int:
    setup_logging()
    data = load_section("data", DataConfig)
    if not data.synthetic:  # the pools are drawn from the generator: nothing to draw them from
        reason = (
            f"data source {data.name!r} is not the synthetic cohort; the drift scenarios simulate "
            "their studies with its generator (the monitor stage judges the held-out real studies)"
        )
        Path("artifacts/scenarios").mkdir(parents=True, exist_ok=True)
        write_json(OUT, {"skipped": reason})
        write_csv(TABLE, ["skipped"], [{"skipped": reason}])
        log.warning("scenarios: skipped: %s", reason)
        return 0
    summary = run_all(
        load_section("monitor", MonitorConfig),
        load_section("cohort", CohortConfig),
        load_section("split", SplitConfig),
        resolve_bundle(BUNDLES),
    )
    write_json(OUT, summary)
    estimation = summary.get("estimation") or {}
    write_csv(TABLE, ESTIMATION_COLUMNS, estimation_rows(estimation))
    for line in table(summary).splitlines():
        log.info("%s", line)
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
