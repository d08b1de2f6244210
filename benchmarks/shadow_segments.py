"""Benchmark: ShiftGuard's per-segment shadow figures against Fairlearn's ``MetricFrame`` on the
same predictions.

Builds a shadow log of ``--studies`` studies (default 2,000) with a fixed seed: five segmenting
columns (sex, age band, site, vendor, scanner model; 2 to 6 values each), 40 % positives, a model
with AUROC about 0.95 that is weaker on one scanner. Then times, in the same run:

* ShiftGuard: :func:`shiftguard.shadow.evaluate.evaluate` for one role: the overall row and every
  segment of the five columns, AUROC, sensitivity and specificity at the threshold, ``--boot``
  stratified bootstrap resamples for 95 % CIs, and the flags (Holm-corrected tests);
* Fairlearn: one ``MetricFrame`` per segmenting column (Fairlearn slices by the *combination* of
  the sensitive features it is given, so one column at a time gives the same segments) with the
  same three metrics (scikit-learn's ``roc_auc_score`` and ``recall_score`` on the thresholded
  scores) and ``n_boot=--boot`` with quantiles 0.025 and 0.975: point values and CIs, no flags;

the median of ``--runs`` (``--peer-runs`` for Fairlearn, default 1: it takes minutes) runs, the ratio ours / Fairlearn, the largest difference between the
two point values (they must agree to 1e-12) and between the CI bounds (they differ: Fairlearn
resamples studies without stratifying by class, ShiftGuard keeps each resample's positives and
negatives). Nothing is asserted; it prints figures.

Usage::

    python benchmarks/shadow_segments.py                  # 2,000 studies, 1,000 resamples
    python benchmarks/shadow_segments.py --studies 20000 --boot 500 --runs 1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings
from typing import Any

import numpy as np
import pandas as pd

from shiftguard.shadow.diagnoses import Diagnosis, DiagnosisBook
from shiftguard.shadow.evaluate import evaluate

SEGMENTS = ("sex", "age_band", "site", "manufacturer", "scanner_model")
SCANNERS = {
    "Skyra": "SIEMENS", "Prisma": "SIEMENS", "Ingenia": "Philips", "SIGNA Artist": "GE",
    "Vantage Orian": "Canon", "Aera": "SIEMENS",
}  # fmt: skip
THRESHOLD = 0.5
SEED = 20261128


def make_log(studies: int, seed: int = SEED) -> tuple[pd.DataFrame, DiagnosisBook]:
    rng = np.random.default_rng(seed)
    finding = rng.random(studies) < 0.4
    scanner = rng.choice(list(SCANNERS), studies)
    score = 0.5 + np.where(finding, 0.22, -0.22) + rng.normal(0, 0.15, studies)
    weak = scanner == "Vantage Orian"
    score[weak] = 0.5 + np.where(finding[weak], 0.08, -0.08) + rng.normal(0, 0.15, weak.sum())
    uids = [f"1.2.826.0.1.3680043.10.{i}" for i in range(studies)]
    log = pd.DataFrame(
        {
            "study_uid": uids,
            "role": "champion",
            "probability": np.clip(score, 0, 1),
            "threshold": THRESHOLD,
            "sex": rng.choice(["F", "M"], studies),
            "age_band": rng.choice(["0-39", "40-59", "60-74", "75+"], studies),
            "site": rng.choice([f"site-{c}" for c in "ABC"], studies),
            "manufacturer": [SCANNERS[s] for s in scanner],
            "scanner_model": scanner,
        }
    )
    book = DiagnosisBook()
    book.add(
        Diagnosis(u, "2026-11-01T00:00:00Z", "r", int(f))
        for u, f in zip(uids, finding, strict=True)
    )
    return log, book


def shiftguard_table(log: pd.DataFrame, book: DiagnosisBook, boot: int) -> pd.DataFrame:
    return evaluate(log, book, THRESHOLD, SEGMENTS, n_boot=boot, min_n=20)["champion"].segments


def fairlearn_tables(log: pd.DataFrame, book: DiagnosisBook, boot: int) -> dict[str, Any]:
    from fairlearn.metrics import MetricFrame
    from sklearn.metrics import recall_score, roc_auc_score

    y = log["study_uid"].map(book.verdicts()).to_numpy()
    s = log["probability"].to_numpy()
    metrics = {
        "auroc": roc_auc_score,
        "sensitivity": lambda yt, yp: recall_score(yt, yp >= THRESHOLD, zero_division=np.nan),
        "specificity": lambda yt, yp: recall_score(
            yt, yp >= THRESHOLD, pos_label=0, zero_division=np.nan
        ),
    }
    return {
        column: MetricFrame(
            metrics=metrics,
            y_true=y,
            y_pred=s,
            sensitive_features=log[column],
            n_boot=boot,
            ci_quantiles=[0.025, 0.975],
            random_state=0,
        )
        for column in SEGMENTS
    }


def compare(ours: pd.DataFrame, theirs: dict[str, Any]) -> tuple[float, float, int]:
    """Largest point-value difference, largest CI-bound difference, segments compared."""
    point, bound, n = 0.0, 0.0, 0
    for column, frame in theirs.items():
        low, high = frame.by_group_ci
        for segment, row in frame.by_group.iterrows():
            mine = ours[(ours["column"] == column) & (ours["segment"] == str(segment))].iloc[0]
            n += 1
            for m in ("auroc", "sensitivity", "specificity"):
                point = max(point, abs(float(mine[m]) - float(row[m])))
                if mine["judgeable"]:
                    bound = max(
                        bound,
                        abs(mine[f"{m}_low"] - low.loc[segment, m]),
                        abs(mine[f"{m}_high"] - high.loc[segment, m]),
                    )
    return point, bound, n


def timed(fn: Any, runs: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(runs):
        began = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=2000)
    parser.add_argument("--boot", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3, help="ShiftGuard runs (median)")
    parser.add_argument("--peer-runs", type=int, default=1, help="Fairlearn runs (median)")
    args = parser.parse_args()
    import fairlearn

    warnings.filterwarnings("ignore")
    log, book = make_log(args.studies)
    print(
        f"{args.studies:,} studies, 5 segmenting columns, {args.boot} resamples; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s); "
        f"fairlearn {fairlearn.__version__}"
    )
    ours_s, ours = timed(lambda: shiftguard_table(log, book, args.boot), args.runs)
    theirs_s, theirs = timed(lambda: fairlearn_tables(log, book, args.boot), args.peer_runs)
    point, bound, n = compare(ours, theirs)
    flagged = ours[ours["flagged"]]
    print(f"ShiftGuard evaluate (CIs + flags):        {ours_s:8.3f} s")
    print(f"Fairlearn MetricFrame x5 (CIs, no flags): {theirs_s:8.3f} s")
    print(f"ratio ShiftGuard / Fairlearn:             {ours_s / theirs_s:8.3f}")
    print(f"{n} segments: largest point difference {point:.1e}; largest CI-bound difference "
          f"{bound:.3f} (unstratified vs stratified resampling)")  # fmt: skip
    print(
        f"flagged by ShiftGuard: {', '.join(flagged['column'] + '=' + flagged['segment']) or 'none'}"
    )


if __name__ == "__main__":
    main()
