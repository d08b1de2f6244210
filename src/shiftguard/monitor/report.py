"""Evidently reports, snapshots and the dashboard for drift windows.

Each judged window becomes an Evidently snapshot in a local workspace (one project, snapshots
tagged with their site, dated by the window's last study): Evidently's DataDriftPreset on every
feature (the verdicts match :mod:`shiftguard.monitor.drift`, which the alerts use; its table lists
the drifted features first), Evidently's embedding drift on the PCA components of the penultimate
features, the window's unified and group scores, each key feature's drift z-score and the mean
probability as scalars the dashboard plots over time, and ShiftGuard's alert rules as the
snapshot's tests (Evidently's own automatic tests are off: they fail for any drift at all).
``evidently ui --workspace <folder>`` shows the ready-made dashboard.

The static HTML page of a window (:func:`write_page`) is rendered from the very snapshots the
workspace holds, under a ShiftGuard header: site, window, dates, bundle, unified score, the alert
rules and what they gave, and the features, drifted first.

Evidently names projects, snapshots, widgets and dashboard panels with random UUIDs (``uuid4`` and
the clock-based ``uuid7``): inside :func:`seeded_ids` they come from a seeded generator instead, so a
workspace or report written whole in one go is the same bytes for the same windows (the DVC stage
``monitor`` does that).
"""

from __future__ import annotations

import html
import importlib
import logging
import math
import random
import re
import sys
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from shiftguard.errors import PageError
from shiftguard.monitor.alerts import Alert, fires_below, rule_text, threshold
from shiftguard.monitor.score import GROUPS, WindowResult
from shiftguard.records.features import BY_NAME, FEATURE_NAMES

log = logging.getLogger(__name__)

PROJECT = "ShiftGuard drift monitor"
SCALARS = ("unified_score", *(f"score_{g}" for g in GROUPS))
#: the label-free estimates the snapshot carries and the dashboard plots (CBPE's; the density
#: ratio's with ``@density_ratio``)
ESTIMATED = tuple(
    f"estimated_{m}{suffix}"
    for suffix in ("", "@density_ratio")
    for m in ("auroc", "sensitivity", "specificity")
)
KEY_FEATURES = ("scanner_model", "slice_thickness", "snr", "noise", "emb_0", "probability")
EMBEDDING = [n for n in FEATURE_NAMES if BY_NAME[n].group == "embedding"]


#: the Evidently modules that draw ids (or hold ``uuid7`` under their own name)
_EVIDENTLY_ID_MODULES = (
    "evidently.core.metric_types",
    "evidently.legacy.core",
    "evidently.legacy.renderers.html_widgets",
    "evidently.sdk.models",
    "evidently.ui.workspace",
)
#: the time field of the ids :func:`seeded_ids` draws: 2026-01-01T00:00:00Z in ms, then one more each
SEEDED_EPOCH_MS = 1_767_225_600_000


@contextmanager
def seeded_ids(seed: int = 0) -> Iterator[None]:
    """While in the block, Evidently's ids come from a generator seeded with ``seed``: version-4
    UUIDs from its random bits, version-7 ones from a counter from :data:`SEEDED_EPOCH_MS` (time
    ordered, as Evidently expects) and its random bits.

    Evidently draws its ids from ``uuid.uuid4`` and ``uuid6.uuid7``, and some of its modules hold
    those functions under their own names; each of those is swapped for the seeded one and put back
    on leaving, also in Evidently modules first imported inside the block. Evidently's own demo
    projects replace the same two functions to be reproducible
    (``evidently.cli.ui.setup_deterministic_generation_uuid``).

    The swap is process-wide: use it where one thread writes a workspace or report whole (a
    batch job), never in a service. Ids from one seed repeat, so a workspace must not be appended
    to under the same seed twice.
    """
    import uuid6

    for module in _EVIDENTLY_ID_MODULES:  # loaded first, so that the swap finds the names they hold
        importlib.import_module(module)
    rng = random.Random(seed)
    count = 0

    def uuid4() -> uuid.UUID:
        return uuid.UUID(int=rng.getrandbits(128), version=4)

    def uuid7() -> uuid6.UUID:
        nonlocal count
        count += 1
        stamp = (SEEDED_EPOCH_MS + count) & 0xFFFFFFFFFFFF
        return uuid6.UUID(int=(stamp << 80) | rng.getrandbits(76), version=7)

    swaps: dict[Callable[..., Any], Callable[..., Any]] = {
        uuid.uuid4: uuid4,
        uuid6.uuid7: uuid7,
    }
    _swap_ids(swaps)
    try:
        yield
    finally:
        _swap_ids({seeded: real for real, seeded in swaps.items()})


