"""The monitor run once over a batch of past studies (the DVC stage ``monitor``): an ``edge
predict`` results file replayed as the records the edge would have shipped, in the order of the
studies' own times, cut into a few windows so that the dashboard has a series to show.

Each record is dated by its study (``study_datetime``: StudyDate and StudyTime from the DICOM
header, read as UTC), as if the edge had processed each study when it was acquired; a window is
dated by its last study, and the state file's judging time is the batch's last study. The same
results file therefore gives the same files: no clock is read.
"""

from __future__ import annotations

import html
import logging
import math
import shutil
from pathlib import Path
from typing import Any

from shiftguard.monitor.report import seeded_ids, verdicts, write_page
from shiftguard.monitor.runner import (
    Monitor,
    bundle_info,
    records_from_results,
    reference_from_bundle,
)
from shiftguard.utils import write_json

log = logging.getLogger(__name__)

#: the results file's column that dates each study
TIME_COLUMN = "study_datetime"
PAGE = "drift.html"
METRICS = "metrics.json"
#: what metrics.json's ``windows`` holds of each window (and its alerts)
WINDOW_KEYS = (
    "window", "n", "start", "end", "unified_score", "n_drifted", "drift_share", "dataset_drift",
)  # fmt: skip


def batch_window_size(n: int, window: Any) -> int | None:
    """The window size that cuts ``n`` studies into as many windows as ``window.batch_windows``
    allows with every window, the last one included, at least ``window.min_size``; None when
    ``n`` is under ``min_size`` (nothing to judge).

    >>> from types import SimpleNamespace as NS
    >>> [batch_window_size(n, NS(batch_windows=4, min_size=20)) for n in (19, 40, 61, 76, 200)]
    [None, 20, 31, 26, 50]
    """
    for k in range(min(window.batch_windows, n // window.min_size), 0, -1):
        size = math.ceil(n / k)
        if n - (k - 1) * size >= window.min_size:
            return size
    return None


def run(
    cfg: Any,
    bundle_path: Path,
    results_csv: Path,
    out: Path,
    reports: Path,
    site: str,
) -> dict[str, Any]:
    """Judge the studies of ``results_csv`` against the bundle's reference, in windows of
    :func:`batch_window_size`, and write what the DVC stage ``monitor`` outputs: the state file
    and the Evidently workspace with its dashboard under ``out`` (removed first), the latest
    window's page (``reports/drift.html``, from the snapshots the workspace holds) and the figures
    (``reports/metrics.json``). Evidently's ids come from a fixed seed
    (:func:`~shiftguard.monitor.report.seeded_ids`). Returns the figures.

    ``metrics.json`` holds the latest window's figures at its top level, with ``n_studies`` the
    batch's studies, and every window's in ``windows``.
    """
    shutil.rmtree(out, ignore_errors=True)  # its own outputs only: reports/ may be shared
    for name in (PAGE, METRICS):
        (reports / name).unlink(missing_ok=True)
    records = records_from_results(results_csv, site, time_column=TIME_COLUMN)
    size = batch_window_size(len(records), cfg.window)
    if size is None:  # too few studies to judge (the test suite's tiny cohort): say so
        reason = (
            f"{len(records)} studies, fewer than monitor.window.min_size ({cfg.window.min_size})"
        )
        reports.mkdir(parents=True, exist_ok=True)
        out.mkdir(parents=True, exist_ok=True)  # a DVC output even when there is nothing to judge
        write_json(out / "not-judged.json", {"n_studies": len(records), "reason": reason})
        (reports / PAGE).write_text(
            "<!DOCTYPE html>\n<html><head><title>ShiftGuard drift report</title></head><body>"
            f"<h1>ShiftGuard drift report: {html.escape(site)}</h1>"
            f"<p>No drift report: {html.escape(reason)}.</p></body></html>\n",
            encoding="utf-8",
        )
        figures: dict[str, Any] = {"n_studies": len(records), "judged": False, "reason": reason}
        write_json(reports / METRICS, figures)
        return figures
    cfg = cfg.model_copy(
        update={
            "html": "none",
            "window": cfg.window.model_copy(update={"by": "count", "size": size}),
        }
    )
    judged_at = str(records["processed_at"].max())
    with seeded_ids():  # the workspace and the page are written whole, here, once
        monitor = Monitor(
            cfg,
            reference_from_bundle(bundle_path),
            out / "monitor.db",
            workspace=out / "workspace",
            reports=None,
            clock=lambda: judged_at,
            bundle=bundle_info(bundle_path),
        )
        try:
            judged = monitor.update(records, judge_open=True)  # the last window is still open
            _, active = monitor.check(notify=False, announce=False)  # logged per window below
            raised = monitor.alerts()
            latest = monitor.latest[site]
            write_page(reports / PAGE, latest, cfg.window_rules, monitor.bundle)
        finally:
            monitor.close()
    shown = verdicts(w.dict() for w in latest.snapshot.to_snapshot_model().widgets)
    embedding = None
    if latest.embedding is not None:
        embedding = verdicts(w.dict() for w in latest.embedding.to_snapshot_model().widgets)
    windows = []
    for result in judged:
        summary = result.summary()
        on_it = sorted(a.rule for a in raised if a.site == site and a.window == result.index)
        estimated = {k: v for k, v in summary.items() if k.startswith("estimated_")}
        windows.append({k: summary[k] for k in WINDOW_KEYS} | estimated | {"alerts": on_it})
        log.info(
            "monitor: window %d, %d studies %s to %s: unified drift score %.2f, %d features "
            "drifted, alerts: %s",
            result.index, result.n, result.start, result.end, result.unified_score,
            result.n_drifted, ", ".join(on_it) or "none",
        )  # fmt: skip
    summary = latest.result.summary()
    figures = {
        "n_studies": len(records),
        "judged": True,
        "window": {k: summary[k] for k in ("window", "n", "start", "end")},
        "unified_score": summary["unified_score"],
        "drift_share": summary["drift_share"],
        "n_drifted": summary["n_drifted"],
        "dataset_drift": summary["dataset_drift"],
        **{k: v for k, v in summary.items() if k.startswith(("score_", "estimated_"))},
        "drifted": summary["drifted"],
        "embedding_drift": None if embedding is None else embedding["embedding_drift"],
        "alerts": sorted(a.rule for a in active),
        "windows": windows,
    }
    if shown["n_drifted"] is not None and shown["n_drifted"] != summary["n_drifted"]:
        log.warning(
            "monitor: Evidently counts %d drifted features where the drift engine counts %d",
            shown["n_drifted"], summary["n_drifted"],
        )  # fmt: skip
    write_json(reports / METRICS, figures)
    return figures
