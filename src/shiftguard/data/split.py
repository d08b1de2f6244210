"""Patient-level, stratified train/val/test split with an external (unseen scanner) test set.

The verified diagnoses come from a separate table, like a RIS export, joined on the study UID. Series
from the scanners named by ``SplitConfig.external`` form the external test set; every other patient goes
wholly into one of train, val or test, so no patient is ever in two splits.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shiftguard.config.schema import SplitConfig
from shiftguard.errors import ShiftGuardError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
EXTERNAL = "external"
UNLABELLED = "unlabelled"
DIAGNOSIS_COLUMNS = ("study_instance_uid", "finding")


class SplitInputError(ShiftGuardError, ValueError):
    """The manifest or the diagnoses table cannot be split; the message names the file and column."""


@dataclass(frozen=True)
class SplitSummary:
    """What the split produced, for ``dvc metrics``."""

    series: dict[str, int]
    patients: dict[str, int]
    positives: dict[str, int]
    moved_to_external: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    def to_metrics(self) -> dict[str, object]:
        prevalence = {
            k: round(self.positives.get(k, 0) / n, 4) for k, n in self.series.items() if n and k
        }
        return {
            "series": dict(sorted(self.series.items())),
            "patients": dict(sorted(self.patients.items())),
            "positives": dict(sorted(self.positives.items())),
            "prevalence": dict(sorted(prevalence.items())),
            "moved_to_external": self.moved_to_external,
        }


def read_csv(path: Path, required: Iterable[str]) -> list[dict[str, str]]:
    """Read a CSV into rows; fail naming the file and the missing columns."""
    if not path.is_file():
        raise SplitInputError(f"{path}: file not found")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise SplitInputError(
                f"{path}: missing column(s) {missing}; found {reader.fieldnames or []}"
            )
        return list(reader)


def allocate(counts: Sequence[int], fractions: Sequence[float]) -> list[list[int]]:
    """Share each stratum's count among splits, balanced within and across strata.

    Each stratum gets ``floor`` of its expected share per split, and the leftovers go where the running
    total lags most behind its target, so per-stratum counts are within one of their expectation and
    global totals stay within one of ``fraction * total``.

    Args:
        counts: number of patients in each stratum.
        fractions: share of each split, summing to 1.

    Returns:
        ``alloc[s][k]``: patients of stratum ``s`` that go to split ``k``.

    >>> allocate([10, 3], [0.7, 0.15, 0.15])
    [[7, 2, 1], [2, 0, 1]]
    """
    assigned = np.zeros(len(fractions))
    seen = 0
    result = []
    for n in counts:
        seen += n
        share = np.array(fractions) * n
        alloc = np.floor(share).astype(int)
        target = np.array(fractions) * seen
        for _ in range(n - int(alloc.sum())):
            lag = target - (assigned + alloc)
            alloc[int(np.argmax(lag))] += 1
        assigned += alloc
        result.append([int(a) for a in alloc])
    return result


def parse_finding(value: str, where: str) -> int:
    """Turn a RIS finding cell into 0/1; anything else is an error naming the row."""
    text = value.strip().lower()
    if text in {"1", "true", "yes", "positive"}:
        return 1
    if text in {"0", "false", "no", "negative"}:
        return 0
    raise SplitInputError(f"{where}: finding must be 0/1 (or yes/no), got {value!r}")


def assign(
    manifest: Sequence[Mapping[str, str]],
    diagnoses: Mapping[str, int],
    cfg: SplitConfig,
) -> tuple[list[dict[str, str]], SplitSummary]:
    """Assign every manifest row to a split.

    Args:
        manifest: ingest manifest rows (``series_key``, ``patient_id``, ``study_uid`` and the columns
            named by ``cfg.external.column`` and ``cfg.stratify_on``).
        diagnoses: finding (0/1) per study instance UID.
        cfg: the split configuration.

    Returns:
        The manifest rows with ``finding`` and ``split`` added, and a summary.
    """
    column = cfg.external.column
    if manifest and column not in manifest[0]:
        raise SplitInputError(
            f"split.external.column: manifest has no column {column!r}; "
            f"choose one of {sorted(manifest[0])}"
        )
    rows = [dict(r) for r in manifest]
    by_patient: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        finding = diagnoses.get(row["study_uid"])
        row["finding"] = "" if finding is None else str(finding)
        by_patient[row["patient_id"]].append(row)

    external_values = set(cfg.external.values)
    moved = 0
    strata: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for patient, prow in sorted(by_patient.items()):
        if any(r[column] in external_values for r in prow):
            moved += sum(r[column] not in external_values for r in prow)
            for r in prow:
                r["split"] = EXTERNAL
            continue
        if any(r["finding"] == "" for r in prow):
            for r in prow:
                r["split"] = UNLABELLED
            continue
        key: list[str] = []
        for col in cfg.stratify_on:
            if col == "finding":
                key.append(str(max(int(r["finding"]) for r in prow)))
            elif col in prow[0]:
                key.append(Counter(r[col] for r in prow).most_common(1)[0][0])
            else:
                raise SplitInputError(
                    f"split.stratify_on: manifest has no column {col!r}; "
                    f"choose from finding, {', '.join(sorted(prow[0]))}"
                )
        strata[tuple(key)].append(patient)

    rng = np.random.default_rng(cfg.seed)
    fractions = [cfg.fractions[s] for s in SPLITS]
    keys = sorted(strata)
    for stratum in keys:
        patients = strata[stratum]
        strata[stratum] = [patients[i] for i in rng.permutation(len(patients))]
    for stratum, alloc in zip(
        keys, allocate([len(strata[k]) for k in keys], fractions), strict=True
    ):
        bounds = np.cumsum([0, *alloc])
        for k, name in enumerate(SPLITS):
            for patient in strata[stratum][bounds[k] : bounds[k + 1]]:
                for r in by_patient[patient]:
                    r["split"] = name

    patients_per_split: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        patients_per_split[row["split"]].add(row["patient_id"])
    shared = [
        p for p in by_patient if sum(p in members for members in patients_per_split.values()) > 1
    ]
    if shared:  # cannot happen by construction; guard the invariant loudly if the code changes
        raise AssertionError(f"patients in more than one split: {shared[:5]}")

    series = Counter(r["split"] for r in rows)
    positives = Counter(r["split"] for r in rows if r["finding"] == "1")
    summary = SplitSummary(
        series={s: series.get(s, 0) for s in (*SPLITS, EXTERNAL, UNLABELLED)},
        patients={s: len(patients_per_split.get(s, ())) for s in (*SPLITS, EXTERNAL, UNLABELLED)},
        positives={s: positives.get(s, 0) for s in (*SPLITS, EXTERNAL, UNLABELLED)},
        moved_to_external=moved,
    )
    return rows, summary


def run(cfg: SplitConfig, manifest_csv: Path, diagnoses_csv: Path, out_dir: Path) -> SplitSummary:
    """Join the ingest manifest with the verified diagnoses and write ``out_dir/dataset.csv``.

    ``dataset.csv`` holds every manifest row with ``finding`` (empty when the RIS has no verified
    diagnosis for the study) and ``split`` (train, val, test, external or unlabelled). Nothing is dropped.
    """
    manifest = read_csv(manifest_csv, ["series_key", "patient_id", "study_uid"])
    diag_rows = read_csv(diagnoses_csv, DIAGNOSIS_COLUMNS)
    diagnoses: dict[str, int] = {}
    for i, row in enumerate(diag_rows, start=2):
        uid = row["study_instance_uid"].strip()
        finding = parse_finding(row["finding"], f"{diagnoses_csv}:{i}")
        if uid in diagnoses and diagnoses[uid] != finding:
            raise SplitInputError(
                f"{diagnoses_csv}:{i}: study {uid} has conflicting verified findings; "
                "resolve the disagreement in the RIS export"
            )
        diagnoses[uid] = finding
    rows, summary = assign(manifest, diagnoses, cfg)
    if summary.series[UNLABELLED]:
        log.warning(
            "%d series have no verified diagnosis in %s; kept as 'unlabelled'",
            summary.series[UNLABELLED],
            diagnoses_csv,
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    fieldnames = [*manifest[0].keys(), "finding", "split"] if manifest else ["split"]
    with (out_dir / "dataset.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fieldnames, lineterminator="\n")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (r["split"], r["series_key"])))
    return summary


__all__ = [
    "EXTERNAL",
    "SPLITS",
    "UNLABELLED",
    "SplitInputError",
    "SplitSummary",
    "allocate",
    "assign",
    "run",
]