def _swap_ids(swaps: dict[Callable[..., Any], Callable[..., Any]]) -> None:
    """Rebind every name in ``uuid``, ``uuid6`` and the loaded Evidently modules that holds a key of
    ``swaps`` to its value."""
    modules = [
        module
        for name, module in list(sys.modules.items())
        if module is not None and (name in ("uuid", "uuid6") or name.split(".")[0] == "evidently")
    ]
    by_id = {id(old): new for old, new in swaps.items()}
    for module in modules:
        for attr, value in list(vars(module).items()):
            if id(value) in by_id:
                setattr(module, attr, by_id[id(value)])


def rule_column(rule: Any) -> str:
    """The snapshot column that carries an alert rule's streak (windows in a row above its
    threshold, up to this one), on which the rule's test reads."""
    side = "<" if fires_below(rule) else ">"
    return f"alert {rule.name}: windows in a row with {rule.metric} {side} {threshold(rule):g}"


def z_column(feature: str) -> str:
    """The snapshot column that carries a feature's drift z-score (see :func:`snapshot`)."""
    return f"drift z: {feature}"


def _definition(features: Sequence[str], extra: Sequence[str]) -> Any:
    from evidently import DataDefinition

    numerical = [f for f in features if BY_NAME[f].kind == "numerical"]
    categorical = [f for f in features if BY_NAME[f].kind == "categorical"]
    embeddings = {"embedding": [f for f in EMBEDDING if f in features]}
    return DataDefinition(
        numerical_columns=numerical + list(extra),
        categorical_columns=categorical,
        embeddings=embeddings if embeddings["embedding"] else None,
    )


def snapshot(
    window: pd.DataFrame,
    reference: pd.DataFrame,
    result: WindowResult,
    timestamp: datetime,
    rules: Sequence[Any] = (),
    streaks: Mapping[str, int] | None = None,
) -> Any:
    """The Evidently snapshot of one window (``Report.run`` on the window and the reference).

    Besides the features, the window carries constant columns the dashboard plots over time (the
    reference has 0 in each): the unified and group scores, each key feature's drift z-score (its
    distance to the reference against windows of the same size drawn from the reference, the
    number the unified score averages), and per alert rule its streak, ``streaks[rule.name]``
    (see :func:`~shiftguard.monitor.alerts.streaks`). Each rule is the snapshot's test on its
    streak's mean: it fails where the streak reaches the rule's ``windows``, which is where
    :func:`~shiftguard.monitor.alerts.evaluate` raises the alert. Evidently's automatic tests are
    off. Its drift table lists the drifted features first, then by z-score, largest first.
    """
    from evidently import Report
    from evidently.metrics import EmbeddingsDrift, MeanValue
    from evidently.presets import DataDriftPreset
    from evidently.tests.numerical_tests import LessThanMetricTest

    features = [f for f in FEATURE_NAMES if f in reference.columns and f in window.columns]
    features = [f for f in features if BY_NAME[f].group != "segment"]
    current = window[features].reset_index(drop=True).copy()
    ref = reference[features].reset_index(drop=True).copy()
    scalars: dict[str, float] = {"unified_score": result.unified_score}
    scalars.update({f"score_{g}": result.group_scores.get(g, 0.0) for g in GROUPS})
    for name in KEY_FEATURES:
        z = result.columns.get(name, {}).get("z", math.nan)
        scalars[z_column(name)] = 0.0 if z is None or not math.isfinite(z) else float(z)
    for name in ESTIMATED:  # only where the window has the estimate: a gap, not a false 0
        value = result.metric(name)
        if math.isfinite(value):
            scalars[name] = value
    streaks = streaks or {}
    scalars.update({rule_column(rule): float(streaks.get(rule.name, 0)) for rule in rules})
    for frame in (current, ref):
        for f in features:
            if BY_NAME[f].kind == "numerical":
                frame[f] = pd.to_numeric(frame[f], errors="coerce")
            else:
                frame[f] = frame[f].astype(str)
    # Evidently refuses a column with no value on a side (CT's kVp in an MR stream): left out, as
    # the drift engine leaves it out
    empty = [f for f in features if current[f].isna().all() or ref[f].isna().all()]
    features = [f for f in features if f not in empty]
    current, ref = current.drop(columns=empty), ref.drop(columns=empty)
    extra = pd.DataFrame({name: [float(v)] * len(current) for name, v in scalars.items()})
    current = pd.concat([current, extra], axis=1)
    ref = pd.concat([ref, pd.DataFrame(0.0, index=ref.index, columns=list(scalars))], axis=1)
    definition = _definition(features, list(scalars))
    metrics: list[Any] = [DataDriftPreset(columns=features)]
    complete = bool(ref[[e for e in EMBEDDING if e in ref]].notna().all(axis=1).all())
    if complete and EMBEDDING and all(e in features for e in EMBEDDING) and len(current) >= 10:
        metrics.append(EmbeddingsDrift(embeddings_name="embedding"))  # else: embedding_snapshot
    tested = {rule_column(rule) for rule in rules}
    metrics += [MeanValue(column=name) for name in scalars if name not in tested]
    metrics.append(MeanValue(column="probability"))
    metrics += [
        MeanValue(
            column=rule_column(rule),
            tests=[
                LessThanMetricTest(
                    threshold=rule.windows, alias=f"alert {rule.name} ({rule_text(rule)})"
                )
            ],
        )
        for rule in rules
    ]
    report = Report(metrics, include_tests=False)
    with warnings.catch_warnings():
        # scipy's chi-square divides by zero for a category the reference never had: expected
        warnings.simplefilter("ignore", RuntimeWarning)
        snap = _run(report, current, ref, definition, result, timestamp)
    return _drifted_first(snap, result)


