"""The monitor's loop: records in, windows judged, snapshots and HTML out, alerts recorded.

:class:`Monitor` keeps its state in a small SQLite file (every judged window's summary, every
alert) so that ``shiftguard monitor report`` is incremental (a complete window is judged once)
and ``shiftguard monitor check`` can say which alerts are new. The snapshots of each site's latest
judged window stay in :attr:`Monitor.latest`, for a caller that writes its own page of them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from shiftguard.edge.bundle import open_bundle
from shiftguard.errors import BundleError, EstimationError, ResultsFileError
from shiftguard.monitor.alerts import Alert, evaluate, post_webhook, streaks
from shiftguard.monitor.performance import PerformanceEstimator
from shiftguard.monitor.report import (
    BundleInfo,
    MonitorWorkspace,
    WindowReport,
    embedding_snapshot,
    snapshot,
    write_page,
)
from shiftguard.monitor.score import Scorer, WindowResult, cut_windows, held_out_outputs
from shiftguard.records.features import BY_NAME, FEATURE_NAMES, make_record
from shiftguard.store import Database

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS windows (
    site TEXT NOT NULL, idx INTEGER NOT NULL, complete INTEGER NOT NULL, n INTEGER NOT NULL,
    result TEXT NOT NULL, judged_at TEXT NOT NULL, PRIMARY KEY (site, idx)
);
CREATE TABLE IF NOT EXISTS alerts (
    rule TEXT NOT NULL, site TEXT NOT NULL, idx INTEGER NOT NULL, alert TEXT NOT NULL,
    raised_at TEXT NOT NULL, notified INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (rule, site, idx)
);
"""


def reference_from_bundle(path: Path | str) -> pd.DataFrame:
    """The bundle's reference table (verified bundle, :func:`~shiftguard.edge.bundle.open_bundle`)."""

    bundle = open_bundle(path)
    member = bundle.manifest.get("monitor", {}).get("reference", "reference.csv")
    if member not in bundle.members:
        raise BundleError(f"{path}: has no drift reference ({member}); re-export it")
    return pd.read_csv(io.BytesIO(bundle.members[member]))


def estimator_for(
    cfg: Any, reference: pd.DataFrame, bundle: BundleInfo | None
) -> PerformanceEstimator | None:
    """The label-free performance estimator of ``cfg.estimation`` on the bundle's reference, or
    ``None`` (said in the log) when estimation is off, the operating point is unknown, or the
    reference cannot carry it (a bundle exported without labels in its reference)."""
    settings = cfg.estimation
    if not settings.enabled:
        return None
    if bundle is None or bundle.threshold is None:
        log.info("monitor: no operating point known; performance is not estimated")
        return None
    try:
        return PerformanceEstimator(
            reference, bundle.threshold, **settings.model_dump(exclude={"enabled"})
        )
    except EstimationError as err:
        log.warning("monitor: performance is not estimated: %s", err)
        return None


def bundle_info(path: Path | str) -> BundleInfo:
    """The name, version and file digest of a verified bundle, as a report names it."""

    bundle = open_bundle(path)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return BundleInfo(
        name=bundle.name, version=bundle.version, sha256=digest, threshold=bundle.threshold
    )


