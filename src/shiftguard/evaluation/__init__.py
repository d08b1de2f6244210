"""Evaluation: the metrics of the validation stage for the binary finding classifier.

* :mod:`shiftguard.metrics`: AUROC, ROC curve, operating point (chosen on validation,
  applied to test), sensitivity/specificity, calibration (ECE, reliability curve), percentile
  bootstrap CIs and :func:`binary_report`. numpy/scipy only.
* :mod:`shiftguard.evaluation.segments`: per-segment table (sex, age band, site, scanner) with gaps
  to the overall figure and a ``judgeable`` flag for segments too small to judge
  (:func:`~shiftguard.evaluation.segments.unjudgeable_reason`).
"""

from __future__ import annotations

from shiftguard.errors import MetricInputError
from shiftguard.evaluation.segments import age_bands, segment_table, unjudgeable_reason
from shiftguard.metrics import (
    ReliabilityCurve,
    auroc,
    binary_report,
    bootstrap_ci,
    choose_threshold,
    expected_calibration_error,
    reliability_curve,
    roc_curve,
    sensitivity_specificity,
)

__all__ = [
    "MetricInputError",
    "ReliabilityCurve",
    "age_bands",
    "auroc",
    "binary_report",
    "bootstrap_ci",
    "choose_threshold",
    "expected_calibration_error",
    "reliability_curve",
    "roc_curve",
    "segment_table",
    "sensitivity_specificity",
    "unjudgeable_reason",
]
