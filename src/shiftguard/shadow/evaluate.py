"""The shadow log joined with the verified diagnoses, judged overall and per segment, and the
challenger compared with the champion on the same studies.

Predictions wait in the shadow log until their study's verified diagnosis arrives; a study without
one yet is counted as pending, never dropped. Each role (champion, challenger) is judged on the
studies that have a verdict, with :func:`~shiftguard.evaluation.segments.segment_table` (AUROC,
sensitivity and specificity at the bundle's threshold, bootstrap CIs, segments too small to judge
marked as such), plus an ``overall`` row. A judgeable segment is flagged when it is significantly
below the overall figure, or below the validation stage's figure for the same segment (one-sided
tests with the bootstrap standard error, Holm-corrected over every segment and metric of the
role); every row carries its gap to that validation figure where one is known.

Champion and challenger are compared on the studies both predicted: a paired stratified bootstrap
of the differences (challenger - champion) in AUROC, sensitivity and specificity, and DeLong's test
for the AUROC difference, overall and per segment. A segment where the challenger's AUROC is
significantly lower (one-sided DeLong, Holm-corrected over the segments judged) is marked
``worse``.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import norm, rankdata

from shiftguard.errors import ShadowInputError
from shiftguard.evaluation.segments import MISSING, SEGMENT_METRICS, age_bands, segment_table
from shiftguard.metrics import (
    as_generator,
    auroc_batched,
    percentile_interval,
    resample_indices,
    sens_spec_batched,
)
from shiftguard.shadow.diagnoses import DiagnosisBook

SEGMENTS = ("sex", "age_band", "site", "manufacturer", "scanner_model")
OVERALL = ("overall", "all")
#: the validation stage's names for the shadow log's segment columns
VALIDATION_ALIASES = {"patient_sex": "sex", "vendor": "manufacturer", "model": "scanner_model"}


def _rows_where(segments: pd.DataFrame, column: str) -> pd.DataFrame:
    """The rows of a segment table whose boolean ``column`` is true (an empty table as it is)."""
    if segments.empty:
        return segments
    return segments[segments[column]]


@dataclass
class ShadowEvaluation:
    """One role's evaluation."""

    role: str
    bundle: str
    threshold: float
    model: str
    model_version: str
    n_predictions: int  # studies the role predicted
    n_pending: int  # ...whose verified diagnosis has not arrived yet
    joined: pd.DataFrame
    segments: pd.DataFrame  # first row: overall

    @property
    def flagged(self) -> pd.DataFrame:
        return _rows_where(self.segments, "flagged")

    @property
    def overall(self) -> dict[str, Any]:
        if self.segments.empty:
            return {}
        return self.segments.iloc[0].to_dict()


@dataclass
class PairedComparison:
    """Challenger versus champion on the studies both predicted and a verdict exists for."""

    champion: str
    challenger: str
    n: int
    overall: pd.DataFrame  # one row per metric
    segments: pd.DataFrame  # one row per (column, segment)

    def lower_bound(self, metric: str) -> float:
        row = self.overall[self.overall["metric"] == metric]
        return float(row["diff_low"].iloc[0]) if len(row) else math.nan

    @property
    def worse(self) -> pd.DataFrame:
        return _rows_where(self.segments, "worse")


@dataclass
class ShadowResult:
    """Everything ``shiftguard shadow evaluate`` reports."""

    evaluations: dict[str, ShadowEvaluation]
    paired: PairedComparison | None
    disagreements: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return summary(self)


def join(predictions: pd.DataFrame, book: DiagnosisBook) -> tuple[pd.DataFrame, int]:
    """Predictions with a ``finding`` column from the verdicts, and how many are still pending.

    Raises:
        ShadowInputError: ``predictions`` lacks ``study_uid`` or ``probability``.
    """
    missing = [c for c in ("study_uid", "probability") if c not in predictions]
    if missing:
        raise ShadowInputError(f"shadow log: lacks the column(s) {', '.join(missing)}")
    verdicts = book.verdicts()
    finding = predictions["study_uid"].map(verdicts)
    pending = int(finding.isna().sum())
    joined = predictions[finding.notna()].assign(finding=finding[finding.notna()].astype(int))
    return joined.reset_index(drop=True), pending


