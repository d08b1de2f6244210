"""Per-segment performance: how the classifier fares by sex, age band, site, scanner vendor/model.

:func:`segment_table` gives one row per value of each segmenting column, with AUROC, sensitivity
and specificity (percentile-bootstrap CIs) and the gap to the overall figure. A segment that is too
small, or holds one class only, is kept in the table but marked ``judgeable=False`` with the
reason; it gets point values where they are defined but no intervals and no gaps, so that nobody
reads noise as a shift.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from shiftguard.errors import MetricInputError
from shiftguard.metrics import (
    as_generator,
    auroc_batched,
    check_bootstrap,
    check_labels_scores,
    percentile_interval,
    resample_indices,
    sens_spec_batched,
)

__all__ = ["MISSING", "SEGMENT_METRICS", "age_bands", "segment_table", "unjudgeable_reason"]

SEGMENT_METRICS = ("auroc", "sensitivity", "specificity")
MISSING = "missing"
"""Segment label of rows whose segmenting column is empty (NaN/None)."""


def age_bands(ages: ArrayLike, edges: Sequence[int] = (0, 40, 60, 75, 200)) -> pd.Categorical:
    """Age bands ``[edges[i], edges[i+1])`` labelled ``"lo-hi"`` with ``hi = edges[i+1] - 1``.

    Args:
        ages: Ages in years, shape ``(N,)``; NaN stays NaN (a missing band).
        edges: Strictly increasing integer band edges.

    Returns:
        An ordered ``pandas.Categorical`` of shape ``(N,)`` whose categories are all bands in order.

    Raises:
        MetricInputError: Edges are not increasing integers, or an age lies outside them.

    >>> list(age_bands([12, 40, 59.5, 75, 90]))
    ['0-39', '40-59', '40-59', '75+', '75+']
    """
    e = [int(x) for x in edges]
    if len(e) < 2 or any(b <= a for a, b in itertools.pairwise(e)) or e != list(edges):
        raise MetricInputError(
            f"age band edges {tuple(edges)!r} must be at least two strictly increasing integers, "
            f"e.g. (0, 40, 60, 75, 200)"
        )
    a = np.asarray(ages, dtype=np.float64).ravel()
    known = ~np.isnan(a)
    outside = known & ((a < e[0]) | (a >= e[-1]))
    if outside.any():
        raise MetricInputError(
            f"{int(outside.sum())} age(s) lie outside the band edges [{e[0]}, {e[-1]}), e.g. "
            f"{a[outside][0]:g}; widen the edges or fix the ages"
        )
    labels = [f"{lo}-{hi - 1}" for lo, hi in itertools.pairwise(e)]
    labels[-1] = f"{e[-2]}+"  # the open-ended top band reads "75+", not "75-199"
    codes = np.full(a.shape, -1, dtype=np.int64)
    codes[known] = np.searchsorted(np.asarray(e[1:-1]), a[known], side="right")
    return pd.Categorical.from_codes(codes, categories=labels, ordered=True)


def _overall_value(overall: Mapping[str, object], name: str) -> float:
    """``overall[name]`` as a float, from a plain number or a ``{"value": ...}`` entry."""
    entry = overall.get(name, math.nan)
    if isinstance(entry, Mapping):
        entry = entry.get("value", math.nan)
    try:
        return float(entry)  # type: ignore[arg-type]
    except (TypeError, ValueError) as err:
        raise MetricInputError(
            f"overall[{name!r}] is {entry!r}; pass a number or binary_report's "
            f"{{'value': ...}} entry"
        ) from err


def unjudgeable_reason(
    n: int, n_pos: int, n_neg: int, min_n: int, min_pos: int, min_neg: int
) -> str:
    """Why a set of cases is too small to judge, or the empty string when it can be judged.

    The rule of :func:`segment_table`, shared by every caller that flags small sets (the validate
    stage's per-scanner figures use it too).

    Args:
        n: Cases in the set.
        n_pos: Positives among them.
        n_neg: Negatives among them.
        min_n: Fewest cases for a judgeable set.
        min_pos: Fewest positives for a judgeable set.
        min_neg: Fewest negatives for a judgeable set.

    Returns:
        ``""`` when judgeable, else the reason, e.g. ``"one class only (0 positive, 4 negative)"``.

    >>> unjudgeable_reason(8, 3, 5, min_n=10, min_pos=3, min_neg=3)
    'n=8 < min_n=10'
    >>> unjudgeable_reason(20, 5, 15, min_n=10, min_pos=3, min_neg=3)
    ''
    """
    if n_pos == 0 or n_neg == 0:
        return f"one class only ({n_pos} positive, {n_neg} negative)"
    reasons = []
    if n < min_n:
        reasons.append(f"n={n} < min_n={min_n}")
    if n_pos < min_pos:
        reasons.append(f"{n_pos} positive < min_positive={min_pos}")
    if n_neg < min_neg:
        reasons.append(f"{n_neg} negative < min_negative={min_neg}")
    return "; ".join(reasons)


def segment_table(
    frame: pd.DataFrame,
    by: Sequence[str],
    score_col: str = "score",
    label_col: str = "label",
    threshold: float = 0.5,
    overall: Mapping[str, object] | None = None,
    min_n: int = 20,
    min_positive: int = 5,
    min_negative: int | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Performance per segment, for each segmenting column in ``by``.

    Args:
        frame: One row per case, with ``score_col``, ``label_col`` (0/1) and the ``by`` columns.
        by: Segmenting columns, e.g. ``["sex", "age_band", "site", "vendor", "model"]``.
        score_col: Column of predicted scores.
        label_col: Column of 0/1 labels.
        threshold: Operating point chosen on the validation set.
        overall: The overall figures to measure gaps against: :func:`binary_report`'s dict, or
            ``{"auroc": float, ...}``. ``None``: the point values on the whole ``frame``.
        min_n: Fewest cases for a judgeable segment.
        min_positive: Fewest positives for a judgeable segment.
        min_negative: Fewest negatives for a judgeable segment; defaults to ``min_positive``.
        n_boot: Bootstrap resamples per judgeable segment (stratified by class).
        seed: Seed of the resampling; the same seed gives the same table.
        alpha: ``1 - alpha`` is the coverage of the intervals.

    Returns:
        A frame with one row per (column, segment value), in the order of ``by`` and then the
        sorted (or categorical) order of the values, with columns ``column, segment, n,
        n_positive, n_negative, judgeable, reason`` and, for each of ``auroc, sensitivity,
        specificity``: ``<m>, <m>_low, <m>_high, <m>_gap`` (gap = segment - overall; nan when
        not judgeable). Empty segment values are labelled ``"missing"``.

    Raises:
        MetricInputError: A named column is missing, or labels/scores are malformed.
    """
    missing = [c for c in [score_col, label_col, *by] if c not in frame.columns]
    if missing:
        raise MetricInputError(
            f"segment_table: column(s) {missing} not in the frame (it has {list(frame.columns)}); "
            f"pass the names of the score, label and segmenting columns"
        )
    check_bootstrap(n_boot, alpha)
    min_neg = min_positive if min_negative is None else min_negative
    y_all, s_all = check_labels_scores(frame[label_col].to_numpy(), frame[score_col].to_numpy())
    if overall is None:
        sens, spec = sens_spec_batched(y_all, s_all, threshold)
        overall = {
            "auroc": float(auroc_batched(y_all, s_all)),
            "sensitivity": float(sens),
            "specificity": float(spec),
        }
    reference = {m: _overall_value(overall, m) for m in SEGMENT_METRICS}

    rows: list[dict[str, object]] = []
    for column in by:
        keys = frame[column]
        for value, positions in keys.groupby(
            keys, sort=True, observed=True, dropna=False
        ).indices.items():
            pos = np.asarray(positions)
            y, s = y_all[pos], s_all[pos]
            n, n_pos = int(y.size), int(y.sum())
            reason = unjudgeable_reason(n, n_pos, n - n_pos, min_n, min_positive, min_neg)
            label = MISSING if pd.isna(value) else str(value)
            row: dict[str, object] = {
                "column": column,
                "segment": label,
                "n": n,
                "n_positive": n_pos,
                "n_negative": n - n_pos,
                "judgeable": not reason,
                "reason": reason,
            }
            sens, spec = sens_spec_batched(y, s, threshold)
            points = {
                "auroc": float(auroc_batched(y, s)),
                "sensitivity": float(sens),
                "specificity": float(spec),
            }
            if reason:
                boot = {m: (math.nan, math.nan) for m in SEGMENT_METRICS}
            else:
                idx = resample_indices(y, n_boot, as_generator(seed), stratified=True)
                sens_b, spec_b = sens_spec_batched(y[idx], s[idx], threshold)
                boot = {
                    "auroc": percentile_interval(auroc_batched(y[idx], s[idx]), alpha),
                    "sensitivity": percentile_interval(sens_b, alpha),
                    "specificity": percentile_interval(spec_b, alpha),
                }
            for m in SEGMENT_METRICS:
                row[m] = points[m]
                row[f"{m}_low"], row[f"{m}_high"] = boot[m]
                row[f"{m}_gap"] = math.nan if reason else points[m] - reference[m]
            rows.append(row)
    columns = ["column", "segment", "n", "n_positive", "n_negative", "judgeable", "reason"]
    columns += [f"{m}{suffix}" for m in SEGMENT_METRICS for suffix in ("", "_low", "_high", "_gap")]
    return pd.DataFrame(rows, columns=columns)
