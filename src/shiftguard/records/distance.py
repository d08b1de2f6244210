"""Drift distances between a feature's reference values and a window's, numpy only: shared by
the central monitor (:mod:`shiftguard.monitor.score`) and the edge, which judges its own outputs
after it swaps a bundle in (:func:`output_score`).

>>> rng = np.random.default_rng(0)
>>> reference = {"probability": rng.beta(1, 3, 200)}
>>> same = {"probability": rng.beta(1, 3, 30)}
>>> moved = {"probability": rng.beta(3, 1, 30)}
>>> output_score(reference, same) < 3.0 < output_score(reference, moved)
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

MIN_SPREAD = 0.02  # floor of a feature's null spread, so a constant feature cannot explode


def distance(reference: np.ndarray, current: np.ndarray, kind: str) -> float | None:
    """A feature's drift distance: the two-sample Kolmogorov-Smirnov statistic D for numbers,
    the Jensen-Shannon distance (natural log) of the value frequencies for categories. Missing
    values are left out; None when either side has none.

    >>> distance(np.array([0.0, 1, 2, 3]), np.array([10.0, 11]), "numerical")
    1.0
    >>> round(distance(np.array(["a", "a", "b"], dtype=object), np.array(["a"], dtype=object), "categorical"), 3)
    0.364
    """
    if kind == "numerical":
        a = np.sort(reference[np.isfinite(reference)])
        b = np.sort(current[np.isfinite(current)])
        if a.size == 0 or b.size == 0:
            return None
        points = np.concatenate([a, b])
        cdf_a = np.searchsorted(a, points, side="right") / a.size
        cdf_b = np.searchsorted(b, points, side="right") / b.size
        return float(np.max(np.abs(cdf_a - cdf_b)))
    ref_values = [v for v in reference if v is not None]
    cur_values = [v for v in current if v is not None]
    if not ref_values or not cur_values:
        return None
    values = sorted(set(ref_values) | set(cur_values))
    index = {v: i for i, v in enumerate(values)}
    p = np.bincount([index[v] for v in ref_values], minlength=len(values)) / len(ref_values)
    q = np.bincount([index[v] for v in cur_values], minlength=len(values)) / len(cur_values)
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(p > 0, p * np.log(p / m), 0.0).sum()
        kl_q = np.where(q > 0, q * np.log(q / m), 0.0).sum()
    return float(math.sqrt(max((kl_p + kl_q) / 2, 0.0)))


def output_score(
    reference: Mapping[str, np.ndarray],
    window: Mapping[str, np.ndarray],
    bootstrap: int = 200,
    seed: int = 0,
) -> float:
    """The monitor's output score of one window: per numerical feature the Kolmogorov-Smirnov
    distance to the reference, as a z-score against windows of the same size drawn from the
    reference itself (``bootstrap`` of them), averaged over the features. NaN when no feature
    has values on both sides.

    Args:
        reference: feature name -> the reference's values ``(N,)`` (NaN: missing).
        window: feature name -> the window's values ``(n,)``.
    """
    scores = []
    for name, values in reference.items():
        ref = np.asarray(values, dtype=np.float64)
        ref = ref[np.isfinite(ref)]
        current = np.asarray(window.get(name, ()), dtype=np.float64)
        current = current[np.isfinite(current)]
        observed = distance(ref, current, "numerical")
        if observed is None or ref.size < 2:
            continue
        rng = np.random.default_rng([seed, current.size])
        null = [
            distance(  # never None: both samples are non-empty
                ref[rng.integers(0, ref.size, ref.size)],
                ref[rng.integers(0, ref.size, current.size)],
                "numerical",
            )
            for _ in range(bootstrap)
        ]
        values = np.array(null, dtype=np.float64)
        spread = max(float(np.std(values)), MIN_SPREAD)
        scores.append((observed - float(np.mean(values))) / spread)
    return float(np.mean(scores)) if scores else math.nan
