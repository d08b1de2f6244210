"""Evidently reports, snapshots and the dashboard for drift windows.

Each judged window becomes an Evidently snapshot in a local workspace (one project, snapshots
tagged with their site): Evidently's DataDriftPreset on every feature (the verdicts match
:mod:`shiftguard.monitor.drift`, which the alerts use), Evidently's embedding drift on the PCA
components of the penultimate features, and the window's unified and group scores and mean
probability as scalars the dashboard plots over time. ``evidently ui --workspace <folder>`` shows
the ready-made dashboard; static HTML reports are written beside it.

Evidently names projects, snapshots, widgets and dashboard panels with random UUIDs (``uuid4`` and
the clock-based ``uuid7``): inside :func:`seeded_ids` they come from a seeded generator instead, so a
workspace or report written whole in one go is the same bytes for the same windows (the DVC stage
``monitor`` does that).
"""

from __future__ import annotations

import importlib
import logging
import random
import sys
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from shiftguard.monitor.features import BY_NAME, FEATURE_NAMES
from shiftguard.monitor.score import GROUPS, WindowResult

log = logging.getLogger(__name__)

PROJECT = "ShiftGuard drift monitor"
SCALARS = ("unified_score", *(f"score_{g}" for g in GROUPS))
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


def _definition(features: Sequence[str]) -> Any:
    from evidently import DataDefinition

    numerical = [f for f in features if BY_NAME[f].kind == "numerical"]
    categorical = [f for f in features if BY_NAME[f].kind == "categorical"]
    embeddings = {"embedding": [f for f in EMBEDDING if f in features]}
    return DataDefinition(
        numerical_columns=numerical + list(SCALARS),
        categorical_columns=categorical,
        embeddings=embeddings if embeddings["embedding"] else None,
    )


def snapshot(
    window: pd.DataFrame,
    reference: pd.DataFrame,
    result: WindowResult,
    timestamp: datetime,
) -> Any:
    """The Evidently snapshot of one window (``Report.run`` on the window and the reference)."""
    from evidently import Report
    from evidently.metrics import EmbeddingsDrift, MeanValue
    from evidently.presets import DataDriftPreset

    features = [f for f in FEATURE_NAMES if f in reference.columns and f in window.columns]
    features = [f for f in features if BY_NAME[f].group != "segment"]
    current = window[features].reset_index(drop=True).copy()
    ref = reference[features].reset_index(drop=True).copy()
    scalars = {"unified_score": result.unified_score}
    scalars.update({f"score_{g}": result.group_scores.get(g, 0.0) for g in GROUPS})
    for name, value in scalars.items():
        current[name] = float(value)
        ref[name] = 0.0  # in-distribution by definition
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
    definition = _definition(features)
    metrics: list[Any] = [DataDriftPreset(columns=features)]
    complete = bool(ref[[e for e in EMBEDDING if e in ref]].notna().all(axis=1).all())
    if complete and EMBEDDING and all(e in features for e in EMBEDDING) and len(current) >= 10:
        metrics.append(EmbeddingsDrift(embeddings_name="embedding"))  # else: embedding_snapshot
    metrics += [MeanValue(column=name) for name in (*SCALARS, "probability")]
    report = Report(metrics, include_tests=True)
    with warnings.catch_warnings():
        # scipy's chi-square divides by zero for a category the reference never had: expected
        warnings.simplefilter("ignore", RuntimeWarning)
        return _run(report, current, ref, definition, result, timestamp)


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
            "unified_score": f"{result.unified_score:.3f}",
            "drift_share": f"{result.drift_share:.3f}",
        },
    )


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

    def save_dashboard(self, sites: Sequence[str]) -> None:
        """(Re)write the dashboard: scores over time, drift share, key features, probability per
        site. Written whole each time (adding panels to an existing tab duplicates them), with
        panel and tab ids derived from the project's (Evidently draws random ones)."""
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
                description="One snapshot per window of studies per site. Unified score: "
                "z-scored feature distances, averaged per group (CheXstray-style); about 0 "
                "in distribution, alerts above the configured threshold.",
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
                title="Key features: drift score per window",
                values=[
                    PanelMetric(legend=c, metric="ValueDrift", metric_labels={"column": c})
                    for c in KEY_FEATURES
                ],
            ),
            line_plot_panel(
                title="Mean predicted probability per site",
                values=[mean("probability", s, [f"site:{s}"]) for s in sites]
                or [mean("probability", "all sites")],
            ),
        ]
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