def records_from_results(
    results_csv: Path,
    site: str,
    processed_at: str | None = None,
    time_column: str | None = None,
) -> pd.DataFrame:
    """Records (as the edge would ship them) from an ``edge predict`` ``results.csv``, numbered by
    ``seq``.

    Each record's ``processed_at`` is ``processed_at``, else the row's ``time_column`` (for example
    ``study_datetime``, the study's StudyDate and StudyTime, read as UTC), else now. With
    ``time_column`` the records are in the order of that time (file order among equal times), as
    the studies would have reached the edge; otherwise in file order.

    The records never leave this process, and the file holds the series UIDs in the clear, so
    their ids are keyed with a digest of the file itself (the same file gives the same ids).

    Raises:
        ResultsFileError: the file is missing, empty, not CSV, or lacks a column, or a row's
            ``time_column`` is not an ISO 8601 time.
    """
    try:
        raw = Path(results_csv).read_bytes()
    except OSError as exc:
        raise ResultsFileError(
            f"{results_csv}: cannot read the results file ({exc.strerror}); give an "
            "`edge predict` results.csv"
        ) from None
    try:
        rows = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        reason = "empty" if isinstance(exc, pd.errors.EmptyDataError) else f"not CSV ({exc})"
        raise ResultsFileError(
            f"{results_csv}: {reason}; give an `edge predict` results.csv"
        ) from None
    if rows.empty:
        raise ResultsFileError(f"{results_csv}: empty, no predictions to monitor")
    needed = ["series_uid", "model", "model_version", "probability"]
    if time_column and processed_at is None:
        needed.append(time_column)
    missing = [c for c in needed if c not in rows]
    if missing:
        raise ResultsFileError(
            f"{results_csv}: lacks the column(s) {', '.join(missing)}; give an `edge predict` "
            "results.csv (the study times came with edge predict's study_datetime column: run "
            "it again)"
            if time_column in missing
            else f"{results_csv}: lacks the column(s) {', '.join(missing)}; give an `edge "
            "predict` results.csv"
        )
    if processed_at is not None:
        stamps = [processed_at] * len(rows)
    elif time_column:
        times = pd.to_datetime(rows[time_column], errors="coerce", utc=True)
        if times.isna().any():
            bad = rows.loc[times.isna(), time_column].iloc[0]
            raise ResultsFileError(
                f"{results_csv}: {time_column} {bad!r} (series "
                f"{rows.loc[times.isna(), 'series_uid'].iloc[0]}) is not an ISO 8601 time"
            )
        stamps = list(times.dt.strftime("%Y-%m-%dT%H:%M:%SZ"))
        order = sorted(range(len(rows)), key=lambda i: (times.iloc[i], i))
        rows, stamps = rows.iloc[order].reset_index(drop=True), [stamps[i] for i in order]
    else:
        stamps = [datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")] * len(rows)
    key = hashlib.sha256(b"shiftguard-results|" + raw).digest()
    records = [
        make_record(
            {k: (None if v == "" else v) for k, v in row.items()},
            site=site,
            bundle=row["model"],
            bundle_version=row["model_version"],
            series_uid=row["series_uid"],
            processed_at=stamp,
            record_key=key,
        )
        for row, stamp in zip(rows.to_dict("records"), stamps, strict=True)
    ]
    frame = typed(pd.DataFrame(records))
    frame["seq"] = range(1, len(frame) + 1)
    return frame


def typed(frame: pd.DataFrame) -> pd.DataFrame:
    """Feature columns as the drift tests read them: numbers as float, categories as str."""
    out = frame.copy()
    for name in FEATURE_NAMES:
        if name not in out:
            continue
        if BY_NAME[name].kind == "numerical":
            out[name] = pd.to_numeric(out[name], errors="coerce")
        else:
            out[name] = out[name].astype(object).where(out[name].notna(), None)
    return out


class Monitor:
    """Judges windows of records against a reference; see the module docstring."""

    def __init__(
        self,
        cfg: Any,
        reference: pd.DataFrame,
        state: Path | str,
        workspace: Path | str | None = None,
        reports: Path | str | None = None,
        clock: Callable[[], str] | None = None,
        bundle: BundleInfo | None = None,
    ) -> None:
        """``clock``: the time recorded as a window's ``judged_at`` and an alert's ``raised_at``
        (ISO 8601, UTC); default: now. A batch job replaying fixed records passes a fixed one, so
        the state file is the same bytes each time. ``bundle``: named in the pages' headers."""
        self.cfg = cfg
        self.clock = clock or _now
        self.reference = held_out_outputs(typed(reference))
        self.scorer = Scorer(
            self.reference,
            weights=cfg.drift.weights,
            bootstrap=cfg.drift.bootstrap,
            seed=cfg.drift.seed,
            drift_share=cfg.drift.drift_share,
            estimator=estimator_for(cfg, typed(reference), bundle),
        )
        self.state_path = Path(state)
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        self._store = Database(self.state_path, SCHEMA)
        self.workspace_dir = Path(workspace) if workspace else None
        self.reports_dir = Path(reports) if reports else None
        self.bundle = bundle
        #: per site, its latest judged window's snapshots (when a workspace is written)
        self.latest: dict[str, WindowReport] = {}

    def close(self) -> None:
        self._store.close()

    # judging ------------------------------------------------------------------------------------

    def update(self, records: pd.DataFrame, judge_open: bool = False) -> list[WindowResult]:
        """Judge every complete window not judged yet (and, with ``judge_open``, the open last
        window of each site, if it has ``window.min_size`` records). Returns what was judged."""
        if records.empty:
            return []
        records = typed(records)
        if "seq" not in records:
            records = records.assign(seq=range(1, len(records) + 1))
        records = records.sort_values("seq", kind="stable")
        w = self.cfg.window
        judged: list[WindowResult] = []
        snapshots: list[tuple[WindowResult, pd.DataFrame, str]] = []
        for site, rows in records.groupby("site", sort=True):
            done = {
                idx
                for (idx,) in self._store.query(
                    "SELECT idx FROM windows WHERE site = ? AND complete = 1", (site,)
                )
            }
            for index, window, complete in cut_windows(
                rows, w.by, w.size, w.period_hours, w.min_size
            ):
                if index in done or (not complete and not judge_open):
                    continue
                if len(window) < min(w.min_size, w.size):
                    continue
                result = self.scorer.window_result(str(site), index, window)
                judged_at = self.clock()
                with self._store.tx() as db:
                    db.execute(
                        "INSERT OR REPLACE INTO windows VALUES (?, ?, ?, ?, ?, ?)",
                        (
                            site, index, int(complete), len(window),
                            json.dumps(asdict(result)), judged_at,
                        ),
                    )  # fmt: skip
                judged.append(result)
                snapshots.append((result, window, judged_at))
        if self.workspace_dir is not None and snapshots:
            self._write_reports(snapshots)
        return judged

    def history(self) -> dict[str, list[WindowResult]]:
        """Every judged window, per site, in order."""
        out: dict[str, list[WindowResult]] = {}
        for site, result in self._store.query(
            "SELECT site, result FROM windows ORDER BY site, idx"
        ):
            out.setdefault(site, []).append(WindowResult(**json.loads(result)))
        return out

    # alerts -------------------------------------------------------------------------------------

    def check(self, notify: bool = True, announce: bool = True) -> tuple[list[Alert], list[Alert]]:
        """Evaluate the alert rules over the history: (new alerts, alerts on each site's latest
        window). New ones are recorded, POSTed to the webhook when one is configured (``notify``)
        and logged as warnings (``announce``: off where the caller reports them per window)."""
        history = self.history()
        alerts = evaluate(self.cfg.window_rules, history)
        new = []
        with self._store.tx() as db:
            for alert in alerts:
                cursor = db.execute(
                    "INSERT OR IGNORE INTO alerts (rule, site, idx, alert, raised_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (alert.rule, alert.site, alert.window, json.dumps(asdict(alert)), self.clock()),
                )
                if cursor.rowcount:
                    new.append(alert)
        latest = {site: windows[-1].index for site, windows in history.items() if windows}
        active = [a for a in alerts if latest.get(a.site) == a.window]
        if notify and new and self.cfg.webhook and post_webhook(self.cfg.webhook, new):
            with self._store.tx() as db:
                for a in new:
                    db.execute(
                        "UPDATE alerts SET notified = 1 WHERE rule = ? AND site = ? AND idx = ?",
                        (a.rule, a.site, a.window),
                    )
        for alert in new if announce else ():
            log.warning("ALERT %s", alert.message())
        return new, active

    def alerts(self) -> list[Alert]:
        return [
            Alert(**json.loads(a))
            for (a,) in self._store.query("SELECT alert FROM alerts ORDER BY site, idx, rule")
        ]

    # reports ------------------------------------------------------------------------------------

    def _write_reports(self, judged: Sequence[tuple[WindowResult, pd.DataFrame, str]]) -> None:

        assert self.workspace_dir is not None
        workspace = MonitorWorkspace(self.workspace_dir)
        history = self.history()  # holds the windows just judged: the rules read back from them
        rules = self.cfg.window_rules
        alerts = evaluate(rules, history)
        html = self.cfg.html
        for i, (result, window, judged_at) in enumerate(judged):
            windows = history.get(result.site, [])
            place = next(k for k, w in enumerate(windows) if w.index == result.index)
            runs = {rule.name: streaks(rule, windows[: place + 1])[-1] for rule in rules}
            stamp = _stamp(result.end)
            snap = snapshot(window, self.reference, result, stamp, rules, runs)
            workspace.add(snap, name=f"{result.site} window {result.index}")
            embedding = embedding_snapshot(window, self.reference, result, stamp)
            if embedding is not None:
                workspace.add(embedding, name=f"{result.site} window {result.index} embedding")
            report = WindowReport(
                result=result,
                snapshot=snap,
                embedding=embedding,
                streaks=runs,
                alerts=[a for a in alerts if a.site == result.site and a.window == result.index],
                judged_at=judged_at,
            )
            self.latest[result.site] = report
            last = i == len(judged) - 1
            wanted = html == "all" or (html == "latest" and last)
            if html == "alerts":
                wanted = bool(report.alerts)
            if wanted and self.reports_dir is not None:
                name = f"drift-{result.site}-window{result.index:04d}.html"
                write_page(self.reports_dir / name, report, rules, self.bundle)
                log.info("drift report: %s", self.reports_dir / name)
        sites = sorted({r.site for r, _, _ in judged} | set(history))
        workspace.save_dashboard(sites, rules)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _stamp(text: str) -> datetime:
    try:
        value = pd.Timestamp(text)
        if pd.isna(value):
            raise ValueError(text)
        return value.to_pydatetime().replace(tzinfo=None)
    except (ValueError, TypeError):
        return datetime.now(UTC).replace(tzinfo=None)
