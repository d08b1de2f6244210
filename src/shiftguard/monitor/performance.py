"""Label-free performance estimation: how well the model does in a window of studies, before any
label arrives.

The model's outputs are calibrated probabilities ``p`` (the bundle ships the calibration map fitted
on validation) and a study counts as positive when ``p >= threshold``. Two estimators, each giving
a :class:`WindowEstimate` of AUROC, sensitivity, specificity, the positive rate and the prevalence
with an interval:

* :func:`cbpe`, confidence-based performance estimation (what NannyML's CBPE does for tabular
  data): a calibrated ``p`` is the chance that the study holds the finding, so the window's
  expected confusion matrix and expected AUROC follow from its probabilities alone. It is right
  while ``P(finding | p) = p`` holds in the window: covariate shift that leaves this intact (the
  model's probability is the true ``P(finding | image)``) does not bias it, but label shift does
  (the prevalence moves and ``p(image | finding)`` does not: ``p`` then understates the findings,
  see :func:`cbpe`), and so does a shift into studies where the calibration map is wrong.
* :class:`DensityRatioEstimator`, importance weighting of the labelled reference: a domain
  classifier tells how much more typical of the window than of the reference each labelled
  reference study is, and the reference's realised metrics are recomputed with those weights. It
  is right under covariate shift in the classifier's features as long as the reference covers the
  window; the weights' effective sample size (ESS) and the classifier's overlap say when it does
  not, and the estimate is then marked unsupported.

:class:`PerformanceEstimator` runs both on a window of feature records against the bundle's
reference table (only its held-out, labelled rows: the model is overconfident on its training
rows).

The kernels (:func:`cbpe`, :func:`expected_auroc`, :func:`weighted_auroc`,
:class:`DensityRatioEstimator`) are numpy/scipy only; pandas is imported by
:class:`PerformanceEstimator` alone. Their matrix products are small, so they run on one BLAS
thread (:func:`shiftguard.pool.limit_blas_threads`): with BLAS threads competing for busy cores
(load 4 on 2 cores), one density-ratio estimate took 0.33 s instead of 0.034 s (50 reference
studies) and 2.3 s instead of 0.94 s (5,000), and :func:`cbpe` on 10,000 studies 0.14 s instead
of 0.085 s; the results also no longer depend on the number of threads.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> prob = rng.beta(2, 5, 50)
    >>> est = cbpe(prob, threshold=0.5, n_draws=200)
    >>> est.method, est.n, sorted(est.metrics)
    ('cbpe', 50, ['auroc', 'positive_rate', 'prevalence', 'sensitivity', 'specificity'])
    >>> m = est.metrics["sensitivity"]
    >>> bool(m.low <= m.value <= m.high)
    True
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import minimize
from scipy.special import expit
from scipy.stats import rankdata

from shiftguard.errors import EstimationError, MetricInputError
from shiftguard.metrics import (
    auroc,
    check_labels_scores,
    percentile_interval,
    sensitivity_specificity,
)
from shiftguard.pool import limit_blas_threads
from shiftguard.records.features import BY_NAME, FEATURES

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "DOMAIN_FEATURES",
    "METRICS",
    "DensityRatioEstimator",
    "Estimate",
    "EstimationError",
    "PerformanceEstimator",
    "WindowEstimate",
    "cbpe",
    "expected_auroc",
    "realised",
    "weighted_auroc",
]

logger = logging.getLogger(__name__)

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

#: the metrics every :class:`WindowEstimate` holds, in this order
METRICS = ("auroc", "sensitivity", "specificity", "positive_rate", "prevalence")
#: the domain classifier's default features: numerical image, output and embedding features. Not
#: the acquisition metadata: a scanner model the reference has never seen separates the window
#: perfectly on it, and no reference study would carry any weight.
DOMAIN_FEATURES: tuple[str, ...] = tuple(
    f.name
    for f in FEATURES
    if f.kind == "numerical" and f.group in ("image", "output", "embedding")
)
_MAX_CELLS = 4_000_000  # label draws generated at once (draws x studies), about 32 MB of floats


# --------------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class Estimate:
    """One estimated metric and its interval; any of the three may be ``nan`` (undefined).

    Attributes:
        value: The point estimate.
        low: The interval's lower end (``alpha / 2`` percentile).
        high: The interval's upper end (``1 - alpha / 2`` percentile).
    """

    value: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float | None]:
        """``{"value", "low", "high"}`` rounded to 4 digits; ``None`` for ``nan``."""
        return {"value": _json(self.value), "low": _json(self.low), "high": _json(self.high)}


@dataclass
class WindowEstimate:
    """The estimated performance of the model on one window of studies.

    Attributes:
        method: ``"cbpe"`` or ``"density_ratio"``.
        n: Studies in the window.
        metrics: :data:`METRICS` -> :class:`Estimate`: ``auroc``, ``sensitivity``,
            ``specificity`` (at ``p >= threshold``), ``positive_rate`` (the window's observed
            share at or above the threshold; exact, so its interval is the value itself) and
            ``prevalence`` (the expected share of studies with the finding).
        ess: Density ratio only: Kish's effective sample size of the reference weights.
        supported: False when the reference cannot speak for this window (``reason`` says why);
            the values are still computed but should not be trusted.
        reason: Why the estimate is not supported; empty when it is.
        overlap: Density ratio only: how poorly the domain classifier tells the window from the
            reference, from 1 (not at all) to 0 (perfectly); see :class:`DensityRatioEstimator`.
    """

    method: str
    n: int
    metrics: dict[str, Estimate]
    ess: float | None = None
    supported: bool = True
    reason: str = ""
    overlap: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict, numbers rounded to 4 digits and ``nan`` as ``None``."""
        return {
            "method": self.method,
            "n": int(self.n),
            "metrics": {name: est.to_dict() for name, est in self.metrics.items()},
            "ess": None if self.ess is None else _json(self.ess),
            "supported": bool(self.supported),
            "reason": self.reason,
            "overlap": None if self.overlap is None else _json(self.overlap),
        }


def _json(value: float) -> float | None:
    return round(float(value), 4) if math.isfinite(value) else None