def _drifted_first(snap: Any, result: WindowResult) -> Any:
    """The snapshot with the rows of its drift table(s) in the order drifted first, then by
    drift z-score, largest first (Evidently sorts them by the test's score, largest first, and
    most scores are p-values: the least drifted came first). Built again from its model, so that
    what the workspace stores and what a page renders is this one object."""
    from evidently.core.report import Snapshot

    def key(row: Mapping[str, Any]) -> tuple[bool, float]:
        z = result.columns.get(str(row.get("column_name")), {}).get("z")
        strength = float(z) if isinstance(z, int | float) and math.isfinite(z) else -math.inf
        return (row.get("data_drift") != "Detected", -strength)

    model = snap.to_snapshot_model()
    for widget in _walk(model.widgets):
        if _is_drift_table(widget.params):
            widget.params["data"] = sorted(widget.params["data"], key=key)
    return Snapshot.load_model(model)


def _walk(widgets: Iterable[Any]) -> Iterator[Any]:
    """Every widget (an Evidently widget or its dict), children after their parent."""
    for widget in widgets:
        yield widget
        children = widget.get("widgets") if isinstance(widget, Mapping) else widget.widgets
        yield from _walk(children or [])


def _is_drift_table(params: Mapping[str, Any] | None) -> bool:
    columns = (params or {}).get("columns") or []
    return any(isinstance(c, Mapping) and c.get("field") == "data_drift" for c in columns)


