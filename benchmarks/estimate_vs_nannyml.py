"""Benchmark: ShiftGuard's CBPE against NannyML's CBPE on the same window of calibrated outputs.

Builds, with a fixed seed, a labelled reference and one window of ``--rows`` studies each (default
10,000): calibrated probabilities ``p ~ Beta(2, 5)`` and labels ``y ~ Bernoulli(p)`` (the window's
labels are only used to print its realised metrics). Then, in the same run:

* :func:`shiftguard.monitor.performance.cbpe` on the window's probabilities, the median of
  ``--runs`` calls (point estimates and the ``--draws``-draw interval), and with 1 draw (about
  the cost of the point estimates alone);
* NannyML's ``CBPE`` (``problem_type="classification_binary"``, metrics ``roc_auc``, ``recall``
  (the sensitivity) and ``specificity``, one chunk holding the whole window), fitted once on the
  reference (it fits its calibrator there; with ``--no-calibration`` it gets a ``NoopCalibrator``,
  so both estimate from the very same probabilities), then ``estimate(window)``, the median of
  ``--nannyml-runs`` calls;

and prints both times, the ratio ours / NannyML, each side's estimate and interval per metric,
their difference, and the window's realised metric. The AUROCs differ by design in ``O(1/N)``:
ours is the ratio of expectations over distinct pairs, NannyML's the area under the expected ROC
curve (which counts each study against itself at half credit and rounds the expected counts to 5
decimals). NannyML's interval is its estimate plus or minus 3 sampling errors (derived from the
reference); ours is the 2.5 and 97.5 percentiles of the realised metric over Bernoulli label
draws. Nothing is asserted; it prints figures.

Needs NannyML (``pip install -e '.[bench]'``).

Usage::

    python benchmarks/estimate_vs_nannyml.py                  # 10,000 studies, NannyML's calibration
    python benchmarks/estimate_vs_nannyml.py --no-calibration # both on identical probabilities
    python benchmarks/estimate_vs_nannyml.py --rows 100000 --nannyml-runs 1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Any

import numpy as np
import pandas as pd

from shiftguard.metrics import auroc, sensitivity_specificity
from shiftguard.monitor.performance import WindowEstimate, cbpe

SEED = 20261205
THRESHOLD = 0.3
# NannyML's metric name -> ours
METRICS = {"roc_auc": "auroc", "recall": "sensitivity", "specificity": "specificity"}


def make_data(rows: int, seed: int = SEED) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A labelled reference and a window, ``rows`` studies each: ``p``, ``y`` and ``pred``."""
    rng = np.random.default_rng(seed)

    def frame() -> pd.DataFrame:
        p = rng.beta(2.0, 5.0, rows)
        y = (rng.random(rows) < p).astype(np.int64)
        return pd.DataFrame({"p": p, "y": y, "pred": (p >= THRESHOLD).astype(np.int64)})

    return frame(), frame()


def nannyml_estimator(calibrate: bool) -> Any:
    """NannyML's CBPE over one chunk with our metrics; its default isotonic calibrator or none."""
    import nannyml as nml
    from nannyml.calibration import NoopCalibrator

    return nml.CBPE(
        y_pred_proba="p",
        y_pred="pred",
        y_true="y",
        problem_type="classification_binary",
        metrics=list(METRICS),
        chunk_number=1,
        calibrator=None if calibrate else NoopCalibrator(),
    )