def evaluate(
    predictions: pd.DataFrame,
    book: DiagnosisBook,
    threshold: float | Mapping[str, float] | None = None,
    by: Sequence[str] = SEGMENTS,
    validation: pd.DataFrame | Mapping[str, pd.DataFrame] | None = None,
    min_n: int = 20,
    min_positive: int = 5,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, ShadowEvaluation]:
    """Each role's :class:`ShadowEvaluation` (``role`` column; ``champion`` when absent).

    Args:
        predictions: the shadow log, one row per (role, study) (:func:`~shiftguard.shadow.log.
            read_shadow_log`).
        book: the verified diagnoses received so far.
        threshold: the operating point, per role or for all; ``None``: the log's ``threshold``.
        by: segmenting columns (those absent from the log are skipped).
        validation: the validate stage's segment table (``column, segment, auroc, sensitivity,
            specificity``), or one per role, for the gap to validation and the flags against it.
            Its age bands are applied to the log's ``patient_age`` so that the segments match.
    """
    frame = predictions if "role" in predictions else predictions.assign(role="champion")
    tables = _validation_tables(validation, frame["role"].unique())
    frame = _apply_age_bands(frame, next((t for t in tables.values() if t is not None), None))
    out = {}
    for role, rows in frame.groupby("role", sort=True):
        role = str(role)
        role_validation = tables.get(role)
        cut = _threshold(threshold, role, rows)
        joined, pending = join(rows, book)
        columns = [c for c in by if c in joined]
        table = pd.DataFrame()
        if len(joined) and joined["finding"].nunique() == 2:
            # point values, counts and judgeability; the CIs come from _flag's resamples
            table = segment_table(
                joined.assign(overall="all"), ["overall", *columns], score_col="probability",
                label_col="finding", threshold=cut, min_n=min_n, min_positive=min_positive,
                n_boot=1, seed=seed, alpha=alpha,
            )  # fmt: skip
            table = _flag(table, joined, cut, role_validation, n_boot, seed, alpha)
        first = rows.iloc[0]
        bundle = str(first.get("bundle", role))
        model, version = str(first.get("model", "")), str(first.get("model_version", ""))
        out[role] = ShadowEvaluation(
            role, bundle, cut, model, version, len(rows), pending, joined, table
        )
    return out


def _threshold(
    threshold: float | Mapping[str, float] | None, role: str, rows: pd.DataFrame
) -> float:
    if isinstance(threshold, Mapping):
        return float(threshold[role])
    if threshold is not None:
        return float(threshold)
    values = pd.to_numeric(rows.get("threshold"), errors="coerce").dropna().unique()
    if len(values) != 1:
        raise ShadowInputError(
            f"shadow log: role {role} has {len(values)} different thresholds "
            f"({', '.join(map(str, values[:3]))}); give the threshold to judge at"
        )
    return float(values[0])


def _validation_tables(
    validation: pd.DataFrame | Mapping[str, pd.DataFrame] | None, roles: Sequence[str]
) -> dict[str, pd.DataFrame | None]:
    """Each role's validation table (one table given: the same for every role)."""
    if validation is None or isinstance(validation, pd.DataFrame):
        return {str(r): _normalise_validation(validation) for r in roles}
    return {str(r): _normalise_validation(validation.get(str(r))) for r in roles}


def _normalise_validation(validation: pd.DataFrame | None) -> pd.DataFrame | None:
    if validation is None or validation.empty:
        return None
    return validation.assign(column=validation["column"].replace(VALIDATION_ALIASES))