# --------------------------------------------------------------------------------------------------
# what labels say


def realised(finding: ArrayLike, prob: ArrayLike, threshold: float) -> dict[str, float]:
    """What a window's labels say: AUROC, sensitivity and specificity at ``threshold`` (nan where
    a class is missing), the share flagged and the share with the finding.

    >>> r = realised([0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9], 0.5)
    >>> r["auroc"], r["sensitivity"], r["specificity"], r["positive_rate"]
    (0.75, 0.5, 0.5, 0.5)
    """
    y = np.asarray(finding).astype(int)
    p = np.asarray(prob, dtype=np.float64)
    sens, spec = sensitivity_specificity(y, p, threshold)
    return {
        "auroc": auroc(y, p) if 0 < y.sum() < y.size else math.nan,
        "sensitivity": float(sens),
        "specificity": float(spec),
        "positive_rate": float(np.mean(p >= threshold)) if p.size else math.nan,
        "prevalence": float(np.mean(y)) if y.size else math.nan,
    }


# --------------------------------------------------------------------------------------------------
# input checks


def _check_prob(prob: ArrayLike, name: str) -> FloatArray:
    try:
        p = np.asarray(prob, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MetricInputError(
            f"{name} must be numbers (calibrated probabilities), got {exc}; pass the model's "
            f"'probability' outputs"
        ) from None
    if p.ndim != 1:
        raise MetricInputError(
            f"{name} has shape {p.shape}; pass a 1-D array of shape (N,), one probability per study"
        )
    if p.size == 0:
        raise MetricInputError(f"{name} is empty; a window needs at least one study")
    if not np.isfinite(p).all():
        n_bad = int((~np.isfinite(p)).sum())
        raise MetricInputError(
            f"{name} holds {n_bad} non-finite value(s) (nan or inf); drop the studies without a "
            f"probability before estimating"
        )
    if p.min() < 0.0 or p.max() > 1.0:
        raise MetricInputError(
            f"{name} must hold calibrated probabilities in [0, 1], found values in "
            f"[{p.min():.4g}, {p.max():.4g}]; apply the bundle's calibration map to the model "
            f"output first"
        )
    return p


def _check_threshold(threshold: float) -> float:
    if (
        not isinstance(threshold, numbers.Real)
        or not math.isfinite(threshold)
        or not 0.0 <= threshold <= 1.0
    ):
        raise MetricInputError(
            f"threshold must be a probability in [0, 1] on the calibrated scale, got "
            f"{threshold!r}; use the operating point shipped with the bundle"
        )
    return float(threshold)


def _check_count(value: int, name: str, usual: str, minimum: int = 1) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise MetricInputError(f"{name} must be an integer >= {minimum}, got {value!r}; {usual}")
    return int(value)


def _check_alpha(alpha: float) -> float:
    if not isinstance(alpha, numbers.Real) or not 0.0 < alpha < 1.0:
        raise MetricInputError(
            f"alpha must lie in (0, 1), got {alpha!r}; 0.05 gives a 95% interval"
        )
    return float(alpha)


def _check_matrix(x: ArrayLike, name: str, d: int | None = None) -> FloatArray:
    try:
        m = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MetricInputError(
            f"{name} must be a numeric feature matrix, got {exc}; encode categorical features or "
            f"leave them out"
        ) from None
    if m.ndim != 2 or m.shape[0] == 0:
        raise MetricInputError(
            f"{name} has shape {m.shape}; pass a 2-D array of shape (N, D) with at least one row"
        )
    if d is not None and m.shape[1] != d:
        raise MetricInputError(
            f"{name} has {m.shape[1]} feature column(s), the reference has {d}; pass the same "
            f"features, in the same order"
        )
    if np.isinf(m).any():
        raise MetricInputError(
            f"{name} holds {int(np.isinf(m).sum())} infinite value(s); use nan for a missing "
            f"feature (it is imputed with the reference median)"
        )
    return m


# --------------------------------------------------------------------------------------------------
# pair sums in O(N log N)


def _pair_sums(score: FloatArray, a: FloatArray, b: FloatArray) -> FloatArray:
    """``sum_{i,j} a_i b_j (1{s_i > s_j} + 1/2 1{s_i == s_j})`` for each row of ``a``, ``b``.

    ``score`` has shape ``(N,)``, ``a`` and ``b`` shape ``(B, N)``; returns ``(B,)``. The pair
    ``i == j`` is included (a tie: ``a_i b_i / 2``). One sort of the scores, then cumulative sums
    of ``b`` over the distinct scores: ``O(N log N + B N)``.
    """
    order = np.argsort(score, kind="stable")
    s = score[order]
    a, b = a[:, order], b[:, order]
    first = np.r_[True, s[1:] != s[:-1]]
    group = np.cumsum(first) - 1  # index of each sorted score's group of equal scores
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], s.size]
    cum = np.concatenate([np.zeros((b.shape[0], 1)), np.cumsum(b, axis=1)], axis=1)
    below = cum[:, starts][:, group]  # b summed over strictly lower scores
    tied = (cum[:, ends] - cum[:, starts])[:, group]  # b summed over equal scores (i included)
    out: FloatArray = (a * (below + 0.5 * tied)).sum(axis=1)
    return out