def nannyml_values(result: Any) -> dict[str, tuple[float, float, float]]:
    """``{our metric: (value, lower, upper)}`` from NannyML's result of one chunk."""
    df = result.filter(period="analysis").to_df()
    out = {}
    for theirs, ours in METRICS.items():
        out[ours] = (
            float(df[(theirs, "value")].iloc[0]),
            float(df[(theirs, "lower_confidence_boundary")].iloc[0]),
            float(df[(theirs, "upper_confidence_boundary")].iloc[0]),
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000, help="studies in reference and window")
    parser.add_argument("--runs", type=int, default=7, help="cbpe repeats (median)")
    parser.add_argument("--nannyml-runs", type=int, default=5, help="NannyML repeats (median)")
    parser.add_argument("--draws", type=int, default=1000, help="cbpe's label draws")
    parser.add_argument(
        "--no-calibration",
        action="store_true",
        help="give NannyML a NoopCalibrator: both estimate from identical probabilities",
    )
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)

    os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")  # no usage statistics sent
    try:
        import nannyml
    except ImportError:
        print("NannyML is not installed: pip install -e '.[bench]'", file=sys.stderr)
        return 2

    reference, window = make_data(args.rows, args.seed)
    prob = window["p"].to_numpy()
    print(
        f"{args.rows} studies per table, threshold {THRESHOLD}; NannyML {nannyml.__version__}; "
        f"{os.cpu_count()} CPU(s) ({platform.processor() or platform.machine()}), load average "
        f"{os.getloadavg()[0]:.1f}",
        flush=True,
    )

    cbpe(prob, THRESHOLD, n_draws=args.draws)  # warm-up
    ours_times = []
    ours: WindowEstimate | None = None
    for _ in range(args.runs):
        started = time.perf_counter()
        ours = cbpe(prob, THRESHOLD, n_draws=args.draws, seed=args.seed)
        ours_times.append(time.perf_counter() - started)
    assert ours is not None
    ours_time = statistics.median(ours_times)
    point_times = []  # one draw: the point estimates, what is left without the interval
    for _ in range(args.runs):
        started = time.perf_counter()
        cbpe(prob, THRESHOLD, n_draws=1, seed=args.seed)
        point_times.append(time.perf_counter() - started)
    point_time = statistics.median(point_times)

    unlabelled = window.drop(columns="y")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        estimator = nannyml_estimator(not args.no_calibration)
        started = time.perf_counter()
        estimator.fit(reference)
        fit_time = time.perf_counter() - started
        their_times = []
        result = None
        for _ in range(args.nannyml_runs):
            started = time.perf_counter()
            result = estimator.estimate(unlabelled)
            their_times.append(time.perf_counter() - started)
    their_time = statistics.median(their_times)
    theirs = nannyml_values(result)

    y = window["y"].to_numpy()
    sens, spec = sensitivity_specificity(y, prob, THRESHOLD)
    real = {"auroc": auroc(y, prob), "sensitivity": sens, "specificity": spec}

    calibrated = "isotonic" if estimator.needs_calibration else "none (its check found no need)"
    if args.no_calibration:
        calibrated = "none (NoopCalibrator)"
    print(f"NannyML's calibration of the probabilities: {calibrated}")
    print(f"\n{'step':48s} {'seconds':>9s}")
    print(f"{f'ShiftGuard cbpe, {args.draws} draws (median of {args.runs})':48s} {ours_time:9.4f}")
    print(f"{f'ShiftGuard cbpe, 1 draw (median of {args.runs})':48s} {point_time:9.4f}")
    print(f"{'NannyML CBPE.fit(reference) (once)':48s} {fit_time:9.4f}")
    print(
        f"{f'NannyML CBPE.estimate(window) (median of {args.nannyml_runs})':48s} {their_time:9.4f}"
    )
    print(f"ratio ShiftGuard / NannyML estimate: {ours_time / their_time:.4f}")
    print(f"ratio ShiftGuard / NannyML fit + estimate: {ours_time / (fit_time + their_time):.4f}")

    print(
        f"\n{'metric':12s} {'ShiftGuard [interval]':>28s} {'NannyML [interval]':>28s} "
        f"{'ours - NannyML':>15s} {'realised':>9s}"
    )
    for name in METRICS.values():
        m = ours.metrics[name]
        value, low, high = theirs[name]
        print(
            f"{name:12s} {m.value:8.4f} [{m.low:.4f}, {m.high:.4f}] "
            f"{value:8.4f} [{low:.4f}, {high:.4f}] {m.value - value:15.2e} {real[name]:9.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
