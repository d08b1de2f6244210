"""Paired statistics for the augmentation experiment: is an arm better than training without
augmentation, on the same cases, with the same seeds, and could the design have told?

Every arm is trained with the same training seeds (and split seeds), and every run scores the same
cases of an unseen scanner, so arms are compared in pairs:

* :func:`paired_bootstrap`: the arm's mean AUROC (or sensitivity, specificity) over seeds minus the
  reference arm's, with a percentile interval from a two-level bootstrap that resamples seeds (the
  training runs, paired across arms) and, within every resample, cases (stratified, the same cases
  for both arms). Seeds carry the run-to-run variation of training; cases carry the finite test set.
* :func:`delong_per_run`: DeLong's test for the two correlated AUROCs of each seed's pair of runs;
  :func:`auroc_correlation`: how correlated those two AUROC estimates are over cases, the figure
  the power calculation needs.
* :func:`auroc_variance`, :func:`paired_difference_power`, :func:`cases_for_power`: Hanley and
  McNeil's variance of an AUROC and the power of the paired test it gives (Hanley and McNeil 1983,
  Obuchowski 1997): how many cases a scanner's set needs to detect a difference of, say, 0.05.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import norm

from shiftguard.errors import PairedInputError
from shiftguard.metrics import (
    auroc_batched,
    check_bootstrap,
    percentile_interval,
    resample_indices,
    sens_spec_batched,
)
from shiftguard.shadow.evaluate import delong, delong_covariance

FloatArray = NDArray[np.float64]
METRICS = ("auroc", "sensitivity", "specificity")


@dataclass(frozen=True)
class PairedDifference:
    """One metric of an arm against the reference arm, paired by seed and case.

    ``diff`` is the mean over seeds of (arm - reference); ``low`` and ``high`` bound its
    ``1 - alpha`` percentile interval; ``p`` is the two-sided bootstrap p-value (twice the smaller
    share of resampled differences on either side of 0, at most 1).
    """

    metric: str
    arm: float
    reference: float
    diff: float
    low: float
    high: float
    p: float
    n_seeds: int
    n_cases: int


def _scores(name: str, scores: ArrayLike, n_cases: int) -> FloatArray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        s = s[None, :]
    if s.ndim != 2 or s.shape[1] != n_cases:
        raise PairedInputError(
            f"{name}: scores must be (seeds, cases) with {n_cases} cases, got shape {s.shape}"
        )
    if not np.isfinite(s).all():
        raise PairedInputError(f"{name}: scores hold NaN or infinite values")
    return s


def _thresholds(name: str, thresholds: ArrayLike | None, n_seeds: int) -> FloatArray | None:
    if thresholds is None:
        return None
    t = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (n_seeds,)).copy()
    if not np.isfinite(t).all():
        raise PairedInputError(f"{name}: thresholds must be finite")
    return t


def _labels(y_true: ArrayLike) -> NDArray[np.bool_]:
    y = np.asarray(y_true)
    if y.ndim != 1 or not np.isin(y, (0, 1)).all():
        raise PairedInputError("labels must be a 1-D array of 0/1")
    y = y.astype(bool)
    if y.sum() < 2 or (~y).sum() < 2:
        raise PairedInputError(
            f"labels need at least 2 positives and 2 negatives, got {int(y.sum())} and "
            f"{int((~y).sum())}"
        )
    return y


def _per_seed(
    y: NDArray[np.bool_], s: FloatArray, t: FloatArray | None, idx: NDArray[np.intp]
) -> dict[str, FloatArray]:
    """Each metric for every seed (rows of ``s``) on every case resample (rows of ``idx``):
    ``(seeds, resamples)`` arrays."""
    yb = y[idx]
    out: dict[str, list[FloatArray]] = {m: [] for m in METRICS}
    for j in range(s.shape[0]):
        sb = s[j][idx]
        out["auroc"].append(auroc_batched(yb, sb))
        if t is not None:
            sens, spec = sens_spec_batched(yb, sb, float(t[j]))
            out["sensitivity"].append(sens)
            out["specificity"].append(spec)
    return {m: np.vstack(v) for m, v in out.items() if v}


def paired_bootstrap(
    y_true: ArrayLike,
    arm: ArrayLike,
    reference: ArrayLike,
    arm_thresholds: ArrayLike | None = None,
    reference_thresholds: ArrayLike | None = None,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> list[PairedDifference]:
    """An arm against the reference arm, paired by training seed and by case.

    Args:
        y_true: ``(N,)`` labels (0/1) of the cases every run scored.
        arm: ``(S, N)`` the arm's scores, one row per training seed (``(N,)`` for one seed).
        reference: ``(S, N)`` the reference arm's scores, row ``j`` trained with the same seed as
            the arm's row ``j``.
        arm_thresholds, reference_thresholds: ``(S,)`` each run's operating point (chosen on its
            validation split), or one number for all; with them, sensitivity and specificity are
            compared too.
        n_boot: resamples; each draws ``S`` seeds with replacement and, stratified by class, ``N``
            cases with replacement.
        alpha: the interval is ``1 - alpha``.
        seed: the bootstrap's generator seed.

    Returns:
        One :class:`PairedDifference` per metric (AUROC, then sensitivity and specificity when
        thresholds are given).

    >>> y = [0, 0, 0, 1, 1, 1]
    >>> better = [[0.1, 0.2, 0.3, 0.7, 0.8, 0.9]]
    >>> worse = [[0.1, 0.8, 0.3, 0.7, 0.2, 0.9]]
    >>> d = paired_bootstrap(y, better, worse, n_boot=200)[0]
    >>> d.metric, d.arm, round(d.reference, 3), round(d.diff, 3)
    ('auroc', 1.0, 0.667, 0.333)
    """
    check_bootstrap(n_boot, alpha)
    y = _labels(y_true)
    a = _scores("arm", arm, y.size)
    r = _scores("reference", reference, y.size)
    if a.shape[0] != r.shape[0]:
        raise PairedInputError(
            f"arm and reference must have the same seeds (rows), got {a.shape[0]} and {r.shape[0]}"
        )
    if (arm_thresholds is None) != (reference_thresholds is None):
        raise PairedInputError("give thresholds for both arms or for neither")
    n_seeds = a.shape[0]
    ta = _thresholds("arm_thresholds", arm_thresholds, n_seeds)
    tr = _thresholds("reference_thresholds", reference_thresholds, n_seeds)

    full = np.arange(y.size)[None, :]
    point_a, point_r = _per_seed(y, a, ta, full), _per_seed(y, r, tr, full)
    rng = np.random.default_rng(seed)
    idx = resample_indices(y, n_boot, rng, stratified=True)
    boot_a, boot_r = _per_seed(y, a, ta, idx), _per_seed(y, r, tr, idx)
    # seed resampling: how often each seed is drawn in each resample, (n_boot, S)
    counts = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=n_boot)

    results = []
    for metric in boot_a:
        per_run = boot_a[metric] - boot_r[metric]  # (S, n_boot)
        diffs = (counts * per_run.T).sum(axis=1) / n_seeds
        low, high = percentile_interval(diffs, alpha)
        finite = diffs[np.isfinite(diffs)]
        p = (
            min(1.0, 2 * min((finite <= 0).mean(), (finite >= 0).mean()))
            if finite.size
            else math.nan
        )
        arm_value, ref_value = float(point_a[metric].mean()), float(point_r[metric].mean())
        results.append(
            PairedDifference(
                metric=metric,
                arm=arm_value,
                reference=ref_value,
                diff=arm_value - ref_value,
                low=low,
                high=high,
                p=float(p),
                n_seeds=n_seeds,
                n_cases=int(y.size),
            )
        )
    return results


@dataclass(frozen=True)
class SeedCaseInterval:
    """One metric of one arm: the mean over its seeds' runs, with a ``1 - alpha`` percentile
    interval from resampling seeds and cases together (as :func:`paired_bootstrap` does)."""

    metric: str
    value: float
    low: float
    high: float
    n_seeds: int
    n_cases: int


def seed_case_bootstrap(
    y_true: ArrayLike,
    scores: ArrayLike,
    thresholds: ArrayLike | None = None,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> list[SeedCaseInterval]:
    """One arm's AUROC (and sensitivity and specificity at each run's ``thresholds``), averaged over
    seeds, with an interval over seeds and cases.

    Args:
        y_true: ``(N,)`` labels (0/1).
        scores: ``(S, N)`` one row per seed's run (``(N,)`` for one run).
        thresholds: ``(S,)`` each run's operating point, or one number; ``None`` for AUROC only.
        n_boot: resamples, each drawing ``S`` seeds with replacement and ``N`` cases stratified by
            class.
        alpha: the interval is ``1 - alpha``.
        seed: the bootstrap's generator seed.

    >>> r = seed_case_bootstrap([0, 0, 1, 1], [[0.1, 0.2, 0.8, 0.9], [0.1, 0.9, 0.8, 0.2]], n_boot=200)
    >>> r[0].metric, r[0].value, r[0].n_seeds
    ('auroc', 0.75, 2)
    """
    check_bootstrap(n_boot, alpha)
    y = _labels(y_true)
    s = _scores("scores", scores, y.size)
    n_seeds = s.shape[0]
    t = _thresholds("thresholds", thresholds, n_seeds)
    point = _per_seed(y, s, t, np.arange(y.size)[None, :])
    rng = np.random.default_rng(seed)
    idx = resample_indices(y, n_boot, rng, stratified=True)
    boot = _per_seed(y, s, t, idx)
    counts = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=n_boot)
    out = []
    for metric, values in boot.items():
        means = (counts * values.T).sum(axis=1) / n_seeds
        low, high = percentile_interval(means, alpha)
        out.append(
            SeedCaseInterval(
                metric=metric,
                value=float(point[metric].mean()),
                low=low,
                high=high,
                n_seeds=n_seeds,
                n_cases=int(y.size),
            )
        )
    return out


@dataclass(frozen=True)
class DeLongResult:
    """DeLong's test of one seed's pair of runs: ``diff`` = arm AUROC - reference AUROC."""

    seed_index: int
    diff: float
    se: float
    z: float
    p: float


def _run_pairs(
    y_true: ArrayLike, arm: ArrayLike, reference: ArrayLike
) -> tuple[NDArray[np.bool_], FloatArray, FloatArray]:
    """Labels ``(N,)`` and the two arms' ``(S, N)`` scores, one row per seed, checked."""
    y = _labels(y_true)
    a = _scores("arm", arm, y.size)
    r = _scores("reference", reference, y.size)
    if a.shape[0] != r.shape[0]:
        raise PairedInputError("arm and reference must have the same seeds (rows)")
    return y, a, r


