"""DVC stage ``monitor``: the drift monitor on what the edge runner saw in ``edge_predict`` (the
unseen scanner's studies), against the bundle's training reference: one window of feature records
judged per feature (Evidently's default tests) and by the unified drift score, an Evidently
snapshot in a workspace with the ready-made dashboard (``artifacts/monitor/workspace``), a static
HTML report (``reports/monitor/drift.html``), the alert rules evaluated, and the figures in
``reports/monitor/metrics.json``.

Config: the ``monitor`` section of ``params.yaml`` (windows, drift scoring, alert rules); this
stage writes under ``artifacts/monitor`` and ``reports/monitor`` whatever the section's paths say.
The same records give the same files: Evidently's ids come from a fixed seed
(:func:`~shiftguard.monitor.report.seeded_ids`) and the state file records a fixed judging time.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from shiftguard.config import MonitorConfig, load_section
from shiftguard.edge.service import resolve_bundle
from shiftguard.monitor.report import seeded_ids
from shiftguard.monitor.runner import Monitor, records_from_results, reference_from_bundle
from shiftguard.utils import setup_logging, write_json

BUNDLES = Path("artifacts/export")
RESULTS = Path("artifacts/edge/results.csv")
OUT = Path("artifacts/monitor")
REPORTS = Path("reports/monitor")
SITE = "unseen-scanner"
# the edge results carry no processing time of their own: a fixed one keeps the stage reproducible
PROCESSED_AT = "2026-01-01T00:00:00Z"


def main() -> int:
    setup_logging()
    with seeded_ids():  # the workspace and the report are written whole, here, once
        return judge(load_section("monitor", MonitorConfig))


def judge(cfg: MonitorConfig) -> int:
    shutil.rmtree(OUT, ignore_errors=True)  # its own outputs only: reports/monitor is shared
    for name in ("drift.html", "metrics.json"):
        (REPORTS / name).unlink(missing_ok=True)
    cfg = cfg.model_copy(update={"html": "none"})
    monitor = Monitor(
        cfg,
        reference_from_bundle(resolve_bundle(BUNDLES)),
        OUT / "monitor.db",
        workspace=OUT / "workspace",
        reports=None,
        clock=lambda: PROCESSED_AT,
    )
    records = records_from_results(RESULTS, SITE, processed_at=PROCESSED_AT)
    judged = monitor.update(records, judge_open=True)  # the studies are one (open) window
    _, active = monitor.check(notify=False)
    monitor.close()
    if not judged:  # too few studies to judge (the test suite's tiny cohort): say so
        REPORTS.mkdir(parents=True, exist_ok=True)
        reason = (
            f"{len(records)} studies, fewer than monitor.window.min_size ({cfg.window.min_size})"
        )
        (REPORTS / "drift.html").write_text(
            f"<html><body><p>No drift report: {reason}.</p></body></html>\n"
        )
        write_json(
            REPORTS / "metrics.json", {"n_studies": len(records), "judged": False, "reason": reason}
        )
        return 0
    last = judged[-1]
    _write_html(last, records)
    summary = last.summary()
    write_json(
        REPORTS / "metrics.json",
        {
            "n_studies": summary["n"],
            "judged": True,
            "unified_score": summary["unified_score"],
            "drift_share": summary["drift_share"],
            "n_drifted": summary["n_drifted"],
            "dataset_drift": summary["dataset_drift"],
            **{k: v for k, v in summary.items() if k.startswith("score_")},
            "drifted": summary["drifted"],
            "alerts": sorted(a.rule for a in active),
        },
    )
    return 0


def _write_html(result, records) -> None:  # type: ignore[no-untyped-def]
    """The static report of the judged window (the same snapshot the workspace holds)."""
    from shiftguard.monitor.report import snapshot
    from shiftguard.monitor.runner import _stamp

    reference = reference_from_bundle(resolve_bundle(BUNDLES))
    REPORTS.mkdir(parents=True, exist_ok=True)
    snap = snapshot(records, reference, result, _stamp(result.end))
    snap.save_html(str(REPORTS / "drift.html"))


if __name__ == "__main__":
    sys.exit(main())