def expected_auroc(prob: ArrayLike, score: ArrayLike | None = None) -> float:
    """The AUROC a window of calibrated probabilities should have, as a ratio of expectations.

    With calibrated ``p``, study ``i`` holds the finding with probability ``p_i``, independently.
    The AUROC is the share of (positive, negative) pairs that the score orders correctly, ties
    counting 1/2. Its numerator and denominator are pair counts whose expectations are exact::

        E[correct pairs] = sum_{i != j} p_i (1 - p_j) (1{s_i > s_j} + 1/2 1{s_i == s_j})
        E[all pairs]     = sum_{i != j} p_i (1 - p_j)

    and the estimate is their ratio (the expectation of the ratio has no closed form; the two
    differ by ``O(1/N)``). It is computed in ``O(N log N)``: sort by score, then, per distinct
    score, the cumulative ``sum (1 - p_j)`` below it and within its ties; the ``i == j`` terms
    (ties of a study with itself) are taken out. NannyML's CBPE integrates the ROC curve of the
    expected counts, which is the same ratio with the ``i == j`` pairs kept at half credit.

    Args:
        prob: Calibrated probabilities, shape ``(N,)``, in ``[0, 1]``.
        score: The score that ranks the studies, shape ``(N,)``; defaults to ``prob`` (a
            calibration map is monotone, so the calibrated probability ranks as the raw output).

    Returns:
        The expected AUROC, or ``nan`` when no pair can be discordant in expectation (fewer than
        two studies, or every ``p`` is 0 or every ``p`` is 1).

    Raises:
        MetricInputError: ``prob`` is not a non-empty 1-D array of probabilities, or ``score``
            does not match it.

    >>> expected_auroc([0.1, 0.9])  # pairs (2, 1): 0.9 * 0.9; (1, 2): 0.1 * 0.1
    0.9878048780487805
    >>> round(expected_auroc([0.3, 0.3, 0.3]), 12)  # all tied
    0.5
    """
    p = _check_prob(prob, "prob")
    s = p if score is None else np.asarray(score, dtype=np.float64)
    if s.shape != p.shape or not np.isfinite(s).all():
        raise MetricInputError(
            f"score has shape {s.shape} (or non-finite values) and prob {p.shape}; pass one finite "
            f"score per probability"
        )
    return float(_expected_auroc(s, p[None, :])[0])


def _expected_auroc(score: FloatArray, p: FloatArray) -> FloatArray:
    """:func:`expected_auroc` of each row of ``p`` ``(B, N)`` with one ``score`` ``(N,)``."""
    q = 1.0 - p
    self_pairs = (p * q).sum(axis=1)
    num = _pair_sums(score, p, q) - 0.5 * self_pairs
    den = p.sum(axis=1) * q.sum(axis=1) - self_pairs
    with np.errstate(invalid="ignore", divide="ignore"):
        out: FloatArray = np.where(den > 0, num / den, np.nan)
    return out


def weighted_auroc(y_true: ArrayLike, y_score: ArrayLike, weights: ArrayLike) -> float:
    """AUROC with a weight per case: each (positive ``i``, negative ``j``) pair counts ``w_i w_j``.

    ``sum_{pos i, neg j} w_i w_j (1{s_i > s_j} + 1/2 1{s_i == s_j}) / (W_pos W_neg)``, in
    ``O(N log N)``; with unit weights it is :func:`shiftguard.metrics.auroc`.

    Args:
        y_true: Labels, shape ``(N,)``, 0/1 or bool.
        y_score: Scores, shape ``(N,)``; higher means more likely positive.
        weights: Non-negative weights, shape ``(N,)``.

    Returns:
        The weighted AUROC, ``nan`` when either class has no weight.

    Raises:
        MetricInputError: Shapes differ, labels are not 0/1, scores or weights not finite, or a
            weight is negative.

    >>> weighted_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], [1, 1, 1, 1])
    0.75
    >>> weighted_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], [1, 0, 1, 1])  # drop the 0.4 negative
    1.0
    """
    y, s = check_labels_scores(y_true, y_score)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != s.shape or not np.isfinite(w).all() or (w < 0).any():
        raise MetricInputError(
            f"weights has shape {w.shape} for {s.size} cases, or holds negative or non-finite "
            f"values; pass one finite weight >= 0 per case"
        )
    return float(_weighted_auroc(s, y, w[None, :])[0])


def _weighted_auroc(score: FloatArray, y: BoolArray, w: FloatArray) -> FloatArray:
    """Weighted AUROC of each row of weights ``(B, N)``, labels ``(N,)``, scores ``(N,)``."""
    pos = np.where(y, w, 0.0)
    neg = w - pos
    den = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out: FloatArray = np.where(den > 0, _pair_sums(score, pos, neg) / den, np.nan)
    return out


# --------------------------------------------------------------------------------------------------
# CBPE


def cbpe(
    prob: ArrayLike,
    threshold: float,
    n_draws: int = 1000,
    alpha: float = 0.05,
    seed: int | np.random.Generator | None = 0,
) -> WindowEstimate:
    """Confidence-based performance estimation of one window from calibrated probabilities.

    Each study holds the finding with probability ``p_i``, so the expected confusion matrix at
    ``p >= threshold`` is ``TP = sum_{p >= t} p``, ``FP = sum_{p >= t} (1 - p)``,
    ``FN = sum_{p < t} p``, ``TN = sum_{p < t} (1 - p)``; sensitivity is ``TP / (TP + FN)``,
    specificity ``TN / (TN + FP)``, the prevalence ``mean(p)``, the AUROC
    :func:`expected_auroc`, and the positive rate the observed ``mean(p >= t)``.

    The interval is where the window's REALISED metric should fall if the model is calibrated
    here: ``n_draws`` label vectors ``y_i ~ Bernoulli(p_i)`` are drawn (vectorised), each draw's
    realised metrics computed, draws where a metric is undefined (one class) dropped, and the
    ``alpha/2`` and ``1 - alpha/2`` percentiles taken. It does not cover a miscalibration:
    under label shift with a higher prevalence than the calibration's, ``p`` understates the
    findings, so the prevalence is underestimated, the sensitivity overestimated (the missed
    findings sit among the low-``p`` studies, which ``p`` credits with too few findings) and the
    specificity underestimated.

    Args:
        prob: Calibrated probabilities of the window's studies, shape ``(N,)``, in ``[0, 1]``.
        threshold: The operating point on the same scale; positive when ``p >= threshold``.
        n_draws: Label vectors drawn for the interval.
        alpha: ``1 - alpha`` is the interval's coverage.
        seed: Seed or generator of the draws; a fixed int gives the same interval.

    Returns:
        A :class:`WindowEstimate` with ``method="cbpe"``, ``ess=None`` and ``supported=True``.

    Raises:
        MetricInputError: ``prob`` is empty, not 1-D, not finite or outside ``[0, 1]``; the
            threshold is not in ``[0, 1]``; ``n_draws`` or ``alpha`` is out of range.
    """
    p = _check_prob(prob, "prob")
    t = _check_threshold(threshold)
    n_draws = _check_count(n_draws, "n_draws", "1000 is usual")
    alpha = _check_alpha(alpha)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    pred = p >= t
    tp, fp = p[pred].sum(), (1.0 - p[pred]).sum()
    fn, tn = p[~pred].sum(), (1.0 - p[~pred]).sum()
    point = {
        "auroc": float(_expected_auroc(p, p[None, :])[0]),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "prevalence": float(p.mean()),
    }
    with limit_blas_threads():  # small products: threads only contend (see the module's notes)
        draws = _label_draws(p, t, n_draws, rng)
    metrics = {}
    for name in METRICS:
        if name == "positive_rate":
            rate = float(pred.mean())
            metrics[name] = Estimate(rate, rate, rate)
        else:
            metrics[name] = Estimate(point[name], *percentile_interval(draws[name], alpha))
    return WindowEstimate(method="cbpe", n=int(p.size), metrics=metrics)


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else math.nan