def verdicts(widgets: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """What Evidently's widgets say (``widgets``: as dicts, e.g. a snapshot model's ``widgets``
    and ``tests_widgets`` dumped, or the dashboard JSON embedded in a page):

    * ``columns``: per feature of the drift table, whether drift was detected, in table order;
    * ``dataset_drift``, ``n_drifted``, ``n_columns``: the dataset's verdict and counts;
    * ``embedding_drift``, ``embedding_score``: Evidently's embedding drift, when shown;
    * ``tests``: each test's title and state (``"success"``, ``"fail"``, ...).

    Keys whose widget is not there are None (empty for ``columns`` and ``tests``).
    """
    out: dict[str, Any] = dict.fromkeys(
        ("dataset_drift", "n_drifted", "n_columns", "embedding_drift", "embedding_score")
    )
    out["columns"], out["tests"] = {}, {}
    for widget in _walk(widgets):
        params = widget.get("params") or {}
        if _is_drift_table(params):
            for row in params.get("data") or []:
                out["columns"][str(row["column_name"])] = row.get("data_drift") == "Detected"
        for counter in params.get("counters") or []:
            value, label = str(counter.get("value", "")), str(counter.get("label", ""))
            if value == "Dataset Drift":
                out["dataset_drift"] = label.startswith("Dataset Drift is detected")
            elif label == "Drifted Columns":
                out["n_drifted"] = int(float(value))
            elif label == "Columns":
                out["n_columns"] = int(float(value))
            elif value.startswith("Drift in embeddings"):
                out["embedding_drift"] = label.startswith("Data drift detected")
                score = re.search(r"Drift score: ([-+0-9.eE]+)", label)
                out["embedding_score"] = float(score.group(1)) if score else None
        if widget.get("type") == "test_suite":
            for test in params.get("tests") or []:
                out["tests"][str(test["title"])] = str(test["state"])
    return out


def embedding_snapshot(
    window: pd.DataFrame, reference: pd.DataFrame, result: WindowResult, timestamp: datetime
) -> Any | None:
    """Evidently's embedding drift (a classifier told to separate the window's penultimate
    features from the reference's; drift when its ROC AUC passes 0.55) on the reference rows
    whose embedding is known (the held-out ones), as a snapshot of its own; None when there are
    too few rows (fewer than 10 on a side, or 40 in all: its t-SNE view needs more than 30)."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import EmbeddingsDrift

    cur = window[EMBEDDING].apply(pd.to_numeric, errors="coerce").dropna()
    ref = reference[EMBEDDING].apply(pd.to_numeric, errors="coerce").dropna()
    # Evidently draws a t-SNE of both with perplexity 30, which needs more than 30 rows in all
    if len(cur) < 10 or len(ref) < 10 or len(cur) + len(ref) <= 40:
        return None
    definition = DataDefinition(numerical_columns=EMBEDDING, embeddings={"embedding": EMBEDDING})
    report = Report([EmbeddingsDrift(embeddings_name="embedding")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return report.run(
            Dataset.from_pandas(cur.reset_index(drop=True), data_definition=definition),
            Dataset.from_pandas(ref.reset_index(drop=True), data_definition=definition),
            timestamp=timestamp,
            tags=[f"site:{result.site}", "embedding"],
            metadata={"site": result.site, "window": str(result.index)},
        )


def _run(
    report: Any,
    current: pd.DataFrame,
    ref: pd.DataFrame,
    definition: Any,
    result: WindowResult,
    timestamp: datetime,
) -> Any:
    from evidently import Dataset

    return report.run(
        Dataset.from_pandas(current, data_definition=definition),
        Dataset.from_pandas(ref, data_definition=definition),
        timestamp=timestamp,
        tags=[f"site:{result.site}"],
        metadata={
            "site": result.site,
            "window": str(result.index),
            "n": str(result.n),
            "start": result.start,
            "end": result.end,
            "unified_score": f"{result.unified_score:.3f}",
            "drift_share": f"{result.drift_share:.3f}",
        },
    )


@dataclass(frozen=True)
class BundleInfo:
    """The bundle a monitor judges against, as a report names it."""

    name: str
    version: str
    sha256: str = ""  # of the bundle file; "" when unknown
    threshold: float | None = None  # the operating point; None: performance is not estimated


@dataclass
class WindowReport:
    """A judged window and what was written for it: the Evidently snapshots the workspace holds
    (``embedding``: None when there were too few rows for it), each alert rule's streak up to this
    window, the alerts raised on it, and when it was judged."""

    result: WindowResult
    snapshot: Any
    embedding: Any | None
    streaks: dict[str, int] = field(default_factory=dict)
    alerts: list[Alert] = field(default_factory=list)
    judged_at: str = ""


#: helper columns whose report widget (a histogram of one constant value) a page leaves out
def _constant_columns(rules: Sequence[Any]) -> set[str]:
    return {*SCALARS, *map(z_column, KEY_FEATURES), *map(rule_column, rules)}


def write_page(
    path: Path | str,
    report: WindowReport,
    rules: Sequence[Any],
    bundle: BundleInfo | None = None,
) -> Path:
    """Write a window's static HTML page: a ShiftGuard header (site, window and its dates,
    bundle, unified score, each alert rule and what it gave, the features drifted first), then
    Evidently's report of the window's snapshot and of its embedding snapshot, rendered from those
    very snapshots (the ones the workspace holds), with their tests (the alert rules).

    Raises:
        PageError: Evidently's rendered HTML has no single ``<head>`` and ``<body>`` to put the
            header into (an Evidently version this was not written for).
    """
    from evidently.core.metric_types import render_widgets
    from evidently.legacy.renderers.html_widgets import group_widget

    model = report.snapshot.to_snapshot_model()
    hidden = tuple(f"Mean value of '{c}'" for c in _constant_columns(rules))
    widgets = [w for w in model.widgets if not (w.title or "").startswith(hidden)]
    groups = [group_widget(title="", widgets=widgets)]
    if report.embedding is not None:
        embedding = report.embedding.to_snapshot_model()
        groups.append(
            group_widget(
                title="Embedding drift (Evidently: a classifier told to separate the window's "
                "penultimate features from the reference's; drift when its ROC AUC passes 0.55)",
                widgets=list(embedding.widgets),
            )
        )
    text = render_widgets([*groups, *model.tests_widgets], as_iframe=False)
    shown = verdicts(w.dict() for w in [*groups, *model.tests_widgets])
    header = _header(report, rules, bundle, shown)
    title = f"ShiftGuard drift report: {report.result.site}, window {report.result.index}"
    for tag, added in (("<head>", f"<title>{html.escape(title)}</title>"), ("<body>", header)):
        if text.count(tag) != 1:
            raise PageError(
                f"Evidently's report HTML holds {text.count(tag)} {tag} tags, not one: the "
                f"ShiftGuard header cannot be placed (evidently {_evidently_version()})"
            )
        text = text.replace(tag, f"{tag}\n{added}", 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _evidently_version() -> str:
    import evidently

    return str(getattr(evidently, "__version__", "?"))


_STYLE = """<style>
#shiftguard{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;max-width:1200px;
margin:16px auto;padding:0 16px;color:#1d1d1f}
#shiftguard h1{font-size:1.6em;margin:.4em 0}#shiftguard h2{font-size:1.2em;margin:1.2em 0 .4em}
#shiftguard table{border-collapse:collapse;margin:.3em 0;font-size:.95em}
#shiftguard th,#shiftguard td{border:1px solid #d0d0d5;padding:3px 9px;text-align:left;
vertical-align:top}#shiftguard th{background:#f3f3f6}
#shiftguard .fire{color:#b00020;font-weight:600}#shiftguard .ok{color:#1b7f3b}
#shiftguard .drifted{color:#b00020}#shiftguard .note{color:#555;font-size:.9em}
</style>"""


def _when(text: str) -> str:
    """An ISO time as ``YYYY-MM-DD HH:MM`` (the text itself when it is not one)."""
    value = pd.Timestamp(text) if text else None
    try:
        return text if value is None or pd.isna(value) else value.strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return text


def _number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return (
        f"{float(value):.{digits}g}" if abs(float(value)) < 1e-3 else f"{float(value):.{digits}f}"
    )


def _header(
    report: WindowReport, rules: Sequence[Any], bundle: BundleInfo | None, shown: Mapping[str, Any]
) -> str:
    r = report.result
    e = html.escape
    groups = ", ".join(f"{g} {r.group_scores[g]:.2f}" for g in GROUPS if g in r.group_scores)
    if bundle is not None:
        sha = f", sha256 {bundle.sha256[:12]}…" if bundle.sha256 else ""
        bundle_text = f"{bundle.name}, version {bundle.version}{sha}"
    else:
        bundle_text = "not named"
    if shown.get("embedding_drift") is None:
        embedding = "not computed (too few studies with an embedding on a side)"
    else:
        verdict = "detected" if shown["embedding_drift"] else "not detected"
        embedding = (
            f"{verdict} (Evidently's classifier ROC AUC {_number(shown['embedding_score'])}; "
            "drift above 0.55)"
        )
    n_columns = len(r.columns)
    facts = [
        ("Site", r.site),
        (
            "Window",
            f"#{r.index}: {r.n} studies (records {r.first_seq} to {r.last_seq} of the stream)",
        ),
        ("Studies' dates", f"{_when(r.start)} to {_when(r.end)}"),
        ("Judged", _when(report.judged_at) or "-"),
        ("Bundle", bundle_text),
        (
            "Unified drift score",
            f"{r.unified_score:.2f} ({groups}); about 0 in distribution, below 1 in spread",
        ),
        (
            "Features drifted",
            f"{r.n_drifted} of {n_columns} ({100 * r.drift_share:.0f}%): dataset drift "
            f"{'detected' if r.dataset_drift else 'not detected'}",
        ),
        ("Embedding drift", embedding),
        *_estimate_facts(r),
    ]
    rows = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in facts)
    fired = {a.rule: a for a in report.alerts}
    rule_rows = []
    for rule in rules:
        value = r.metric(rule.metric) if _known_metric(r, rule.metric) else math.nan
        status = (
            '<td class="fire">ALERT</td>' if rule.name in fired else '<td class="ok">no alert</td>'
        )
        rule_rows.append(
            f"<tr><td>{e(rule.name)}</td><td>{e(rule_text(rule))}</td>"
            f"<td>{e(_number(value))}</td><td>{report.streaks.get(rule.name, 0)}</td>{status}</tr>"
        )
    alerts = (
        "<ul>" + "".join(f'<li class="fire">{e(a.message())}</li>' for a in report.alerts) + "</ul>"
        if report.alerts
        else '<p class="ok">No alert on this window.</p>'
    )
    features = sorted(
        r.columns.items(),
        key=lambda kv: (not kv[1]["drifted"], -_finite(kv[1].get("z"))),
    )
    feature_rows = "".join(
        f"<tr{' class=drifted' if c['drifted'] else ''}><td>{e(name)}</td>"
        f"<td>{e(BY_NAME[name].group)}</td><td>{'yes' if c['drifted'] else 'no'}</td>"
        f"<td>{e(_number(c.get('z')))}</td><td>{e(c['test'])}</td>"
        f"<td>{e(_number(c['score']))}</td><td>{e(_number(c['threshold']))}</td></tr>"
        for name, c in features
    )
    return f"""{_STYLE}
