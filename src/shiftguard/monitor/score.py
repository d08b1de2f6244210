"""Windows of records judged against the reference: per-feature drift (Evidently's default tests,
:mod:`shiftguard.monitor.drift`) and a unified drift score.

The unified score follows CheXstray (Soin et al. 2022): every feature's drift statistic is put on
a common scale, then the groups (metadata, image, output, embedding) are combined with weights.
Here the statistic is each feature's distance to the reference (two-sample Kolmogorov-Smirnov D
for numbers, Jensen-Shannon distance for categories), and the common scale comes from the
reference itself: ``bootstrap`` pairs of independent resamples (a window-sized one and a
reference-sized one) give each feature's distance under no drift, for that window size, and a
live distance becomes a z-score against them. A group's score is the mean z of its features; the
unified score is the weighted mean of the groups. In-distribution windows score about 0 with a
spread below 1; a new scanner moves metadata, image and embedding together.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from shiftguard.config.monitor import estimated_metric
from shiftguard.errors import EstimationError
from shiftguard.monitor.drift import DriftEngine, DriftResult
from shiftguard.monitor.performance import PerformanceEstimator
from shiftguard.records.distance import MIN_SPREAD, distance
from shiftguard.records.features import BY_NAME, FEATURE_NAMES

log = logging.getLogger(__name__)

GROUPS = ("metadata", "image", "output", "embedding")
MIN_HELD_OUT = 20  # held-out reference rows needed to judge outputs on them alone


def held_out_outputs(reference: pd.DataFrame) -> pd.DataFrame:
    """The reference as the monitor compares with it: the model's outputs and embedding of its
    own training series blanked (a network is overconfident on what it was fitted to), when the
    reference has enough held-out (``split`` not ``train``) rows to stand on."""
    if "split" not in reference:
        return reference
    held_out = reference["split"].astype(str) != "train"
    if held_out.sum() < MIN_HELD_OUT:
        return reference
    out = reference.copy()
    for name in FEATURE_NAMES:
        if name in out and BY_NAME[name].group in ("output", "embedding"):
            out.loc[~held_out, name] = np.nan
    return out


def _novel_key(value: Any) -> Any:
    """How a metadata value is compared with the reference's: numbers to 4 significant digits."""
    if isinstance(value, float):
        return float(f"{value:.4g}") if np.isfinite(value) else None
    return value


@dataclass
class WindowResult:
    """One window's verdict."""

    site: str
    index: int
    n: int
    first_seq: int
    last_seq: int
    start: str
    end: str
    drift_share: float
    n_drifted: int
    dataset_drift: bool
    unified_score: float
    group_scores: dict[str, float]
    #: per feature: test, score, threshold, drifted, distance, z (its z-score in the unified score)
    columns: dict[str, dict[str, Any]] = field(default_factory=dict)
    novel: dict[str, float] = field(default_factory=dict)  # share of never-seen categories
    #: label-free performance estimates per method (``cbpe``, ``density_ratio``: see
    #: :meth:`shiftguard.monitor.performance.WindowEstimate.to_dict`) and ``reference``: the
    #: realised metrics of the bundle's labelled held-out reference; empty when not estimated
    estimates: dict[str, dict[str, Any]] = field(default_factory=dict)

    def metric(self, name: str) -> float:
        """The value an alert rule reads: drift_share, unified_score, score_<group>, drift:<x>,
        novel:<x>, estimated_<metric>[_drop][@<method>] (nan where the window has no such
        estimate, or its method could not support one)."""
        estimated = estimated_metric(name)
        if estimated is not None:
            return self.estimated(*estimated)
        if name == "drift_share":
            return self.drift_share
        if name == "unified_score":
            return self.unified_score
        if name.startswith("score_"):
            return self.group_scores.get(name.removeprefix("score_"), float("nan"))
        if name.startswith("drift:"):
            column = self.columns.get(name.removeprefix("drift:"))
            return float(bool(column and column["drifted"]))
        if name.startswith("novel:"):
            return self.novel.get(name.removeprefix("novel:"), 0.0)
        raise KeyError(name)

    def estimated(self, metric: str, method: str = "cbpe", drop: bool = False) -> float:
        """The window's estimate of ``metric`` by ``method`` (with ``drop``: the reference's
        realised value minus it); nan when there is none or the method could not support one."""
        found = self.estimates.get(method)
        if not found or not found.get("supported", False):
            return math.nan
        value = found.get("metrics", {}).get(metric, {}).get("value")
        if value is None:
            return math.nan
        if drop:
            base = self.estimates.get("reference", {}).get(metric)
            return math.nan if base is None else float(base) - float(value)
        return float(value)

    def summary(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "window": self.index,
            "n": self.n,
            "start": self.start,
            "end": self.end,
            "drift_share": round(self.drift_share, 4),
            "n_drifted": self.n_drifted,
            "dataset_drift": self.dataset_drift,
            "unified_score": round(self.unified_score, 3),
            **{f"score_{g}": round(v, 3) for g, v in self.group_scores.items()},
            "drifted": sorted(c for c, v in self.columns.items() if v["drifted"]),
            "novel": {c: round(v, 3) for c, v in self.novel.items() if v > 0},
            **{
                f"estimated_{m}" + ("" if method == "cbpe" else f"@{method}"): _round(
                    self.estimated(m, method), 3
                )
                for method in ("cbpe", "density_ratio")
                if method in self.estimates
                for m in ("auroc", "sensitivity", "specificity")
            },
        }