def _label_draws(
    p: FloatArray, threshold: float, n_draws: int, rng: np.random.Generator
) -> dict[str, FloatArray]:
    """Realised AUROC, sensitivity, specificity and prevalence of ``n_draws`` label vectors drawn
    from ``Bernoulli(p)``; each ``(n_draws,)``.

    The scores and the predictions are the same in every draw, so each draw's metrics follow from
    three sums over its positives: their count, their rank sum (average ranks, a tie earning half
    credit: Mann-Whitney) and their count among the predicted positives. The sums of all draws
    are one ``(draws, N) @ (N, 3)`` product, in chunks of at most :data:`_MAX_CELLS` labels; this
    is half the time of ranking per draw (:func:`shiftguard.metrics.auroc_batched` and
    :func:`~shiftguard.metrics.sens_spec_batched`), which the result equals.
    """
    n = p.size
    pred = p >= threshold
    basis = np.column_stack([np.ones(n), rankdata(p), pred.astype(np.float64)])
    n_pred = float(pred.sum())
    sums = np.empty((n_draws, 3))
    chunk = max(1, _MAX_CELLS // n)
    for start in range(0, n_draws, chunk):
        y = rng.random((min(chunk, n_draws - start), n)) < p
        sums[start : start + y.shape[0]] = y.astype(np.float64) @ basis
    n_pos, rank_sum, tp = sums.T
    n_neg = n - n_pos
    tn = (n - n_pred) - (n_pos - tp)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "auroc": np.where(
                (n_pos > 0) & (n_neg > 0),
                (rank_sum - n_pos * (n_pos + 1.0) / 2.0) / (n_pos * n_neg),
                np.nan,
            ),
            "sensitivity": np.where(n_pos > 0, tp / n_pos, np.nan),
            "specificity": np.where(n_neg > 0, tn / n_neg, np.nan),
            "prevalence": n_pos / n,
        }


# --------------------------------------------------------------------------------------------------
# density ratio


def _logistic_objective(
    theta: FloatArray, z: FloatArray, target: FloatArray, c: FloatArray, pen: FloatArray
) -> FloatArray:
    """The domain classifier's objective for each row of ``theta`` ``(B, K)`` and case weights
    ``c`` ``(B, M)``: ``(sum c (softplus(eta) - t eta) + 1/2 sum pen theta^2) / M``."""
    eta = theta @ z.T
    loss = (c * (np.logaddexp(0.0, eta) - target * eta)).sum(axis=1)
    out: FloatArray = (loss + 0.5 * (pen * theta * theta).sum(axis=1)) / z.shape[0]
    return out


def _fit_lbfgsb(z: FloatArray, target: FloatArray, c: FloatArray, pen: FloatArray) -> FloatArray:
    """The domain classifier's coefficients ``(K,)`` (intercept last), by L-BFGS-B from zero."""
    m = z.shape[0]

    def loss(theta: FloatArray) -> tuple[float, FloatArray]:
        eta = z @ theta
        value = (c * (np.logaddexp(0.0, eta) - target * eta)).sum() + 0.5 * (pen * theta) @ theta
        grad = z.T @ (c * (expit(eta) - target)) + pen * theta
        return float(value) / m, grad / m

    res = minimize(
        loss,
        np.zeros(z.shape[1]),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 1000, "ftol": 1e-13, "gtol": 1e-9},
    )
    if not res.success:
        logger.debug("domain classifier: L-BFGS-B stopped early (%s)", res.message)
    out: FloatArray = np.asarray(res.x, dtype=np.float64)
    return out


def _fit_newton(
    z: FloatArray,
    target: FloatArray,
    c: FloatArray,
    pen: FloatArray,
    start: FloatArray,
    max_iter: int = 50,
) -> FloatArray:
    """The domain classifier refitted for each row of case weights ``c`` ``(B, M)`` at once:
    Newton's method with step halving from ``start`` ``(K,)``; returns ``(B, K)``.

    Every Hessian ``sum_m c s (1 - s) z_m z_m^T`` of the batch is one ``(B, M) @ (M, K^2)``
    product with the rows' outer products, so each iteration is a few matrix products.
    """
    k = z.shape[1]
    outer = (z[:, :, None] * z[:, None, :]).reshape(z.shape[0], k * k)
    ridge = np.diag(pen) + 1e-10 * np.eye(k)
    theta = np.tile(start, (c.shape[0], 1))
    value = _logistic_objective(theta, z, target, c, pen)
    for _ in range(max_iter):
        s = expit(theta @ z.T)
        grad = (c * (s - target)) @ z + pen * theta
        hess = ((c * s * (1.0 - s)) @ outer).reshape(-1, k, k) + ridge
        step = np.linalg.solve(hess, grad[..., None])[..., 0]
        size = np.ones(c.shape[0])
        trial = theta - step
        trial_value = _logistic_objective(trial, z, target, c, pen)
        for _ in range(30):  # halve the step where it does not decrease the objective
            worse = trial_value > value + 1e-12 * np.abs(value)
            if not worse.any():
                break
            size[worse] /= 2.0
            trial[worse] = theta[worse] - size[worse, None] * step[worse]
            trial_value[worse] = _logistic_objective(trial[worse], z, target, c[worse], pen)
        moved = np.abs(trial - theta).max()
        theta, value = trial, trial_value
        if moved < 1e-10:
            break
    return theta