<div id="shiftguard">
<h1>ShiftGuard drift report: {e(r.site)}, window {r.index}</h1>
<p>The window's studies against the bundle's training reference. Every figure below and
Evidently's report under it come from the same judged window; the Tests tab holds ShiftGuard's alert
rules.</p>
<table>{rows}</table>
<h2>Alerts</h2>
{alerts}
<table><tr><th>rule</th><th>fires when</th><th>this window</th><th>windows in a row</th>
<th>status</th></tr>{"".join(rule_rows)}</table>
<h2>Features, drifted first</h2>
<p class="note">drift z: the feature's distance to the reference (Kolmogorov-Smirnov D for
numbers, Jensen-Shannon for categories) against windows of the same size drawn from the reference,
in their standard deviations: larger is more drift, and the unified score is its mean per group.
Test and score: Evidently's default test (a p-value, drift below the threshold; or a
distance, drift from the threshold up).</p>
<table><tr><th>feature</th><th>group</th><th>drifted</th><th>drift z</th><th>test</th>
<th>score</th><th>threshold</th></tr>{feature_rows}</table>
<h2>Evidently report</h2>
</div>"""


def _estimate_facts(r: WindowResult) -> list[tuple[str, str]]:
    """The page's lines on the window's estimated performance (none when not estimated)."""
    out = []
    names = {"cbpe": "from calibrated outputs (CBPE)", "density_ratio": "reweighted reference"}
    for method, words in names.items():
        found = r.estimates.get(method)
        if not found:
            continue
        parts = []
        for metric in ("auroc", "sensitivity", "specificity"):
            m = found.get("metrics", {}).get(metric, {})
            parts.append(
                f"{metric} {_number(m.get('value'))} [{_number(m.get('low'))}, "
                f"{_number(m.get('high'))}]"
            )
        text = "; ".join(parts)
        if found.get("ess") is not None:
            text += f" (effective reference size {_number(found['ess'], 1)})"
        if not found.get("supported", True):
            text = f"not supported: {found.get('reason', '')} ({text})"
        out.append((f"Estimated performance, {words}", text))
    reference = r.estimates.get("reference")
    if reference:
        out.append(
            (
                "Reference performance (labelled held-out series)",
                "; ".join(
                    f"{m} {_number(reference.get(m))}"
                    for m in ("auroc", "sensitivity", "specificity")
                ),
            )
        )
    return out


def _finite(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else -math.inf


def _known_metric(result: WindowResult, name: str) -> bool:
    try:
        result.metric(name)
    except KeyError:
        return False
    return True


class MonitorWorkspace:
    """The Evidently workspace folder with ShiftGuard's project and dashboard."""

    def __init__(self, folder: Path | str, project: str = PROJECT) -> None:
        from evidently.ui.workspace import Workspace

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.workspace = Workspace(str(self.folder))
        found = self.workspace.search_project(project)
        if found:
            self.project = found[0]
        else:
            self.project = self.workspace.create_project(
                project,
                description="Drift of the edge runner's PHI-free feature records against the "
                "bundle's training reference (ShiftGuard).",
            )
            self.project.save()

    def add(self, snap: Any, name: str) -> None:
        self.workspace.add_run(self.project.id, snap, name=name)

    def n_snapshots(self) -> int:
        return len(self.workspace.list_runs(self.project.id))

    def save_dashboard(self, sites: Sequence[str], rules: Sequence[Any] = ()) -> None:
        """(Re)write the dashboard: scores over time, drift share, key features' drift z-scores,
        the alert rules' streaks, probability per site. Written whole each time (adding panels to
        an existing tab duplicates them), with panel and tab ids derived from the project's
        (Evidently draws random ones)."""
        from evidently.sdk.models import DashboardModel, DashboardTabModel, PanelMetric
        from evidently.sdk.panels import bar_plot_panel, counter_panel, line_plot_panel, text_panel

        share = {"metric": "DriftedColumnsCount", "metric_labels": {"value_type": "share"}}

        def mean(column: str, legend: str, tags: list[str] | None = None) -> Any:
            return PanelMetric(
                legend=legend, metric="MeanValue", metric_labels={"column": column}, tags=tags or []
            )

        overview = [
            text_panel(
                title="Drift of live studies against the training reference",
                description="One snapshot per window of studies per site, dated by the "
                "window's last study. Unified score: z-scored feature distances, averaged per "
                "group (CheXstray-style); about 0 in distribution, alerts above the configured "
                "threshold.",
            ),
            counter_panel(
                title="Unified drift score (latest window)",
                size="half",
                values=[mean("unified_score", "unified")],
            ),
            counter_panel(
                title="Share of drifted features (latest window)",
                size="half",
                values=[PanelMetric(legend="share", **share)],
            ),
            line_plot_panel(
                title="Unified and group drift scores",
                values=[mean(name, name.removeprefix("score_")) for name in SCALARS],
            ),
            line_plot_panel(
                title="Share of drifted features (Evidently DataDriftPreset)",
                values=[PanelMetric(legend="drifted share", **share)],
            ),
            line_plot_panel(
                title="Embedding drift (Evidently, classifier ROC AUC; drift above 0.55)",
                values=[
                    PanelMetric(legend="embedding", metric="EmbeddingsDrift", tags=["embedding"])
                ],
            ),
            bar_plot_panel(
                title="Key features: drift z-score per window (distance to the reference in "
                "standard deviations of same-size reference windows; larger is more drift)",
                values=[mean(z_column(c), c) for c in KEY_FEATURES],
            ),
            line_plot_panel(
                title="Estimated performance without labels (CBPE from the calibrated outputs; "
                "@density_ratio: the labelled reference reweighted to look like the window)",
                values=[mean(name, name.removeprefix("estimated_")) for name in ESTIMATED],
            ),
            line_plot_panel(
                title="Mean predicted probability per site",
                values=[mean("probability", s, [f"site:{s}"]) for s in sites]
                or [mean("probability", "all sites")],
            ),
        ]
        if rules:
            overview.append(
                line_plot_panel(
                    title="Alert rules: windows in a row above the rule's threshold (the "
                    "alert fires at the rule's number of windows)",
                    values=[mean(rule_column(r), r.name) for r in rules],
                )
            )
        # ids from the project and the panel's place, not random: a rewrite changes nothing
        overview = [
            p.copy(update={"id": self._stable_id("panel", str(i), p.title)})
            for i, p in enumerate(overview)
        ]
        tab = DashboardTabModel(
            id=self._stable_id("tab", "Drift"), title="Drift", panels=[p.id for p in overview]
        )
        self.workspace.save_dashboard(self.project.id, DashboardModel(tabs=[tab], panels=overview))

    def _stable_id(self, *parts: str) -> uuid.UUID:
        return uuid.uuid5(
            uuid.NAMESPACE_URL, "/".join(["shiftguard", str(self.project.id), *parts])
        )