def delong_per_run(y_true: ArrayLike, arm: ArrayLike, reference: ArrayLike) -> list[DeLongResult]:
    """DeLong's paired test for each seed's two runs (rows of ``(S, N)`` score arrays).

    >>> r = delong_per_run([0, 0, 1, 1], [[0.1, 0.2, 0.8, 0.9]], [[0.1, 0.9, 0.8, 0.2]])[0]
    >>> r.diff, r.se  # AUROC 1.0 against 0.5
    (0.5, 0.5)
    """
    y, a, r = _run_pairs(y_true, arm, reference)
    out = []
    for j in range(a.shape[0]):
        diff, se = delong(y, r[j], a[j])
        if se > 0:
            z = diff / se
            p = float(2 * norm.sf(abs(z)))
        else:  # no case-level variation (identical or perfectly separating scores)
            z = 0.0 if diff == 0 else math.copysign(math.inf, diff)
            p = 1.0 if diff == 0 else 0.0
        out.append(DeLongResult(seed_index=j, diff=diff, se=se, z=z, p=p))
    return out


def auroc_correlation(y_true: ArrayLike, arm: ArrayLike, reference: ArrayLike) -> list[float]:
    """For each seed's two runs (rows of ``(S, N)`` score arrays), the correlation of their AUROC
    estimates over cases, from DeLong's covariance matrix: the ``correlation`` that
    :func:`paired_difference_power` and :func:`cases_for_power` take (NaN where a run's AUROC has
    no case-level variance, e.g. a perfectly separating or a constant score).

    >>> y, s = [0, 0, 0, 1, 1, 1], [[0.1, 0.4, 0.35, 0.8, 0.3, 0.9]]
    >>> round(auroc_correlation(y, s, s)[0], 6)  # a run against itself
    1.0
    """
    y, a, r = _run_pairs(y_true, arm, reference)
    out = []
    for j in range(a.shape[0]):
        _, cov = delong_covariance(y, r[j], a[j])
        denom = math.sqrt(max(cov[0, 0], 0.0) * max(cov[1, 1], 0.0))
        out.append(float(cov[0, 1] / denom) if denom > 0 else math.nan)
    return out