class DensityRatioEstimator:
    """Importance-weighted performance of a labelled reference, reweighted to look like a window.

    For each window, a domain classifier (L2-regularised logistic regression) separates the
    window's studies (1) from the reference's (0). It minimises the class-balanced mean log-loss
    plus ``l2 / 2 * ||beta||^2 / n`` (``n`` studies in all; intercept not penalised) with scipy's
    L-BFGS-B. With balanced classes its odds estimate the density ratio
    ``p_window(x) / p_reference(x)`` directly (the prior correction ``n_ref / n_win`` is built in);
    the weight of reference study ``i`` is that ratio, clipped at ``clip`` times the mean weight
    and normalised to mean 1. The estimate is the reference's WEIGHTED realised metrics:
    :func:`weighted_auroc`, weighted sensitivity and specificity, the weighted share of findings
    as prevalence; the positive rate is the window's observed share.

    Features: a missing value (nan) is imputed with the reference column's median, columns are
    standardised by the reference mean and standard deviation, and columns constant in the
    reference (or all missing there) are dropped.

    Support: the estimate is marked unsupported (values still computed) when

    * Kish's effective sample size ``(sum w)^2 / sum w^2`` of the weights is below ``min_ess``.
      It is taken on the UNCLIPPED weights: clipping at ``clip`` times the mean bounds the ESS
      from below by about ``n_ref / clip``, so a clipped ESS could not flag a disjoint window
      once the reference holds a few hundred studies;
    * the domain classifier's ``overlap``, ``mean_ref P(window | x) + mean_window P(ref | x)``
      (1 when it cannot tell the two apart, 0 when it separates them), is below
      ``min_overlap``. The ESS alone misses a window far from the reference: the penalty keeps
      the coefficients small once the classes separate by a wide margin, the reference weights
      then barely vary and their ESS stays high, while every reference study is far less likely
      than the window's own studies. For a one-feature Gaussian mean shift of ``delta`` standard
      deviations the overlap is about 0.80 (``delta = 1``), 0.45 (2), 0.31 (2.5) and 0.20 (3).
      Measured on 100 windows of 50 studies against 50 reference studies, 20 features, the floor 0.25
      flags no window without shift that the ESS passes, and every window shifted by 3
      standard deviations in one feature (the ESS alone: 63 %);
    * a column constant in the reference takes another value in the window.

    Interval: a bootstrap of ``n_boot`` replicates resampling the reference's rows and the
    window's rows (with replacement) and REFITTING the domain classifier on each. The replicates
    are refitted together by Newton's method on the same objective, started from the full fit
    (about 6 vectorised iterations; they agree with L-BFGS-B to 1e-6 in every coefficient).
    Measured on 2 cores, one 50-study window against a 50-study reference with 20 features: 200
    L-BFGS-B refits alone took 0.2 s on one BLAS thread (5 to 25 s with BLAS threads competing
    for busy cores), the whole estimate with the vectorised refits takes about 0.03 s (0.9 s
    against 5,000 reference studies).
    The interval is the uncertainty of the estimate of the model's performance on studies like
    the window's, not the spread of one window's realised metric (which :func:`cbpe`'s is).

    Args:
        ref_x: Features of the labelled reference studies, shape ``(n_ref, D)``; nan allowed.
        ref_prob: Their calibrated probabilities, shape ``(n_ref,)``.
        ref_label: Their labels, shape ``(n_ref,)``, 0/1; both classes must be present.
        threshold: The operating point; positive when ``p >= threshold``.
        l2: The L2 penalty of the domain classifier (``> 0``; like scikit-learn's ``1 / C``).
        min_ess: The smallest effective sample size an estimate is supported with.
        clip: Weights are clipped at ``clip`` times their mean (``>= 1``).
        n_boot: Bootstrap replicates (0: no interval, the bounds are nan).
        alpha: ``1 - alpha`` is the interval's coverage.
        seed: Seed of the bootstrap; every :meth:`estimate` call starts from it, so the same
            window gives the same interval.
        min_overlap: The smallest domain-classifier overlap an estimate is supported with.
        names: Names of the ``D`` feature columns, for messages.

    Raises:
        MetricInputError: Shapes differ, features are infinite, probabilities are not in
            ``[0, 1]``, labels are not 0/1 or one class is missing, or a setting is out of range.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(0, 1, (200, 1))
        >>> p = 1 / (1 + np.exp(-2 * x[:, 0]))
        >>> y = (rng.random(200) < p).astype(int)
        >>> dr = DensityRatioEstimator(x, p, y, threshold=0.5, n_boot=50)
        >>> est = dr.estimate(rng.normal(1, 1, (100, 1)), np.full(100, 0.7))
        >>> est.supported, est.metrics["positive_rate"].value, bool(est.ess < 200)
        (True, 1.0, True)
        >>> dr.estimate(rng.normal(8, 1, (100, 1)), np.full(100, 0.9)).supported
        False
    """

    threshold: float
    l2: float
    min_ess: float
    clip: float
    n_boot: int
    alpha: float
    seed: int
    min_overlap: float
    names: tuple[str, ...]
    columns: NDArray[np.intp]
    """Indices of the feature columns the domain classifier uses."""
    _constant: NDArray[np.intp]
    _constant_value: FloatArray
    _median: FloatArray
    _center: FloatArray
    _scale: FloatArray
    _z_ref: FloatArray
    _prob: FloatArray
    _label: BoolArray
    _pred: BoolArray

    def __init__(
        self,
        ref_x: ArrayLike,
        ref_prob: ArrayLike,
        ref_label: ArrayLike,
        threshold: float,
        l2: float = 1.0,
        min_ess: float = 10.0,
        clip: float = 20.0,
        n_boot: int = 200,
        alpha: float = 0.05,
        seed: int = 0,
        *,
        min_overlap: float = 0.25,
        names: Sequence[str] | None = None,
    ) -> None:
        x = _check_matrix(ref_x, "ref_x")
        p = _check_prob(ref_prob, "ref_prob")
        y = np.asarray(ref_label)
        if p.size != x.shape[0] or y.shape != p.shape:
            raise MetricInputError(
                f"ref_x has {x.shape[0]} rows, ref_prob {p.size} values and ref_label shape "
                f"{y.shape}; pass one feature row, probability and label per reference study"
            )
        if not np.isin(y, (0, 1)).all():
            bad = np.unique(y[~np.isin(y, (0, 1))])[:5].tolist()
            raise MetricInputError(
                f"ref_label must hold 0/1 labels, found {bad}; keep only the reference studies "
                f"with a known finding"
            )
        y = y.astype(np.bool_)
        if y.all() or not y.any():
            raise MetricInputError(
                f"ref_label holds {int(y.sum())} finding(s) among {y.size} studies; the labelled "
                f"reference needs both classes to measure sensitivity, specificity and AUROC"
            )
        if not isinstance(l2, numbers.Real) or not 0 < l2 < math.inf:
            raise MetricInputError(
                f"l2 must be a finite number > 0, got {l2!r}; 1.0 is usual (without a penalty "
                f"the classifier has no solution when the window separates from the reference)"
            )
        for name, value, low, usual in (
            ("min_ess", min_ess, 0.0, "10"),
            ("clip", clip, 1.0, "20"),
            ("min_overlap", min_overlap, 0.0, "0.25"),
        ):
            if not isinstance(value, numbers.Real) or not value >= low:
                raise MetricInputError(
                    f"{name} must be >= {low:g}, got {value!r}; {usual} is usual"
                )
        self.threshold = _check_threshold(threshold)
        self.l2, self.min_ess, self.clip = float(l2), float(min_ess), float(clip)
        self.min_overlap = float(min_overlap)
        self.n_boot = _check_count(n_boot, "n_boot", "200 is usual", minimum=0)
        self.alpha = _check_alpha(alpha)
        self.seed = seed
        d = x.shape[1]
        self.names = tuple(names) if names is not None else tuple(f"x{j}" for j in range(d))
        if len(self.names) != d:
            raise MetricInputError(
                f"names has {len(self.names)} entries for {d} feature columns; name each column"
            )

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-missing column: nan median
            median = np.nanmedian(x, axis=0)
        known = np.isfinite(median)
        filled = np.where(np.isnan(x), median, x)
        mean = np.where(known, filled.mean(axis=0), np.nan)
        sd = np.where(known, filled.std(axis=0), 0.0)
        varying = known & (sd > 1e-12 * np.maximum(1.0, np.abs(np.nan_to_num(mean))))
        self.columns = np.flatnonzero(varying)
        self._constant = np.flatnonzero(known & ~varying)
        self._constant_value = mean[self._constant]
        self._median = median[self.columns]
        self._center = mean[self.columns]
        self._scale = sd[self.columns]
        self._z_ref = self._standardise(x)
        self._prob = p
        self._label = y
        self._pred = p >= self.threshold
        if self.columns.size < d:
            dropped = [self.names[j] for j in sorted(set(range(d)) - set(self.columns.tolist()))]
            logger.info("domain classifier: no variation in the reference, dropped %s", dropped)

    @property
    def n_ref(self) -> int:
        """Labelled reference studies."""
        return int(self._prob.size)

    def _standardise(self, x: FloatArray) -> FloatArray:
        cols = x[:, self.columns]
        cols = np.where(np.isnan(cols), self._median, cols)
        out: FloatArray = (cols - self._center) / self._scale
        return out

    def _outside(self, x: FloatArray) -> list[str]:
        """Names of the reference-constant columns where the window holds another value."""
        values = x[:, self._constant]
        tol = 1e-9 * np.maximum(1.0, np.abs(self._constant_value))
        differs = np.isfinite(values) & (np.abs(values - self._constant_value) > tol)
        return [self.names[self._constant[k]] for k in np.flatnonzero(differs.any(axis=0))]

    def _problem(
        self, z_win: FloatArray, count_ref: FloatArray, count_win: FloatArray
    ) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
        """Design ``(M, K)`` (intercept last), targets ``(M,)``, class-balanced case weights
        ``(B, M)`` from row counts ``(B, n_ref)`` and ``(B, n_win)``, and the penalty ``(K,)``."""
        z = np.vstack([self._z_ref, z_win])
        z = np.hstack([z, np.ones((z.shape[0], 1))])
        target = np.r_[np.zeros(self.n_ref), np.ones(z_win.shape[0])]
        m = z.shape[0]
        c = np.hstack(
            [
                count_ref * (m / (2.0 * count_ref.sum(axis=1, keepdims=True))),
                count_win * (m / (2.0 * count_win.sum(axis=1, keepdims=True))),
            ]
        )
        pen = np.r_[np.full(z.shape[1] - 1, self.l2), 0.0]
        return z, target, c, pen

    def _weights(self, log_ratio: FloatArray, counts: FloatArray) -> FloatArray:
        """Each reference row's weight times its count, clipped and normalised to mean 1 over the
        (re)sample; ``log_ratio`` and ``counts`` have shape ``(B, n_ref)``."""
        raw = np.exp(log_ratio - log_ratio.max(axis=1, keepdims=True))
        total = counts.sum(axis=1, keepdims=True)
        mean = (counts * raw).sum(axis=1, keepdims=True) / total
        clipped = np.minimum(raw, self.clip * mean)
        mean = (counts * clipped).sum(axis=1, keepdims=True) / total
        out: FloatArray = counts * clipped / mean
        return out

    def _metrics(self, w: FloatArray) -> dict[str, FloatArray]:
        """Weighted realised metrics of the reference for each row of weights ``(B, n_ref)``."""
        y, pred = self._label, self._pred
        pos = np.where(y, w, 0.0)
        neg = w - pos
        with np.errstate(invalid="ignore", divide="ignore"):
            return {
                "auroc": _weighted_auroc(self._prob, y, w),
                "sensitivity": (pos * pred).sum(axis=1) / pos.sum(axis=1),
                "specificity": (neg * ~pred).sum(axis=1) / neg.sum(axis=1),
                "prevalence": pos.sum(axis=1) / w.sum(axis=1),
            }

    def _fit_window(self, x: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray]:
        """The window standardised ``(n_win, D')``, the fit ``(D' + 1,)`` and the reference's
        log density ratios ``(n_ref,)``."""
        z_win = self._standardise(x)
        ones_ref, ones_win = np.ones((1, self.n_ref)), np.ones((1, z_win.shape[0]))
        z, target, c, pen = self._problem(z_win, ones_ref, ones_win)
        theta = _fit_lbfgsb(z, target, c[0], pen)
        return z_win, theta, z[: self.n_ref] @ theta

    def weights(self, window_x: ArrayLike) -> FloatArray:
        """The reference studies' weights for this window, clipped and normalised to mean 1.

        Args:
            window_x: The window's features, shape ``(n_win, D)``; nan allowed.

        Returns:
            Shape ``(n_ref,)``.

        Raises:
            MetricInputError: ``window_x`` does not match the reference's features.
        """
        x = _check_matrix(window_x, "window_x", len(self.names))
        with limit_blas_threads():
            _, _, log_ratio = self._fit_window(x)
        out: FloatArray = self._weights(log_ratio[None, :], np.ones((1, self.n_ref)))[0]
        return out

    def estimate(self, window_x: ArrayLike, window_prob: ArrayLike) -> WindowEstimate:
        """Estimate the model's performance on one window by reweighting the reference.

        Args:
            window_x: The window's features, shape ``(n_win, D)``, columns as the reference's;
                nan allowed.
            window_prob: The window's calibrated probabilities, shape ``(n_win,)``.

        Returns:
            A :class:`WindowEstimate` with ``method="density_ratio"``, ``ess`` and ``overlap``
            set, and ``supported=False`` with the reasons when the reference does not cover the
            window (see the class's Support).

        Raises:
            MetricInputError: The window's shapes do not match, or its values are not usable.
        """
        x = _check_matrix(window_x, "window_x", len(self.names))
        wp = _check_prob(window_prob, "window_prob")
        if wp.size != x.shape[0]:
            raise MetricInputError(
                f"window_x has {x.shape[0]} rows and window_prob {wp.size} values; pass one of "
                f"each per study"
            )
        with limit_blas_threads():
            z_win, theta, log_ratio = self._fit_window(x)
            boot = self._bootstrap(z_win, theta)
        raw = np.exp(log_ratio - log_ratio.max())
        ess = float(raw.sum() ** 2 / (raw**2).sum())
        win_logit = z_win @ theta[:-1] + theta[-1]
        overlap = float(expit(log_ratio).mean() + expit(-win_logit).mean())
        point = self._metrics(self._weights(log_ratio[None, :], np.ones((1, self.n_ref))))

        metrics = {}
        for name in METRICS:
            if name == "positive_rate":
                rate = float((wp >= self.threshold).mean())
                metrics[name] = Estimate(rate, rate, rate)
            elif boot is None:
                metrics[name] = Estimate(float(point[name][0]), math.nan, math.nan)
            else:
                metrics[name] = Estimate(
                    float(point[name][0]), *percentile_interval(boot[name], self.alpha)
                )

        reasons = []
        if ess < self.min_ess:
            reasons.append(
                f"the effective sample size of the reference weights, {ess:.1f}, is below "
                f"{self.min_ess:g}: few labelled reference studies resemble this window"
            )
        if overlap < self.min_overlap:
            reasons.append(
                f"the domain classifier tells this window from the reference almost perfectly "
                f"(overlap {overlap:.3f} < {self.min_overlap:g}): its studies are unlike any "
                f"labelled reference study"
            )
        outside = self._outside(x)
        if outside:
            reasons.append(
                f"{', '.join(outside)}: constant in the labelled reference, other values in this "
                f"window"
            )
        return WindowEstimate(
            method="density_ratio",
            n=int(x.shape[0]),
            metrics=metrics,
            ess=ess,
            supported=not reasons,
            reason=("the reference has no support for this window: " + "; ".join(reasons))
            if reasons
            else "",
            overlap=overlap,
        )

    def _bootstrap(self, z_win: FloatArray, theta: FloatArray) -> dict[str, FloatArray] | None:
        """Metrics of ``n_boot`` replicates that resample reference and window rows and refit."""
        if self.n_boot == 0:
            return None
        rng = np.random.default_rng(self.seed)
        n_ref, n_win = self.n_ref, z_win.shape[0]
        count_ref = rng.multinomial(n_ref, np.full(n_ref, 1.0 / n_ref), size=self.n_boot)
        count_win = rng.multinomial(n_win, np.full(n_win, 1.0 / n_win), size=self.n_boot)
        counts = count_ref.astype(np.float64)
        z, target, c, pen = self._problem(z_win, counts, count_win.astype(np.float64))
        thetas = _fit_newton(z, target, c, pen, theta)
        log_ratio = thetas @ z[:n_ref].T
        return self._metrics(self._weights(log_ratio, counts))


