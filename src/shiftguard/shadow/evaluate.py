"""The shadow log joined with the verified diagnoses, judged overall and per segment.

Predictions wait in the shadow log until their study's verified diagnosis arrives; a study without
one yet is counted as pending, never dropped. Each role (champion, challenger) is judged on the
studies that have a verdict, with :func:`~shiftguard.evaluation.segments.segment_table` (AUROC,
sensitivity and specificity at the bundle's threshold, bootstrap CIs, segments too small to judge
marked as such). A judgeable segment is flagged when its upper confidence bound is below the
overall figure, or below the validation stage's figure for the same segment when that is known.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from shiftguard.evaluation.segments import SEGMENT_METRICS, segment_table
from shiftguard.shadow.diagnoses import DiagnosisBook

SEGMENTS = ("sex", "age_band", "site", "manufacturer", "scanner_model")


@dataclass
class ShadowEvaluation:
    """One role's evaluation."""

    role: str
    n_predictions: int
    n_pending: int  # predictions whose study has no verified diagnosis yet
    joined: pd.DataFrame
    segments: pd.DataFrame

    @property
    def flagged(self) -> pd.DataFrame:
        return self.segments[self.segments["flagged"]]


def join(predictions: pd.DataFrame, book: DiagnosisBook) -> tuple[pd.DataFrame, int]:
    """Predictions with a ``finding`` column from the verdicts, and how many are still pending.

    Raises:
        ValueError: ``predictions`` lacks ``study_uid`` or ``probability``.
    """
    missing = [c for c in ("study_uid", "probability") if c not in predictions]
    if missing:
        raise ValueError(f"shadow log: lacks the column(s) {', '.join(missing)}")
    verdicts = book.verdicts()
    finding = predictions["study_uid"].map(verdicts)
    pending = int(finding.isna().sum())
    joined = predictions[finding.notna()].assign(finding=finding[finding.notna()].astype(int))
    return joined.reset_index(drop=True), pending


def evaluate(
    predictions: pd.DataFrame,
    book: DiagnosisBook,
    threshold: float,
    by: Sequence[str] = SEGMENTS,
    validation: pd.DataFrame | None = None,
    min_n: int = 20,
    min_positive: int = 5,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, ShadowEvaluation]:
    """Each role's :class:`ShadowEvaluation` (``role`` column; ``champion`` when absent).
    ``validation``: the validate stage's segment table (``column, segment, auroc, sensitivity,
    specificity``), for the gap to validation and the flags against it."""
    frame = predictions if "role" in predictions else predictions.assign(role="champion")
    out = {}
    for role, rows in frame.groupby("role", sort=True):
        joined, pending = join(rows, book)
        columns = [c for c in by if c in joined]
        table = pd.DataFrame()
        if len(joined) and joined["finding"].nunique() == 2:
            table = segment_table(
                joined, columns, score_col="probability", label_col="finding",
                threshold=threshold, min_n=min_n, min_positive=min_positive,
                n_boot=n_boot, seed=seed,
            )  # fmt: skip
            table = _flag(table, joined, threshold, validation)
        out[str(role)] = ShadowEvaluation(str(role), len(rows), pending, joined, table)
    return out


def _flag(
    table: pd.DataFrame, joined: pd.DataFrame, threshold: float, validation: pd.DataFrame | None
) -> pd.DataFrame:
    from shiftguard.evaluation.metrics import auroc, sensitivity_specificity

    y, s = joined["finding"].to_numpy(), joined["probability"].to_numpy(dtype=float)
    sens, spec = sensitivity_specificity(y, s, threshold)
    overall = {"auroc": auroc(y, s), "sensitivity": sens, "specificity": spec}
    table = table.copy()
    reasons: list[str] = []
    for index, row in table.iterrows():
        why = []
        if row["judgeable"]:
            for m in SEGMENT_METRICS:
                high = row.get(f"{m}_high")
                if high is not None and np.isfinite(high) and high < overall[m]:
                    why.append(f"{m} CI up to {high:.3f} < overall {overall[m]:.3f}")
                val = _validation_value(validation, row["column"], row["segment"], m)
                if val is not None and high is not None and np.isfinite(high) and high < val:
                    table.loc[index, f"{m}_validation"] = val
                    why.append(f"{m} CI up to {high:.3f} < validation {val:.3f}")
        reasons.append("; ".join(why))
    table["flag_reason"] = reasons
    table["flagged"] = [bool(r) for r in reasons]
    return table


def _validation_value(
    validation: pd.DataFrame | None, column: str, segment: str, metric: str
) -> float | None:
    if validation is None or metric not in validation:
        return None
    match = validation[(validation["column"] == column) & (validation["segment"] == segment)]
    if match.empty or pd.isna(match[metric].iloc[0]):
        return None
    return float(match[metric].iloc[0])


def summary(evaluations: Mapping[str, ShadowEvaluation]) -> dict[str, Any]:
    return {
        role: {
            "predictions": e.n_predictions,
            "pending": e.n_pending,
            "judged": len(e.joined),
            "flagged": e.flagged[["column", "segment", "flag_reason"]].to_dict("records")
            if len(e.segments)
            else [],
        }
        for role, e in evaluations.items()
    }
