"""How good the label-free performance estimates are, where the truth is known.

The drift scenarios' pools (:mod:`shiftguard.monitor.scenarios`) are simulated studies run through
the edge runner, and each carries its verified finding. That makes them a test bed for
:class:`~shiftguard.monitor.performance.PerformanceEstimator`: draw windows from a condition's
pool (the training scanners, each unseen scanner, a protocol change), estimate each window's
AUROC, sensitivity and specificity without its labels, and compare with what the window's labels
say (:func:`~shiftguard.monitor.performance.realised`). Per condition, method and metric, :func:`summarise` gives the mean
realised and estimated value, the bias, the mean absolute error and the coverage of the estimate's
interval (the share of windows whose realised value lies inside it).

Windows are drawn with replacement from a pool, so a pool of 50 studies yields as many windows of
50 as asked: each window is a sample from the pool's studies, and the pool is the population the
figures describe. They say how the estimator behaves on that population, not on the scanner in
general; a pool's own size bounds what it can show.

:func:`harm` says whether a condition hurts the model: its pool's realised sensitivity against the
bundle's labelled held-out reference, with the margin the performance alert rule uses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from shiftguard.monitor.performance import PerformanceEstimator, realised

METRICS = ("auroc", "sensitivity", "specificity")
#: the columns of :func:`window_table`'s rows
WINDOW_COLUMNS = (
    "condition", "window", "method", "metric", "realised", "estimate", "low", "high",
    "supported", "ess",
)  # fmt: skip


def window_table(
    pools: Mapping[str, pd.DataFrame],
    estimator: PerformanceEstimator,
    window_size: int,
    n_windows: int,
    seed: int,
) -> pd.DataFrame:
    """Every window's realised and estimated metrics: ``n_windows`` windows of ``window_size``
    drawn with replacement from each pool (``pools``: condition label -> records with
    ``probability`` and ``finding``), one row per window, method and metric
    (:data:`WINDOW_COLUMNS`)."""
    rows: list[dict[str, Any]] = []
    for k, (condition, pool) in enumerate(sorted(pools.items())):
        rng = np.random.default_rng([seed, k])
        for w in range(n_windows):
            window = pool.iloc[rng.integers(0, len(pool), window_size)].reset_index(drop=True)
            truth = realised(
                window["finding"].to_numpy(), window["probability"].to_numpy(), estimator.threshold
            )
            for method, found in estimator.window(window).items():
                for metric in METRICS:
                    est = found.metrics[metric]
                    rows.append(
                        {
                            "condition": condition,
                            "window": w,
                            "method": method,
                            "metric": metric,
                            "realised": truth[metric],
                            "estimate": est.value,
                            "low": est.low,
                            "high": est.high,
                            "supported": bool(found.supported),
                            "ess": found.ess,
                        }
                    )
    return pd.DataFrame(rows, columns=list(WINDOW_COLUMNS))


def summarise(windows: pd.DataFrame) -> pd.DataFrame:
    """Per condition, method and metric: windows drawn, windows the method supported, and over the
    supported windows with a defined realised value: the mean realised and estimated value, the
    bias (estimated minus realised), the mean absolute error, and the interval's coverage."""
    out = []
    for (condition, method, metric), part in windows.groupby(
        ["condition", "method", "metric"], sort=True
    ):
        used = part[part["supported"] & part["realised"].notna() & part["estimate"].notna()]
        error = used["estimate"] - used["realised"]
        inside = (used["low"] <= used["realised"]) & (used["realised"] <= used["high"])
        out.append(
            {
                "condition": condition,
                "method": method,
                "metric": metric,
                "windows": len(part),
                "supported": int(part["supported"].sum()),
                "realised": _mean(used["realised"]),
                "estimated": _mean(used["estimate"]),
                "bias": _mean(error),
                "mae": _mean(error.abs()),
                "coverage": _mean(inside.astype(float)),
            }
        )
    return pd.DataFrame(out)


def harm(
    pool: pd.DataFrame, threshold: float, reference: Mapping[str, float], margin: float
) -> dict[str, Any]:
    """Whether a condition hurts the model: its pool's realised metrics and their drop from the
    ``reference`` (the bundle's labelled held-out series); harmful when the sensitivity falls by
    ``margin`` or more."""
    truth = realised(pool["finding"].to_numpy(), pool["probability"].to_numpy(), threshold)
    drop = {m: reference.get(m, math.nan) - truth[m] for m in METRICS}
    return {
        "n": len(pool),
        "n_positive": int(pool["finding"].sum()),
        **{f"realised_{m}": _round(truth[m]) for m in METRICS},
        **{f"drop_{m}": _round(drop[m]) for m in METRICS},
        "harmful": bool(math.isfinite(drop["sensitivity"]) and drop["sensitivity"] >= margin),
    }


def _mean(values: pd.Series) -> float | None:
    return _round(float(values.mean())) if len(values) else None


def _round(value: float, digits: int = 4) -> float | None:
    return round(value, digits) if math.isfinite(value) else None