# --------------------------------------------------------------------------------------------------
# frames


class PerformanceEstimator:
    """Both estimators on windows of feature records, against the bundle's reference table.

    The labelled reference is the reference's held-out rows (``split != "train"``) with a known
    ``finding`` (0/1) and a ``probability``: the model is overconfident on its training rows, so
    their probabilities would flatter every estimate. The same rows train the domain classifier.

    The domain classifier's default features are :data:`DOMAIN_FEATURES`, the numerical image,
    output and embedding features. The acquisition metadata are left out on purpose: a scanner
    model the reference has never seen separates the window perfectly on its protocol values, no
    reference study would carry weight, and every window from the new scanner would be
    unsupported whether or not the images differ in a way the model notices.

    Args:
        reference: The reference table (bundle member ``reference.csv``,
            :func:`shiftguard.monitor.runner.reference_from_bundle`): the feature columns,
            ``split`` and ``finding``.
        threshold: The operating point on the calibrated probability scale.
        features: The domain classifier's feature columns (numerical); default
            :data:`DOMAIN_FEATURES`.
        min_labelled: The fewest labelled held-out rows the reference must hold.
        n_draws: :func:`cbpe`'s label draws.
        alpha: ``1 - alpha`` is both intervals' coverage.
        seed: Seed of both intervals.
        l2: The domain classifier's L2 penalty (:class:`DensityRatioEstimator`).
        min_ess: The smallest effective sample size a density-ratio estimate is supported with.
        clip: Weights are clipped at ``clip`` times their mean.
        n_boot: The density ratio's bootstrap replicates.
        min_overlap: The smallest domain-classifier overlap a density-ratio estimate is
            supported with.

    Raises:
        EstimationError: The reference lacks ``split``, ``finding``, ``probability`` or a feature
            column, holds a finding other than 0/1, or has fewer than ``min_labelled`` labelled
            held-out rows or only one class among them; a feature is categorical.
        MetricInputError: The threshold or a setting is out of range.
    """

    def __init__(
        self,
        reference: pd.DataFrame,
        threshold: float,
        features: Sequence[str] | None = None,
        *,
        min_labelled: int = 20,
        n_draws: int = 1000,
        alpha: float = 0.05,
        seed: int = 0,
        l2: float = 1.0,
        min_ess: float = 10.0,
        clip: float = 20.0,
        n_boot: int = 200,
        min_overlap: float = 0.25,
    ) -> None:
        import pandas as pd

        self.threshold = _check_threshold(threshold)
        min_labelled = _check_count(min_labelled, "min_labelled", "20 is usual")
        self._n_draws = _check_count(n_draws, "n_draws", "1000 is usual")
        self._alpha, self._seed = _check_alpha(alpha), seed
        self.features = tuple(DOMAIN_FEATURES if features is None else features)
        categorical = [f for f in self.features if f in BY_NAME and BY_NAME[f].kind != "numerical"]
        if categorical or not self.features:
            raise EstimationError(
                f"the domain classifier takes numerical features only, got "
                f"{categorical or 'none'}; leave features unset for the default "
                f"(numerical image, output and embedding features)"
            )
        needed = ["split", "finding", "probability", *self.features]
        missing = [c for c in dict.fromkeys(needed) if c not in reference.columns]
        if missing:
            raise EstimationError(
                f"the reference table lacks the column(s) {missing}; re-export the bundle with a "
                f"reference that holds the held-out studies' 'finding' labels and features"
            )
        raw = reference["finding"]
        finding = pd.to_numeric(raw, errors="coerce")
        bad = raw.notna() & ~finding.isin([0, 1])
        if bad.any():
            raise EstimationError(
                f"the reference's 'finding' holds {int(bad.sum())} value(s) other than 0/1 (e.g. "
                f"{raw[bad].unique()[:3].tolist()}); encode the finding as 1/0, missing as empty"
            )
        prob = pd.to_numeric(reference["probability"], errors="coerce")
        held_out = reference["split"].astype(str).str.strip() != "train"
        keep = (held_out & finding.isin([0, 1]) & prob.notna()).to_numpy()
        y = finding.to_numpy()[keep].astype(np.int64)
        n_pos = int(y.sum())
        if keep.sum() < min_labelled or n_pos == 0 or n_pos == y.size:
            raise EstimationError(
                f"the reference holds {int(keep.sum())} held-out row(s) with a known finding and a "
                f"probability ({n_pos} with the finding); performance estimation needs at least "
                f"{min_labelled} and both classes: label more held-out studies"
            )
        self.n_labelled = int(y.size)
        """Labelled held-out reference rows used."""
        self._density_ratio = DensityRatioEstimator(
            self._matrix(reference.loc[keep]),
            prob.to_numpy()[keep],
            y,
            self.threshold,
            l2=l2,
            min_ess=min_ess,
            clip=clip,
            n_boot=n_boot,
            alpha=alpha,
            seed=seed,
            min_overlap=min_overlap,
            names=self.features,
        )
        self.reference_metrics = realised(y, prob.to_numpy()[keep], self.threshold)
        """The realised metrics of the labelled held-out reference (what the model did where
        its performance is known): the baseline of the ``estimated_<metric>_drop`` alert metrics."""

    def _matrix(self, frame: pd.DataFrame) -> FloatArray:
        import pandas as pd

        cols = frame[list(self.features)].apply(pd.to_numeric, errors="coerce")
        out: FloatArray = cols.to_numpy(dtype=np.float64, na_value=np.nan)
        return out

    def window(self, frame: pd.DataFrame) -> dict[str, WindowEstimate]:
        """Estimate the model's performance on one window of records.

        Rows without a probability are left out (logged); ``n`` counts the rows used.

        Args:
            frame: The window's records: ``probability`` and the domain classifier's features.

        Returns:
            ``{"cbpe": ..., "density_ratio": ...}``.

        Raises:
            EstimationError: A column is missing, or no row has a probability.
            MetricInputError: A probability lies outside ``[0, 1]``.
        """
        import pandas as pd

        missing = [c for c in dict.fromkeys(["probability", *self.features]) if c not in frame]
        if missing:
            raise EstimationError(
                f"the window lacks the column(s) {missing}; pass feature records with every "
                f"column of shiftguard.records.features.FEATURE_NAMES"
            )
        prob = pd.to_numeric(frame["probability"], errors="coerce").to_numpy(dtype=np.float64)
        has = np.isfinite(prob)
        if not has.any():
            raise EstimationError(
                f"none of the window's {len(frame)} record(s) has a probability; the window "
                f"cannot be estimated"
            )
        if not has.all():
            logger.warning("%d record(s) without a probability left out", int((~has).sum()))
        x = self._matrix(frame.loc[has])
        return {
            "cbpe": cbpe(prob[has], self.threshold, self._n_draws, self._alpha, self._seed),
            "density_ratio": self._density_ratio.estimate(x, prob[has]),
        }
