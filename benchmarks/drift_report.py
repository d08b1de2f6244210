"""Benchmark: ShiftGuard's drift engine against Evidently's DataDriftPreset on the same window.

Builds a reference and a current table of ``--rows`` rows (default 10,000) and 64 features, with a
fixed seed: 56 numerical (normal, assorted means and scales, 1 % missing; 8 of them shifted in the
current window by 0.05 to 0.4 standard deviations) and 8 categorical (3 to 6 categories; 3 of them
with shifted frequencies). Then times, in the same run:

* :class:`shiftguard.monitor.drift.DriftEngine` construction, once (sorting the reference);
* ``DriftEngine.run(current)``, the median of ``--runs`` calls: refreshing one window's drift result;
* ``Report([DataDriftPreset()]).run(current, reference)`` on the raw frames (Evidently's automatic
  typing gives the same kinds), the median of ``--evidently-runs`` calls;

and prints both times, the ratio ours / Evidently (the target is at most 0.25), and the columns whose
test, score (relative 1e-6) or verdict differ between the two (there must be none). Evidently's
verdict is read from its score and threshold with its own rules (``<=`` for ks, ``<`` for the other
p-values, ``>=`` for distances) and its count of drifted columns is checked against ours. Nothing
is asserted; it prints figures.

Usage::

    python benchmarks/drift_report.py                    # 10,000 rows, 3 Evidently runs
    python benchmarks/drift_report.py --rows 100000 --evidently-runs 1
    python benchmarks/drift_report.py --rows 800         # small reference: ks, chisquare, z
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Any

import numpy as np
import pandas as pd

from shiftguard.monitor.drift import CATEGORICAL, NUMERICAL, DriftEngine, DriftResult

N_NUMERICAL = 56
N_CATEGORICAL = 8
SEED = 20240611

# display name stored in Evidently's snapshot -> test name
DISPLAY_TO_NAME = {
    "K-S p_value": "ks",
    "chi-square p_value": "chisquare",
    "Z-test p_value": "z",
    "Wasserstein distance (normed)": "wasserstein",
    "Jensen-Shannon distance": "jensenshannon",
}


def make_frames(rows: int, seed: int = SEED) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, str]]:
    """A reference and a current table, ``(rows, 64)`` each, and the columns' kinds."""
    rng = np.random.default_rng(seed)
    reference: dict[str, Any] = {}
    current: dict[str, Any] = {}
    kinds: dict[str, str] = {}
    shifts = np.zeros(N_NUMERICAL)
    shifts[:8] = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4]
    for i in range(N_NUMERICAL):
        name = f"num_{i:02d}"
        mean, scale = rng.normal(0, 10), rng.uniform(0.5, 5)
        ref = rng.normal(mean, scale, rows)
        cur = rng.normal(mean + shifts[i] * scale, scale, rows)
        ref[rng.random(rows) < 0.01] = np.nan
        cur[rng.random(rows) < 0.01] = np.nan
        reference[name], current[name], kinds[name] = ref, cur, NUMERICAL
    for i in range(N_CATEGORICAL):
        name = f"cat_{i}"
        n_cat = 3 + i % 4
        levels = np.array([f"level_{k}" for k in range(n_cat)], dtype=object)
        p = rng.dirichlet(np.full(n_cat, 5.0))
        q = rng.dirichlet(np.full(n_cat, 5.0)) if i < 3 else p
        reference[name] = rng.choice(levels, rows, p=p)
        current[name] = rng.choice(levels, rows, p=q)
        kinds[name] = CATEGORICAL
    return pd.DataFrame(reference), pd.DataFrame(current), kinds


def evidently_run(reference: pd.DataFrame, current: pd.DataFrame) -> tuple[float, Any]:
    """Seconds for ``Report([DataDriftPreset()]).run(current, reference)``, and the snapshot."""
    from evidently import Report
    from evidently.presets import DataDriftPreset

    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snapshot = Report([DataDriftPreset()]).run(current, reference)
    return time.perf_counter() - started, snapshot