def auroc_variance(auroc: float, n_positive: int, n_negative: int) -> float:
    """Hanley and McNeil's (1982) variance of an AUROC estimated on ``n_positive`` and
    ``n_negative`` cases (exponential approximation of the score distributions).

    >>> round(auroc_variance(0.9, 50, 50) ** 0.5, 4)  # Q1 = 0.818, Q2 = 0.853: by hand, 0.0321
    0.0321
    """
    if not 0.0 < auroc < 1.0:
        raise PairedInputError(f"auroc must lie in (0, 1), got {auroc!r}")
    if n_positive < 1 or n_negative < 1:
        raise PairedInputError("need at least one positive and one negative case")
    q1 = auroc / (2.0 - auroc)
    q2 = 2.0 * auroc**2 / (1.0 + auroc)
    return (
        auroc * (1.0 - auroc)
        + (n_positive - 1) * (q1 - auroc**2)
        + (n_negative - 1) * (q2 - auroc**2)
    ) / (n_positive * n_negative)


def paired_difference_power(
    delta: float,
    auroc: float,
    n_positive: int,
    n_negative: int,
    correlation: float,
    alpha: float = 0.05,
) -> float:
    """Power of a two-sided paired test (DeLong's, to the normal approximation) to detect an AUROC
    difference ``delta`` between two models scored on the same cases.

    The reference model's AUROC is ``auroc``, the other's ``auroc + delta``; ``correlation`` is the
    correlation of the two AUROC estimates over case samples (Hanley and McNeil 1983: about
    0.3-0.7 for two readings of the same cases; measure it on the runs with :func:`delong_per_run`'s
    data). Var(diff) = V1 + V2 - 2 r sqrt(V1 V2).

    >>> round(paired_difference_power(0.05, 0.85, 100, 100, 0.5), 2)
    0.5
    """
    if not -1.0 <= correlation <= 1.0:
        raise PairedInputError(f"correlation must lie in [-1, 1], got {correlation!r}")
    if not 0.0 < alpha < 1.0:
        raise PairedInputError(f"alpha must lie in (0, 1), got {alpha!r}")
    v1 = auroc_variance(auroc, n_positive, n_negative)
    v2 = auroc_variance(min(auroc + delta, 1.0 - 1e-9), n_positive, n_negative)
    se = math.sqrt(max(v1 + v2 - 2.0 * correlation * math.sqrt(v1 * v2), 0.0))
    if se == 0.0:
        return 1.0 if delta else alpha
    z = norm.isf(alpha / 2.0)
    shift = abs(delta) / se
    return float(norm.cdf(shift - z) + norm.cdf(-shift - z))


def cases_for_power(
    delta: float,
    auroc: float,
    prevalence: float,
    correlation: float,
    power: float = 0.8,
    alpha: float = 0.05,
    max_cases: int = 1_000_000,
) -> int:
    """The fewest cases (positives at ``prevalence``) at which :func:`paired_difference_power`
    reaches ``power``.

    >>> cases_for_power(0.05, 0.85, 0.4, 0.5)
    472
    """
    if not 0.0 < prevalence < 1.0:
        raise PairedInputError(f"prevalence must lie in (0, 1), got {prevalence!r}")
    if not 0.0 < power < 1.0:
        raise PairedInputError(f"power must lie in (0, 1), got {power!r}")

    def reached(n: int) -> bool:
        n_pos = max(1, round(n * prevalence))
        n_neg = max(1, n - n_pos)
        return paired_difference_power(delta, auroc, n_pos, n_neg, correlation, alpha) >= power

    lo, hi = 4, 8
    while not reached(hi):
        lo, hi = hi, hi * 2
        if hi > max_cases:
            raise PairedInputError(
                f"more than {max_cases} cases would be needed for power {power} at delta {delta}"
            )
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if reached(mid) else (mid, hi)
    return hi