class Scorer:
    """Per-feature drift and the unified score of windows against one reference table."""

    def __init__(
        self,
        reference: pd.DataFrame,
        weights: Mapping[str, float] | None = None,
        bootstrap: int = 200,
        seed: int = 0,
        drift_share: float = 0.5,
        estimator: PerformanceEstimator | None = None,
    ) -> None:
        """``estimator``: estimates each window's performance without labels (``None``: no
        estimates; the drift judgement does not depend on it)."""
        self.estimator = estimator
        reference = held_out_outputs(reference)
        self.features = [n for n in FEATURE_NAMES if n in reference and BY_NAME[n].group in GROUPS]
        missing = [n for n in FEATURE_NAMES if n not in reference and BY_NAME[n].group in GROUPS]
        if missing:
            raise ValueError(f"the reference lacks {', '.join(missing)}: re-export the bundle")
        self.reference = reference[self.features].reset_index(drop=True)
        self.kinds = {n: BY_NAME[n].kind for n in self.features}
        self.engine = DriftEngine(self.reference, self.kinds)
        self.weights = {g: float((weights or {}).get(g, 1.0)) for g in GROUPS}
        self.bootstrap = bootstrap
        self.seed = seed
        self.drift_share = drift_share
        self._null: dict[int, tuple[dict[str, float], dict[str, float]]] = {}
        self._values = {n: _column(self.reference[n], self.kinds[n]) for n in self.features}
        # the values the reference had, for categories and acquisition parameters: a value never
        # seen before (a new scanner model, a new slice thickness) is news at once
        self._seen = {
            n: {_novel_key(v) for v in self._values[n]} - {None}
            for n in self.features
            if self.kinds[n] == "categorical" or BY_NAME[n].group == "metadata"
        }

    # the null distribution of each feature's distance, per window size -----------------------

    def null(self, n: int) -> tuple[dict[str, float], dict[str, float]]:
        """(mean, spread) of each feature's distance for windows of ``n`` drawn with no drift."""
        if n not in self._null:
            rng = np.random.default_rng([self.seed, n])
            samples: dict[str, list[float]] = {f: [] for f in self.features}
            # each feature from its own known values: some are known for held-out rows only
            valid = {f: self._values[f][_known(self._values[f])] for f in self.features}
            for _ in range(self.bootstrap):
                for f, values in valid.items():
                    if values.size < 2:
                        continue
                    ref = values[rng.integers(0, values.size, values.size)]
                    window = values[rng.integers(0, values.size, n)]
                    d = distance(ref, window, self.kinds[f])
                    if d is not None:
                        samples[f].append(d)
            mean = {f: float(np.mean(v)) if v else 0.0 for f, v in samples.items()}
            spread = {
                f: max(float(np.std(v)), MIN_SPREAD) if len(v) > 1 else 1.0
                for f, v in samples.items()
            }
            self._null[n] = (mean, spread)
        return self._null[n]

    # judging a window ---------------------------------------------------------------------------

    def judge(self, window: pd.DataFrame) -> tuple[DriftResult, float, dict[str, float]]:
        """Per-feature drift, the unified score and the group scores of one window."""
        result, unified, groups, _ = self._judge(window)
        return result, unified, groups

    def _judge(
        self, window: pd.DataFrame
    ) -> tuple[DriftResult, float, dict[str, float], dict[str, float]]:
        """:meth:`judge`, and each feature's z-score (its distance against the null's)."""
        frame = window[self.features].reset_index(drop=True)
        result = self.engine.run(frame)
        mean, spread = self.null(len(window))
        z: dict[str, float] = {}
        by_group: dict[str, list[float]] = {g: [] for g in GROUPS}
        for name in self.features:
            d = distance(
                self._values[name], _column(frame[name], self.kinds[name]), self.kinds[name]
            )
            if d is None:
                continue
            z[name] = (d - mean[name]) / spread[name]
            by_group[BY_NAME[name].group].append(z[name])
        groups = {g: float(np.mean(v)) for g, v in by_group.items() if v}
        total = sum(self.weights[g] for g in groups)
        unified = (
            sum(self.weights[g] * s for g, s in groups.items()) / total if total > 0 else math.nan
        )
        return result, float(unified), groups, z

    def window_result(self, site: str, index: int, window: pd.DataFrame) -> WindowResult:
        result, unified, groups, z = self._judge(window)
        novel = {}
        any_new = np.zeros(len(window), dtype=bool)
        for name, seen in self._seen.items():
            keys = [_novel_key(v) for v in _column(window[name], self.kinds[name])]
            new = np.array([k is not None and k not in seen for k in keys], dtype=bool)
            known = sum(k is not None for k in keys)
            novel[name] = float(new.sum() / known) if known else 0.0
            any_new |= new
        novel["any_metadata"] = float(any_new.mean()) if len(window) else 0.0
        seq = window["seq"] if "seq" in window else pd.Series(range(len(window)))
        times = window["processed_at"] if "processed_at" in window else pd.Series([""])
        return WindowResult(
            site=site,
            index=index,
            n=len(window),
            first_seq=int(seq.min()),
            last_seq=int(seq.max()),
            start=str(times.min()),
            end=str(times.max()),
            drift_share=result.share,
            n_drifted=result.n_drifted,
            dataset_drift=result.dataset_drift(self.drift_share),
            unified_score=unified,
            group_scores=groups,
            columns={
                name: {
                    "test": c.test,
                    "score": c.score,
                    "threshold": c.threshold,
                    "drifted": c.drifted,
                    "distance": c.distance,
                    "z": z.get(name, math.nan),
                }
                for name, c in result.columns.items()
            },
            novel=novel,
            estimates=self.estimates(window),
        )

    def estimates(self, window: pd.DataFrame) -> dict[str, dict[str, Any]]:
        """The window's label-free performance estimates (``{}`` without an estimator)."""
        if self.estimator is None:
            return {}
        try:
            estimated = self.estimator.window(window)
        except EstimationError as err:  # a window the estimators cannot read: drift still judged
            log.warning("performance not estimated on a window of %d: %s", len(window), err)
            return {}
        found: dict[str, dict[str, Any]] = {
            method: estimate.to_dict() for method, estimate in estimated.items()
        }
        found["reference"] = dict(self.estimator.reference_metrics)
        return found