def evidently_columns(snapshot: Any) -> tuple[dict[str, tuple[str, float, bool]], int]:
    """``{column: (test, score, drifted)}`` and Evidently's count of drifted columns."""
    out: dict[str, tuple[str, float, bool]] = {}
    count = -1
    for m in snapshot.dict()["metrics"]:
        cfg = m["config"]
        if cfg["type"] == "evidently:metric_v2:ValueDrift":
            test = DISPLAY_TO_NAME.get(cfg["method"], cfg["method"])
            score, threshold = float(m["value"]), float(cfg["threshold"])
            if test == "ks":
                drifted = score <= threshold
            elif test in ("chisquare", "z"):
                drifted = score < threshold
            else:
                drifted = score >= threshold
            out[cfg["column"]] = (test, score, drifted)
        elif cfg["type"] == "evidently:metric_v2:DriftedColumnsCount":
            count = int(m["value"]["count"])
    return out, count


def compare(ours: DriftResult, theirs: dict[str, tuple[str, float, bool]]) -> list[str]:
    """One line per column whose test, score or verdict differs (or that one side lacks)."""
    lines = []
    for column in sorted(set(ours.columns) | set(theirs)):
        if column not in ours.columns or column not in theirs:
            side = "ShiftGuard" if column not in ours.columns else "Evidently"
            lines.append(f"{column}: missing from {side}")
            continue
        c = ours.columns[column]
        test, score, drifted = theirs[column]
        same_score = math.isclose(c.score, score, rel_tol=1e-6, abs_tol=1e-300)
        if c.test != test or not same_score or c.drifted != drifted:
            lines.append(
                f"{column}: ShiftGuard {c.test} {c.score:.6g} drifted={c.drifted} | "
                f"Evidently {test} {score:.6g} drifted={drifted}"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000, help="rows per table")
    parser.add_argument("--runs", type=int, default=7, help="DriftEngine.run repeats (median)")
    parser.add_argument("--evidently-runs", type=int, default=3, help="Evidently repeats (median)")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)

    reference, current, kinds = make_frames(args.rows, args.seed)
    print(
        f"{args.rows} rows x {len(kinds)} features ({N_NUMERICAL} numerical, {N_CATEGORICAL} "
        f"categorical) per table; {os.cpu_count()} CPU(s) "
        f"({platform.processor() or platform.machine()})",
        flush=True,
    )

    started = time.perf_counter()
    engine = DriftEngine(reference, kinds)
    build = time.perf_counter() - started
    engine.run(current)  # warm-up
    ours_times = []
    for _ in range(args.runs):
        started = time.perf_counter()
        result = engine.run(current)
        ours_times.append(time.perf_counter() - started)
    ours = statistics.median(ours_times)

    evidently_times = []
    snapshot = None
    for i in range(args.evidently_runs):
        seconds, snapshot = evidently_run(reference, current)
        evidently_times.append(seconds)
        print(f"  Evidently run {i + 1}/{args.evidently_runs}: {seconds:.2f} s", flush=True)
    theirs = statistics.median(evidently_times)
    their_columns, their_count = evidently_columns(snapshot)
    differences = compare(result, their_columns)

    tests = pd.Series([c.test for c in result.columns.values()]).value_counts().to_dict()
    print(f"\ntests chosen: {tests}")
    print(f"{'step':44s} {'seconds':>9s}")
    print(f"{'DriftEngine(reference, kinds) (once)':44s} {build:9.4f}")
    print(f"{f'DriftEngine.run(current) (median of {args.runs})':44s} {ours:9.4f}")
    label = f"Evidently DataDriftPreset (median of {args.evidently_runs})"
    print(f"{label:44s} {theirs:9.4f}")
    print(f"ratio ShiftGuard run / Evidently: {ours / theirs:.4f}  (target <= 0.25)")
    print(f"ratio ShiftGuard build + run / Evidently: {(build + ours) / theirs:.4f}")
    print(f"speed-up of run: {theirs / ours:.0f}x")
    print(
        f"drifted columns: ShiftGuard {result.n_drifted}, Evidently {their_count}; "
        f"share {result.share:.4f}, dataset drift {result.dataset_drift()}"
    )
    print(f"columns whose test, score or verdict differ: {len(differences)}")
    for line in differences:
        print(f"  {line}")
    return 0 if not differences and result.n_drifted == their_count else 1


if __name__ == "__main__":
    sys.exit(main())