def band_edges(labels: Sequence[str]) -> list[int] | None:
    """Band edges from labels such as ``0-39, 40-59, 60-74, 75+``; ``None`` when they are not
    contiguous bands of that form.

    >>> band_edges(["40-59", "0-39", "75+", "60-74"])
    [0, 40, 60, 75, 200]
    """
    bands = []
    for label in labels:
        closed, open_ = re.fullmatch(r"(\d+)-(\d+)", label), re.fullmatch(r"(\d+)\+", label)
        if closed:
            bands.append((int(closed[1]), int(closed[2]) + 1))
        elif open_:
            bands.append((int(open_[1]), 200))
        else:
            return None
    bands.sort()
    if not bands or any(a[1] != b[0] for a, b in itertools.pairwise(bands)):
        return None
    return [b[0] for b in bands] + [bands[-1][1]]


def _apply_age_bands(frame: pd.DataFrame, validation: pd.DataFrame | None) -> pd.DataFrame:
    """The log's age bands recut to the validation stage's, where ages are known."""
    if validation is None or "patient_age" not in frame:
        return frame
    labels = validation.loc[validation["column"] == "age_band", "segment"]
    edges = band_edges([str(s) for s in labels if s != "missing"])
    ages = pd.to_numeric(frame["patient_age"], errors="coerce")
    if edges is None or ages.isna().all():
        return frame
    inside = ages.between(edges[0], edges[-1], inclusive="left")
    banded = pd.Series(age_bands(ages.where(inside), edges), index=frame.index).astype(object)
    return frame.assign(age_band=banded.where(inside, "unknown"))


def _flag(
    table: pd.DataFrame,
    joined: pd.DataFrame,
    threshold: float,
    validation: pd.DataFrame | None,
    n_boot: int,
    seed: int,
    alpha: float,
) -> pd.DataFrame:
    """The CIs of the judgeable segments, and flags on those significantly below the overall
    figure or their validation figure.

    One set of stratified resamples per segment gives both its percentile CIs (the same as
    :func:`segment_table` draws with the same seed) and the standard errors of the tests. Each
    judgeable (segment, metric, reference) is a one-sided Wald test; the tests of one role are
    Holm-corrected together, so that a model fine everywhere is not flagged by the sheer number
    of segments looked at.
    """
    table = table.copy()
    overall = {m: float(table.iloc[0][m]) for m in SEGMENT_METRICS}
    y_all = joined["finding"].to_numpy().astype(bool)
    s_all = joined["probability"].to_numpy(dtype=float)
    tests: list[tuple[Any, str, str, float, float]] = []  # index, metric, reference, value, p
    for index, row in table.iterrows():
        is_overall = (row["column"], row["segment"]) == OVERALL
        refs = {}
        for m in SEGMENT_METRICS:
            val = _validation_value(validation, row["column"], row["segment"], m)
            table.loc[index, f"{m}_validation"] = math.nan if val is None else val
            table.loc[index, f"{m}_validation_gap"] = (
                math.nan if val is None or not row["judgeable"] else row[m] - val
            )
            refs[m] = ([] if is_overall else [("overall", overall[m])]) + (
                [] if val is None else [("validation", val)]
            )
        if not row["judgeable"]:
            continue
        if is_overall:
            pos = np.arange(y_all.size)
        else:
            keys = (
                joined[row["column"]].astype(object).where(joined[row["column"]].notna(), MISSING)
            )
            pos = np.flatnonzero(keys.astype(str).to_numpy() == row["segment"])
        y, s = y_all[pos], s_all[pos]
        idx = resample_indices(y, n_boot, as_generator(seed), stratified=True)
        sens_b, spec_b = sens_spec_batched(y[idx], s[idx], threshold)
        boot = {"auroc": auroc_batched(y[idx], s[idx]), "sensitivity": sens_b,
                "specificity": spec_b}  # fmt: skip
        for m in SEGMENT_METRICS:
            table.loc[index, [f"{m}_low", f"{m}_high"]] = percentile_interval(boot[m], alpha)
            finite = boot[m][np.isfinite(boot[m])]
            se = float(finite.std(ddof=1)) if finite.size > 1 else math.nan
            for name, ref in refs[m]:
                gap = float(row[m]) - ref
                # with no spread at all, below is certain and at or above is not
                p = float(norm.cdf(gap / se)) if se > 0 else (0.0 if gap < 0 else 1.0)
                tests.append((index, m, name, ref, p))
    rejected = _holm(pd.Series([t[4] for t in tests], dtype=float), alpha)
    reasons: dict[Any, list[str]] = {}
    for (index, m, name, ref, p), reject in zip(tests, rejected, strict=True):
        if reject:
            reasons.setdefault(index, []).append(
                f"{m} {table.loc[index, m]:.3f} below {name} {ref:.3f} (p={p:.2g})"
            )
    table["flag_reason"] = ["; ".join(reasons.get(i, [])) for i in table.index]
    table["flagged"] = [bool(reasons.get(i)) for i in table.index]
    table["n_tests"] = len(tests)
    return table