def _column(values: pd.Series, kind: str) -> np.ndarray:
    """A feature's values as the distance functions take them: floats (NaN for missing) or
    strings (None for missing)."""
    if kind == "numerical":
        return pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    return np.array([None if pd.isna(v) else str(v) for v in values], dtype=object)


def _known(values: np.ndarray) -> np.ndarray:
    if values.dtype == object:
        return np.array([v is not None for v in values], dtype=bool)
    return np.isfinite(values)


def cut_windows(
    records: pd.DataFrame, by: str, size: int, period_hours: float, min_size: int
) -> list[tuple[int, pd.DataFrame, bool]]:
    """(index, rows, complete) for one site's records in arrival order. Count windows are complete
    at ``size`` rows; time windows (on ``processed_at``) when a later record exists, and are judged
    only with at least ``min_size`` rows. The last, still open, window comes last, flagged."""
    if records.empty:
        return []
    if by == "count":
        out = []
        for index, start in enumerate(range(0, len(records), size)):
            rows = records.iloc[start : start + size]
            out.append((index, rows, len(rows) == size))
        return out
    stamps = pd.to_datetime(records["processed_at"], utc=True, errors="coerce")
    if stamps.isna().any():
        bad = records.loc[stamps.isna(), "processed_at"].iloc[0]
        raise ValueError(f"processed_at {bad!r} is not an ISO-8601 time")
    period = pd.Timedelta(hours=period_hours)
    origin = stamps.min().floor("D")
    keys = ((stamps - origin) // period).astype(int)
    last = int(keys.max())
    return [
        (int(k), records[keys == k], int(k) < last)
        for k in sorted(keys.unique())
        if (keys == k).sum() >= min_size or int(k) == last
    ]


def _round(value: float, digits: int) -> float | None:
    return round(value, digits) if math.isfinite(value) else None
