"""Is a test set big enough? The power of the paired comparison of two arms on each unseen
scanner's set, from its class counts (:mod:`shiftguard.experiment.stats`).

The correlation between two arms' AUROC estimates on the same cases is not known before the runs
(Hanley and McNeil 1983 saw about 0.3-0.7 between readings of the same images), so the table gives
the power at several, and the cases each would need.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from shiftguard.errors import DesignInputError
from shiftguard.experiment.stats import cases_for_power, paired_difference_power


@dataclass(frozen=True)
class DesignRow:
    """One set's power to detect ``delta`` at each assumed correlation, and the cases needed."""

    group: str
    n_positive: int
    n_negative: int
    power: dict[float, float]
    cases_needed: dict[float, int]


def class_counts(
    dataset_csv: Path, split: str = "external", by: str = "scanner_model"
) -> dict[str, tuple[int, int]]:
    """``{group: (positives, negatives)}`` of the series of ``split`` in a split table
    (``artifacts/split/dataset.csv``), grouped by the column ``by``.

    Raises:
        DesignInputError: the file is missing or lacks a column, a finding is not 0/1, or no series
            is in ``split``.
    """
    path = Path(dataset_csv)
    if not path.is_file():
        raise DesignInputError(f"{path}: no such split table (artifacts/split/dataset.csv)")
    counts: Counter[tuple[str, int]] = Counter()
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"split", "finding", by} - set(reader.fieldnames or ())
        if missing:
            raise DesignInputError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        for line, row in enumerate(reader, start=2):
            if row["split"] != split:
                continue
            if row["finding"] not in ("0", "1"):
                raise DesignInputError(
                    f"{path}:{line}: finding must be 0 or 1, got {row['finding']!r}"
                )
            counts[(row[by], int(row["finding"]))] += 1
    if not counts:
        raise DesignInputError(f"{path}: no series in split {split!r}")
    groups = sorted({g for g, _ in counts})
    return {g: (counts[(g, 1)], counts[(g, 0)]) for g in groups}


def design_table(
    counts: Mapping[str, tuple[int, int]],
    delta: float = 0.05,
    auroc: float = 0.85,
    correlations: Sequence[float] = (0.3, 0.5, 0.7),
    power: float = 0.8,
    alpha: float = 0.05,
) -> list[DesignRow]:
    """Each set's power to detect an AUROC difference ``delta`` (reference AUROC ``auroc``) with a
    two-sided paired test at level ``alpha``, and the cases (at the set's prevalence) that reach
    ``power``, for each assumed correlation.

    >>> row = design_table({"scanner": (120, 180)}, correlations=(0.5,))[0]
    >>> round(row.power[0.5], 2), row.cases_needed[0.5]
    (0.61, 472)
    """
    rows = []
    for group, (n_pos, n_neg) in counts.items():
        if n_pos < 1 or n_neg < 1:
            raise DesignInputError(f"{group}: needs positives and negatives, got {n_pos}, {n_neg}")
        prevalence = n_pos / (n_pos + n_neg)
        rows.append(
            DesignRow(
                group=group,
                n_positive=n_pos,
                n_negative=n_neg,
                power={
                    r: paired_difference_power(delta, auroc, n_pos, n_neg, r, alpha)
                    for r in correlations
                },
                cases_needed={
                    r: cases_for_power(delta, auroc, prevalence, r, power, alpha)
                    for r in correlations
                },
            )
        )
    return rows