def _validation_value(
    validation: pd.DataFrame | None, column: str, segment: str, metric: str
) -> float | None:
    if validation is None or metric not in validation:
        return None
    match = validation[(validation["column"] == column) & (validation["segment"] == segment)]
    if match.empty or pd.isna(match[metric].iloc[0]):
        return None
    if "judgeable" in match and not bool(match["judgeable"].iloc[0]):
        return None  # too small at validation: no figure to hold the segment to
    return float(match[metric].iloc[0])


# ------------------------------------------------------------------------------------------------
# champion versus challenger
# ------------------------------------------------------------------------------------------------


def delong(y: np.ndarray, champion: np.ndarray, challenger: np.ndarray) -> tuple[float, float]:
    """DeLong's test for two correlated AUROCs: the difference challenger - champion and its
    standard error (Sun and Xu's O(N log N) algorithm). ``(nan, nan)`` with one class only."""
    aucs, cov = delong_covariance(y, champion, challenger)
    if np.isnan(aucs).all():  # one class only
        return math.nan, math.nan
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    return float(aucs[1] - aucs[0]), float(math.sqrt(max(var, 0.0)))


def delong_covariance(
    y: np.ndarray, first: np.ndarray, second: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Two models' AUROCs on the same cases and DeLong's ``(2, 2)`` covariance matrix of the two
    estimates (Sun and Xu's O(N log N) structural components); all NaN with fewer than two cases of
    either class."""
    y = np.asarray(y).astype(bool)
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        return np.full(2, math.nan), np.full((2, 2), math.nan)
    v10, v01, aucs = [], [], []
    for s in (np.asarray(first, float), np.asarray(second, float)):
        x, z = s[y], s[~y]
        tz = rankdata(np.concatenate([x, z]))
        tx, ty = rankdata(x), rankdata(z)
        aucs.append((tz[:m].sum() - m * (m + 1) / 2) / (m * n))
        v10.append((tz[:m] - tx) / n)
        v01.append(1.0 - (tz[m:] - ty) / m)
    s10, s01 = np.cov(np.vstack(v10)), np.cov(np.vstack(v01))
    return np.asarray(aucs), s10 / m + s01 / n


def _paired_boot(
    y: np.ndarray,
    s1: np.ndarray,
    s2: np.ndarray,
    t1: float,
    t2: float,
    n_boot: int,
    seed: int,
    alpha: float,
) -> list[dict[str, Any]]:
    idx = resample_indices(y, n_boot, as_generator(seed), stratified=True)
    yb = y[idx]
    points, boots = {}, {}
    for name, (s, t) in {"champion": (s1, t1), "challenger": (s2, t2)}.items():
        sens, spec = sens_spec_batched(y, s, t)
        points[name] = {"auroc": float(auroc_batched(y, s)), "sensitivity": float(sens),
                        "specificity": float(spec)}  # fmt: skip
        sens_b, spec_b = sens_spec_batched(yb, s[idx], t)
        boots[name] = {"auroc": auroc_batched(yb, s[idx]), "sensitivity": sens_b,
                       "specificity": spec_b}  # fmt: skip
    rows = []
    for m in SEGMENT_METRICS:
        diffs = boots["challenger"][m] - boots["champion"][m]
        low, high = percentile_interval(diffs, alpha)
        finite = diffs[np.isfinite(diffs)]
        below = float((finite <= 0).mean()) if finite.size else math.nan
        above = float((finite >= 0).mean()) if finite.size else math.nan
        rows.append(
            {
                "metric": m,
                "champion": points["champion"][m],
                "challenger": points["challenger"][m],
                "diff": points["challenger"][m] - points["champion"][m],
                "diff_low": low,
                "diff_high": high,
                "p_boot": min(1.0, 2 * min(below, above)) if finite.size else math.nan,
            }
        )
    return rows


def compare(
    predictions: pd.DataFrame,
    book: DiagnosisBook,
    thresholds: Mapping[str, float],
    by: Sequence[str] = SEGMENTS,
    min_n: int = 20,
    min_positive: int = 5,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    champion: str = "champion",
    challenger: str = "challenger",
) -> PairedComparison | None:
    """The challenger against the champion on the studies both predicted (``None`` when the log
    holds only one of them, or fewer than two studies of each class are shared)."""
    roles = set(predictions.get("role", pd.Series(dtype=str)))
    if not {champion, challenger} <= roles:
        return None
    a = predictions[predictions["role"] == champion].set_index("study_uid")
    b = predictions[predictions["role"] == challenger].set_index("study_uid")
    shared = a.index.intersection(b.index)
    joined, _ = join(a.loc[shared].reset_index(), book)
    if joined.empty or joined["finding"].nunique() < 2:
        return None
    s2 = b.loc[joined["study_uid"], "probability"].to_numpy(float)
    y = joined["finding"].to_numpy().astype(bool)
    s1 = joined["probability"].to_numpy(float)
    t1, t2 = float(thresholds[champion]), float(thresholds[challenger])

    overall = pd.DataFrame(_paired_boot(y, s1, s2, t1, t2, n_boot, seed, alpha))
    diff, se = delong(y, s1, s2)
    z = diff / se if se > 0 else math.nan
    overall["delong_z"] = [z if m == "auroc" else math.nan for m in overall["metric"]]
    overall["delong_p"] = [
        2 * norm.sf(abs(z)) if m == "auroc" and np.isfinite(z) else math.nan
        for m in overall["metric"]
    ]

    rows = []
    for column in [c for c in by if c in joined]:
        for value, pos in joined.groupby(column, sort=True, observed=True).indices.items():
            yy, n_pos = y[pos], int(y[pos].sum())
            judgeable = len(pos) >= min_n and min(n_pos, len(pos) - n_pos) >= min_positive
            row: dict[str, Any] = {"column": column, "segment": str(value), "n": len(pos),
                                   "n_positive": n_pos, "judgeable": judgeable}  # fmt: skip
            if judgeable:
                for r in _paired_boot(yy, s1[pos], s2[pos], t1, t2, n_boot, seed, alpha):
                    for key in ("champion", "challenger", "diff", "diff_low", "diff_high"):
                        row[f"{r['metric']}_{key}"] = r[key]
                d, e = delong(yy, s1[pos], s2[pos])
                row["delong_p_lower"] = float(norm.cdf(d / e)) if e > 0 else math.nan
            rows.append(row)
    segments = pd.DataFrame(rows)
    if not segments.empty:
        segments["worse"] = _holm(segments.get("delong_p_lower"), alpha)
    return PairedComparison(
        str(a["bundle"].iloc[0]) if "bundle" in a else champion,
        str(b["bundle"].iloc[0]) if "bundle" in b else challenger,
        len(joined),
        overall,
        segments,
    )


def _holm(p: pd.Series | None, alpha: float) -> list[bool]:
    """Holm's step-down rejections of the p-values ``p`` (NaN: not tested)."""
    if p is None:
        return []
    values = p.to_numpy(dtype=float)
    tested = np.flatnonzero(np.isfinite(values))
    reject = np.zeros(values.size, dtype=bool)
    for rank, i in enumerate(tested[np.argsort(values[tested], kind="stable")]):
        if values[i] > alpha / (tested.size - rank):
            break
        reject[i] = True
    return reject.tolist()


# ------------------------------------------------------------------------------------------------
# the whole evaluation
# ------------------------------------------------------------------------------------------------


def run(
    predictions: pd.DataFrame,
    book: DiagnosisBook,
    by: Sequence[str] = SEGMENTS,
    validation: pd.DataFrame | Mapping[str, pd.DataFrame] | None = None,
    threshold: float | Mapping[str, float] | None = None,
    min_n: int = 20,
    min_positive: int = 5,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> ShadowResult:
    """:func:`evaluate` every role and :func:`compare` challenger with champion."""
    evaluations = evaluate(
        predictions, book, threshold, by, validation, min_n, min_positive, n_boot, seed, alpha
    )
    tables = _validation_tables(
        validation, predictions.get("role", pd.Series(["champion"])).unique()
    )
    frame = _apply_age_bands(predictions, next((t for t in tables.values() if t is not None), None))
    paired = compare(
        frame, book, {r: e.threshold for r, e in evaluations.items()}, by, min_n, min_positive,
        n_boot, seed, alpha,
    )  # fmt: skip
    return ShadowResult(evaluations, paired, book.disagreements(), [str(p) for p in book.problems])


def jsonable(value: Any) -> Any:
    """A number as JSON takes it: NaN and infinities become None, numpy scalars Python ones."""
    if isinstance(value, float | np.floating):
        return None if not np.isfinite(value) else round(float(value), 6)
    if isinstance(value, np.integer | np.bool_):
        return value.item()
    return value


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: jsonable(v) for k, v in row.items()} for row in frame.to_dict("records")]


def summary(result: ShadowResult | Mapping[str, ShadowEvaluation]) -> dict[str, Any]:
    """JSON-ready figures: per role counts, overall, flagged segments; the paired comparison."""
    evaluations = result.evaluations if isinstance(result, ShadowResult) else result
    roles = {}
    for role, e in evaluations.items():
        flagged = e.flagged
        roles[role] = {
            "bundle": e.bundle,
            "model": e.model,
            "model_version": e.model_version,
            "threshold": e.threshold,
            "predictions": e.n_predictions,
            "pending": e.n_pending,
            "judged": len(e.joined),
            "positive": int(e.joined["finding"].sum()) if len(e.joined) else 0,
            "overall": {
                k: jsonable(v) for k, v in e.overall.items() if k not in ("column", "segment")
            },
            "flagged": _records(flagged[["column", "segment", "flag_reason"]])
            if len(flagged)
            else [],
            "too_small": int((~e.segments["judgeable"]).sum()) if len(e.segments) else 0,
        }
    out: dict[str, Any] = {"roles": roles}
    if isinstance(result, ShadowResult):
        p = result.paired
        out["paired"] = None
        if p is not None:
            out["paired"] = {
                "champion": p.champion,
                "challenger": p.challenger,
                "n": p.n,
                "overall": _records(p.overall),
                "worse_segments": _records(p.worse[["column", "segment", "n"]])
                if len(p.worse)
                else [],
            }
        out["disagreements"] = len(result.disagreements)
        out["diagnosis_problems"] = result.problems[:100]
    return out
