"""Metrics of a binary classifier (finding yes/no): AUROC, ROC, operating points, calibration, CIs.

numpy/scipy only, so the same code runs in the lab and on the edge box. Conventions:

* ``y_true`` is a 1-D array of 0/1 (or bool) labels, shape ``(N,)``; 1 means "finding present".
* ``y_score`` is a 1-D array of finite scores, shape ``(N,)``; higher means "more likely positive".
  Calibration metrics additionally need probabilities in ``[0, 1]`` (``y_prob``).
* A case is predicted positive when ``y_score >= threshold``.
* Low-level metrics that are undefined on the data (AUROC with one class, sensitivity without
  positives) return ``nan`` instead of raising; callers such as
  :func:`shiftguard.evaluation.segments.segment_table` mark such segments "too small to judge".
  Malformed inputs (wrong shape, non-binary labels, non-finite scores) raise
  :class:`MetricInputError`.
* The operating point (:func:`choose_threshold`) is chosen on the VALIDATION set and then applied,
  unchanged, to the test and external sets; choosing it on the test set would bias the test figures.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import NamedTuple, TypeGuard

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import rankdata

from shiftguard.errors import MetricInputError

__all__ = [
    "MetricInputError",
    "ReliabilityCurve",
    "auroc",
    "binary_report",
    "bootstrap_ci",
    "choose_threshold",
    "expected_calibration_error",
    "format_interval",
    "reliability_curve",
    "roc_curve",
    "sensitivity_specificity",
]

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]
MetricFn = Callable[[NDArray[np.bool_], NDArray[np.float64]], float]

_RULE = re.compile(r"^(sensitivity|specificity)@(0(?:\.\d+)?|1(?:\.0*)?)$")


# --------------------------------------------------------------------------------------------------
# input checks


def check_labels_scores(
    y_true: ArrayLike, y_score: ArrayLike, score_name: str = "y_score"
) -> tuple[BoolArray, FloatArray]:
    """Validate and convert labels ``(N,)`` to bool and scores ``(N,)`` to float64."""
    y = np.asarray(y_true)
    s = np.asarray(y_score, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise MetricInputError(
            f"y_true has shape {y.shape} and {score_name} has shape {s.shape}; both must be 1-D "
            f"arrays of shape (N,): flatten them, one entry per case"
        )
    if y.shape != s.shape:
        raise MetricInputError(
            f"y_true has {y.size} entries but {score_name} has {s.size}; pass one label and one "
            f"score per case"
        )
    if y.dtype != np.bool_:
        if y.size and not np.isin(y, (0, 1)).all():
            bad = np.unique(y[~np.isin(y, (0, 1))])[:5]
            raise MetricInputError(
                f"y_true must hold only 0/1 labels, found {bad.tolist()}; encode 'finding present' "
                f"as 1 and 'absent' as 0"
            )
        y = y.astype(np.bool_)
    if not np.isfinite(s).all():
        n_bad = int((~np.isfinite(s)).sum())
        raise MetricInputError(
            f"{score_name} holds {n_bad} non-finite value(s) (nan or inf); drop those cases or fix "
            f"the model output before evaluating"
        )
    return y, s


def _check_prob(y_prob: FloatArray) -> None:
    if y_prob.size and (y_prob.min() < 0.0 or y_prob.max() > 1.0):
        raise MetricInputError(
            f"y_prob must be probabilities in [0, 1], found values in "
            f"[{y_prob.min():.4g}, {y_prob.max():.4g}]; apply the sigmoid/softmax before "
            f"computing calibration"
        )


# --------------------------------------------------------------------------------------------------
# ranking metrics


def auroc_batched(y: BoolArray, s: FloatArray) -> FloatArray:
    """AUROC of each row: labels and scores of shape ``(B, N)`` -> ``(B,)``; nan for one-class rows."""
    ranks = rankdata(s, axis=-1)  # average ranks: a tie earns half credit
    n_pos = y.sum(axis=-1).astype(np.float64)
    n_neg = y.shape[-1] - n_pos
    rank_sum = np.where(y, ranks, 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1.0) / 2.0) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def auroc(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """Area under the ROC curve, as the Mann–Whitney probability P(score+ > score-).

    A positive/negative pair with equal scores counts 1/2. Computed from average ranks in
    O(N log N).

    Args:
        y_true: Labels, shape ``(N,)``, 0/1 or bool.
        y_score: Scores, shape ``(N,)``; higher means more likely positive.

    Returns:
        The AUROC in ``[0, 1]``, or ``nan`` when only one class is present (undefined; callers
        flag such a set as too small to judge rather than fail).

    Raises:
        MetricInputError: Shapes differ, labels are not 0/1, or scores are not finite.

    >>> auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    >>> auroc([0, 1], [0.5, 0.5])
    0.5
    >>> auroc([1, 1], [0.2, 0.9])
    nan
    """
    y, s = check_labels_scores(y_true, y_score)
    return float(auroc_batched(y, s))


def roc_curve(y_true: ArrayLike, y_score: ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray]:
    """The full ROC curve, one point per distinct score (no points dropped).

    Args:
        y_true: Labels, shape ``(N,)``; both classes must be present.
        y_score: Scores, shape ``(N,)``.

    Returns:
        ``(fpr, tpr, thresholds)``, each of shape ``(K + 1,)`` for ``K`` distinct scores.
        ``thresholds`` decrease; ``thresholds[0] = inf`` gives the point ``(0, 0)``. Point ``k``
        is the rate of ``y_score >= thresholds[k]`` among negatives (fpr) and positives (tpr).

    Raises:
        MetricInputError: Only one class is present (the curve is undefined), or bad inputs.

    >>> fpr, tpr, thr = roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    >>> fpr.tolist(), tpr.tolist()
    ([0.0, 0.0, 0.5, 0.5, 1.0], [0.0, 0.5, 0.5, 1.0, 1.0])
    """
    y, s = check_labels_scores(y_true, y_score)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise MetricInputError(
            f"roc_curve needs both classes, y_true has {n_pos} positive(s) and {n_neg} "
            f"negative(s); evaluate on a set that contains both"
        )
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    y_sorted = y[order]
    # last index of each run of equal scores
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]
    tps = np.cumsum(y_sorted)[last].astype(np.float64)
    fps = (last + 1) - tps
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    thresholds = np.r_[np.inf, s_sorted[last]]
    return fpr, tpr, thresholds


def choose_threshold(y_true: ArrayLike, y_score: ArrayLike, rule: str = "youden") -> float:
    """Choose an operating point on the VALIDATION set, to be applied unchanged to test sets.

    Rules:

    * ``"youden"``: maximise sensitivity + specificity - 1; ties go to the highest threshold.
    * ``"sensitivity@T"`` (e.g. ``"sensitivity@0.9"``): the highest threshold whose sensitivity
      is at least ``T``, i.e. the most specific point that still finds ``T`` of the findings.
    * ``"specificity@T"``: the lowest threshold whose specificity is at least ``T``.

    The returned threshold is one of the observed scores; a case is positive when
    ``score >= threshold``.

    Args:
        y_true: Validation labels, shape ``(N,)``; both classes must be present.
        y_score: Validation scores, shape ``(N,)``.
        rule: One of the rules above.

    Returns:
        The threshold.

    Raises:
        MetricInputError: Unknown rule, unreachable target, one class only, or bad inputs.

    >>> choose_threshold([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.6, 0.5, 0.7, 0.9])
    0.7
    >>> choose_threshold([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.6, 0.5, 0.7, 0.9], "sensitivity@1.0")
    0.5
    """
    fpr, tpr, thresholds = roc_curve(y_true, y_score)
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]  # finite thresholds only
    if rule == "youden":
        youden = tpr - fpr
        best = np.flatnonzero(youden >= youden.max() - 1e-12)  # float ties go to the highest
        return float(thresholds[best[0]])
    match = _RULE.match(rule)
    if match is None:
        raise MetricInputError(
            f"unknown threshold rule {rule!r}; use 'youden', 'sensitivity@T' or 'specificity@T' "
            f"with 0 <= T <= 1, e.g. 'sensitivity@0.9'"
        )
    kind, target = match.group(1), float(match.group(2))
    eps = 1e-12
    if kind == "sensitivity":
        ok = np.flatnonzero(tpr >= target - eps)  # tpr grows as the threshold falls
        return float(thresholds[ok[0]])  # the last point has tpr = 1, so ok is never empty
    ok = np.flatnonzero(1.0 - fpr >= target - eps)  # specificity falls as the threshold falls
    if ok.size == 0:
        raise MetricInputError(
            f"rule {rule!r}: no observed threshold reaches specificity {target} on this set "
            f"(the best is {1.0 - fpr[0]:.3f}); lower the target"
        )
    return float(thresholds[ok[-1]])


def sens_spec_batched(
    y: BoolArray, s: FloatArray, threshold: float
) -> tuple[FloatArray, FloatArray]:
    """Sensitivity and specificity of each row of ``(B, N)`` arrays -> two ``(B,)`` arrays."""
    pred = s >= threshold
    n_pos = y.sum(axis=-1)
    n_neg = y.shape[-1] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = (pred & y).sum(axis=-1) / n_pos
        spec = (~pred & ~y).sum(axis=-1) / n_neg
    return np.where(n_pos > 0, sens, np.nan), np.where(n_neg > 0, spec, np.nan)


def sensitivity_specificity(
    y_true: ArrayLike, y_score: ArrayLike, threshold: float
) -> tuple[float, float]:
    """Sensitivity (TP / positives) and specificity (TN / negatives) at ``score >= threshold``.

    Args:
        y_true: Labels, shape ``(N,)``.
        y_score: Scores, shape ``(N,)``.
        threshold: The operating point, chosen on the validation set.

    Returns:
        ``(sensitivity, specificity)``; either is ``nan`` when its class is absent.

    >>> sensitivity_specificity([0, 0, 1, 1, 1], [0.2, 0.6, 0.4, 0.5, 0.9], 0.5)
    (0.6666666666666666, 0.5)
    """
    y, s = check_labels_scores(y_true, y_score)
    sens, spec = sens_spec_batched(y, s, float(threshold))
    return float(sens), float(spec)


# --------------------------------------------------------------------------------------------------
# calibration


class ReliabilityCurve(NamedTuple):
    """Per-bin calibration summary; every array has shape ``(n_bins,)`` except ``bin_edges``."""

    mean_predicted: FloatArray
    """Mean predicted probability in each bin (nan for an empty bin)."""
    observed_frequency: FloatArray
    """Fraction of positives in each bin (nan for an empty bin)."""
    counts: NDArray[np.int64]
    """Number of cases in each bin."""
    bin_edges: FloatArray
    """Bin edges, shape ``(n_bins + 1,)``."""


def _bin_index(p: FloatArray, n_bins: int, strategy: str) -> tuple[NDArray[np.intp], FloatArray]:
    if not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise MetricInputError(f"n_bins must be a positive integer, got {n_bins!r}")
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        idx = np.minimum((p * n_bins).astype(np.intp), n_bins - 1)  # 1.0 falls in the last bin
    elif strategy == "quantile":
        if p.size == 0:
            edges = np.linspace(0.0, 1.0, n_bins + 1)
        else:
            edges = np.quantile(p, np.linspace(0.0, 1.0, n_bins + 1))
        idx = np.searchsorted(edges[1:-1], p, side="right").astype(np.intp)
    else:
        raise MetricInputError(
            f"unknown binning strategy {strategy!r}; use 'uniform' (equal-width bins on [0, 1]) "
            f"or 'quantile' (equal-count bins)"
        )
    return idx, edges


def _reliability(y: BoolArray, p: FloatArray, n_bins: int, strategy: str) -> ReliabilityCurve:
    idx, edges = _bin_index(p, n_bins, strategy)
    counts = np.bincount(idx, minlength=n_bins).astype(np.int64)
    sum_p = np.bincount(idx, weights=p, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y.astype(np.float64), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.where(counts > 0, sum_p / counts, np.nan)
        freq = np.where(counts > 0, sum_y / counts, np.nan)
    return ReliabilityCurve(mean_p, freq, counts, edges)


def _ece(y: BoolArray, p: FloatArray, n_bins: int, strategy: str) -> float:
    if p.size == 0:
        return math.nan
    curve = _reliability(y, p, n_bins, strategy)
    used = curve.counts > 0
    gaps = np.abs(curve.mean_predicted[used] - curve.observed_frequency[used])
    return float((curve.counts[used] * gaps).sum() / p.size)


def reliability_curve(
    y_true: ArrayLike, y_prob: ArrayLike, n_bins: int = 10, strategy: str = "uniform"
) -> ReliabilityCurve:
    """Per-bin mean predicted probability, observed frequency of the finding, and counts.

    Args:
        y_true: Labels, shape ``(N,)``.
        y_prob: Predicted probabilities in ``[0, 1]``, shape ``(N,)``.
        n_bins: Number of bins.
        strategy: ``"uniform"``: equal-width bins ``[0, 1/n), ..., [(n-1)/n, 1]``;
            ``"quantile"``: equal-count bins at the quantiles of ``y_prob`` (ties may leave bins
            empty).

    Returns:
        A :class:`ReliabilityCurve`; empty bins have count 0 and nan means.

    >>> c = reliability_curve([0, 1, 1, 1], [0.2, 0.4, 0.7, 0.9], n_bins=2)
    >>> c.mean_predicted.tolist(), c.observed_frequency.tolist(), c.counts.tolist()
    ([0.30000000000000004, 0.8], [0.5, 1.0], [2, 2])
    """
    y, p = check_labels_scores(y_true, y_prob, "y_prob")
    _check_prob(p)
    return _reliability(y, p, n_bins, strategy)


def expected_calibration_error(
    y_true: ArrayLike, y_prob: ArrayLike, n_bins: int = 10, strategy: str = "uniform"
) -> float:
    """Expected calibration error: ``sum_b (n_b / N) * |mean_prob_b - frequency_b|``.

    Args:
        y_true: Labels, shape ``(N,)``.
        y_prob: Predicted probabilities in ``[0, 1]``, shape ``(N,)``.
        n_bins: Number of bins.
        strategy: ``"uniform"`` or ``"quantile"``, as in :func:`reliability_curve`.

    Returns:
        The ECE in ``[0, 1]``; ``nan`` for an empty set.

    >>> round(expected_calibration_error([0, 1, 1, 1], [0.2, 0.4, 0.7, 0.9], n_bins=2), 6)
    0.2
    """
    y, p = check_labels_scores(y_true, y_prob, "y_prob")
    _check_prob(p)
    return _ece(y, p, n_bins, strategy)


# --------------------------------------------------------------------------------------------------
# bootstrap


def resample_indices(
    y: BoolArray, n_boot: int, rng: np.random.Generator, stratified: bool
) -> NDArray[np.intp]:
    """Row ``b`` of the ``(n_boot, N)`` result indexes the ``b``-th bootstrap resample.

    Stratified: each row draws ``n_pos`` cases from the positives and ``n_neg`` from the negatives
    (with replacement), so every resample keeps the class counts of the data.
    """
    n = y.size
    if not stratified:
        return rng.integers(0, n, size=(n_boot, n))
    pos = np.flatnonzero(y)
    neg = np.flatnonzero(~y)
    parts = [g[rng.integers(0, g.size, size=(n_boot, g.size))] for g in (pos, neg) if g.size]
    return np.concatenate(parts, axis=1) if parts else np.empty((n_boot, 0), dtype=np.intp)


def percentile_interval(values: FloatArray, alpha: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return math.nan, math.nan
    low, high = np.quantile(finite, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def as_generator(seed: int | np.random.Generator | None) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def check_bootstrap(n_boot: int, alpha: float) -> None:
    if not isinstance(n_boot, int | np.integer) or n_boot < 1:
        raise MetricInputError(f"n_boot must be a positive integer, got {n_boot!r}; 1000 is usual")
    if not 0.0 < alpha < 1.0:
        raise MetricInputError(f"alpha must lie in (0, 1), got {alpha!r}; 0.05 gives a 95% CI")


def bootstrap_ci(
    metric_fn: MetricFn | Callable[[ArrayLike, ArrayLike], float],
    y_true: ArrayLike,
    y_score: ArrayLike,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int | np.random.Generator | None = 0,
    stratified: bool = True,
) -> tuple[float, float, float]:
    """Percentile-bootstrap confidence interval of ``metric_fn(y_true, y_score)``.

    Cases are resampled with replacement ``n_boot`` times; with ``stratified=True`` positives and
    negatives are resampled separately, so each resample keeps both classes (and the class
    counts). :func:`auroc` is evaluated on all resamples at once (vectorised ranks); any other
    ``metric_fn`` is called once per resample. Resamples where the metric is nan (e.g. one class
    in an unstratified resample) are dropped before taking percentiles.

    Args:
        metric_fn: ``f(y_true, y_score) -> float``, e.g. :func:`auroc` or
            ``lambda y, s: sensitivity_specificity(y, s, 0.5)[0]``.
        y_true: Labels, shape ``(N,)``.
        y_score: Scores or probabilities, shape ``(N,)``.
        n_boot: Number of resamples.
        alpha: ``1 - alpha`` is the coverage of the interval.
        seed: Seed or generator of the resampling; a fixed int gives identical intervals.
        stratified: Resample within each class.

    Returns:
        ``(point, low, high)``: the metric on the full data and the ``alpha/2`` and
        ``1 - alpha/2`` percentiles of the resampled metric (nan when no resample was defined).

    >>> p, lo, hi = bootstrap_ci(auroc, [0, 0, 0, 1, 1, 1], [0.1, 0.3, 0.6, 0.4, 0.8, 0.9], seed=1)
    >>> p, lo <= p <= hi
    (0.8888888888888888, True)
    """
    y, s = check_labels_scores(y_true, y_score)
    check_bootstrap(n_boot, alpha)
    point = float(metric_fn(y, s))
    idx = resample_indices(y, int(n_boot), as_generator(seed), stratified)
    if metric_fn is auroc:
        values = auroc_batched(y[idx], s[idx])
    else:
        values = np.array([metric_fn(y[row], s[row]) for row in idx], dtype=np.float64)
    low, high = percentile_interval(values, alpha)
    return point, low, high


def binary_report(
    y_true: ArrayLike,
    y_score: ArrayLike,
    threshold: float,
    n_boot: int = 1000,
    seed: int | np.random.Generator | None = 0,
    alpha: float = 0.05,
    n_bins: int = 10,
) -> dict[str, object]:
    """AUROC, sensitivity, specificity and ECE, each with its percentile-bootstrap CI.

    All four metrics share the same stratified resamples (paired), so their intervals are
    consistent with one another. ``y_score`` must be probabilities in ``[0, 1]`` (for the ECE).

    Args:
        y_true: Labels, shape ``(N,)``.
        y_score: Predicted probabilities, shape ``(N,)``.
        threshold: The operating point chosen on the validation set (:func:`choose_threshold`).
        n_boot: Number of bootstrap resamples.
        seed: Seed or generator of the resampling.
        alpha: ``1 - alpha`` is the coverage of the intervals (0.05: 95%).
        n_bins: Uniform bins of the ECE.

    Returns:
        ``{"n", "n_positive", "threshold", "alpha", "auroc", "sensitivity", "specificity",
        "ece"}``, where each metric is ``{"value", "low", "high"}`` (floats, nan where
        undefined). JSON-ready for ``dvc metrics``.

    >>> r = binary_report([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], threshold=0.5, n_boot=50)
    >>> r["n"], r["n_positive"], r["auroc"]["value"], r["sensitivity"]["value"]
    (4, 2, 0.75, 0.5)
    """
    y, s = check_labels_scores(y_true, y_score)
    _check_prob(s)
    check_bootstrap(n_boot, alpha)
    threshold = float(threshold)
    idx = resample_indices(y, int(n_boot), as_generator(seed), stratified=True)
    yb, sb = y[idx], s[idx]
    sens_b, spec_b = sens_spec_batched(yb, sb, threshold)
    sens, spec = sens_spec_batched(y, s, threshold)
    boot = {
        "auroc": (float(auroc_batched(y, s)), auroc_batched(yb, sb)),
        "sensitivity": (float(sens), sens_b),
        "specificity": (float(spec), spec_b),
        "ece": (
            _ece(y, s, n_bins, "uniform"),
            np.array([_ece(yr, sr, n_bins, "uniform") for yr, sr in zip(yb, sb, strict=True)]),
        ),
    }
    report: dict[str, object] = {
        "n": int(y.size),
        "n_positive": int(y.sum()),
        "threshold": threshold,
        "alpha": float(alpha),
    }
    for name, (value, values) in boot.items():
        low, high = percentile_interval(values, alpha)
        report[name] = {"value": value, "low": low, "high": high}
    return report


# --------------------------------------------------------------------------------------------------
# figures for people


def format_interval(
    value: float | None,
    low: float | None,
    high: float | None,
    n: int | None = None,
    positives: int | None = None,
    digits: int = 3,
) -> str:
    """A figure with its bootstrap interval as people read it: ``0.814 (0.600–0.972)``.

    An interval whose ends are equal is not an interval: every bootstrap resample scored the same
    (a small set that the model separates perfectly gives AUROC 1.000 on every resample). It says
    so, with the counts it was computed from when given, instead of printing ``1.000 (1.000–1.000)``.
    An undefined figure is ``n/a``; a figure without interval is the value alone.

    >>> format_interval(0.8141, 0.6, 0.97204)
    '0.814 (0.600–0.972)'
    >>> format_interval(1.0, 1.0, 1.0, n=19, positives=4)
    '1.000 (interval collapsed: every bootstrap resample scored 1.000; n=19, positives=4)'
    >>> format_interval(float("nan"), None, None), format_interval(0.5, None, None)
    ('n/a', '0.500')
    """
    if not _finite(value):
        return "n/a"
    text = f"{value:.{digits}f}"
    if not (_finite(low) and _finite(high)):
        return text
    if interval_collapsed(low, high):
        counts = [f"{k}={v}" for k, v in (("n", n), ("positives", positives)) if v is not None]
        why = f"interval collapsed: every bootstrap resample scored {low:.{digits}f}"
        return f"{text} ({'; '.join([why, ', '.join(counts)]) if counts else why})"
    return f"{text} ({low:.{digits}f}–{high:.{digits}f})"


def interval_collapsed(low: float | None, high: float | None) -> bool:
    """Whether a bootstrap interval has equal ends (every resample gave the same figure).

    >>> interval_collapsed(1.0, 1.0), interval_collapsed(0.9, 1.0), interval_collapsed(None, 1.0)
    (True, False, False)
    """
    return _finite(low) and _finite(high) and math.isclose(low, high, rel_tol=0, abs_tol=1e-12)


def _finite(value: float | None) -> TypeGuard[float]:
    """Whether ``value`` is a finite number (``None``, nan and text are not)."""
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
