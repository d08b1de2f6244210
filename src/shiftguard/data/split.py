"""Patient-level, stratified train/val/test split with an external test set.

The labels come from the data source's label file(s) (a RIS export, a reading study), joined to the
ingested studies by :mod:`shiftguard.data.labels`, which accounts for every study and label row in a
report. Series selected by ``SplitConfig.external`` (a header field's values, a date range) form the
external test set; every other labelled patient goes wholly into one of train, val or test, so no
patient is ever in two splits.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shiftguard.config.schema import DataConfig, ExternalSelector, SplitConfig
from shiftguard.data import labels as label_join
from shiftguard.data.identifiers import Pseudonymizer
from shiftguard.errors import SplitInputError, TooFewLabelledError
from shiftguard.utils import write_csv

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
EXTERNAL = "external"
UNLABELLED = "unlabelled"
#: the verified diagnoses the split writes for the shadow stage (its reader's column names)
DIAGNOSIS_COLUMNS = ("study_instance_uid", "finding", "reader", "reported_at")


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
            **({"labels": dict(self.extra)} if self.extra else {}),
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


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def external_rule(
    cfg: ExternalSelector, ids: Pseudonymizer | None = None
) -> Callable[[Mapping[str, str]], bool] | None:
    """A test of whether a manifest row is external, or ``None`` when the config selects nothing.

    >>> rule = external_rule(ExternalSelector(column="field_strength", values=[3]))
    >>> rule({"field_strength": "3.0"}), rule({"field_strength": "1.5"})
    (True, False)
    >>> rule = external_rule(ExternalSelector(date_from="2021-07"))
    >>> rule({"study_date": "20210630"}), rule({"study_date": "20210701"}), rule({"study_date": "202107"})
    (False, True, True)
    """
    ids = ids or Pseudonymizer(None)
    values = [str(v).strip() for v in cfg.values]
    if cfg.values_file:
        path = Path(cfg.values_file)
        if not path.is_file():
            raise SplitInputError(f"split.external.values_file: {path} does not exist")
        values += [
            line.strip()
            for line in path.read_text(encoding="utf-8-sig").splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
    if cfg.column == "patient_id":
        values = [ids.patient(v) for v in values]
    elif cfg.column == "accession_number":
        values = [ids.accession(v) for v in values]
    texts = set(values)
    numbers = {n for n in map(_number, values) if n is not None}
    by_value = bool(values)
    if not by_value and cfg.date_from is None and cfg.date_to is None:
        return None

    def in_values(row: Mapping[str, str]) -> bool:
        cell = row[cfg.column].strip()
        number = _number(cell)
        return cell in texts or (number is not None and number in numbers)

    def in_dates(row: Mapping[str, str]) -> bool:
        date = "".join(c for c in row.get("study_date", "") if c.isdigit())
        if not date:
            return False
        for bound, later in ((cfg.date_from, True), (cfg.date_to, False)):
            if bound is None:
                continue
            n = min(len(date), len(bound))
            if (date[:n] < bound[:n]) if later else (date[:n] > bound[:n]):
                return False
        return True

    def rule(row: Mapping[str, str]) -> bool:
        if by_value and not in_values(row):
            return False
        return not (cfg.date_from or cfg.date_to) or in_dates(row)

    return rule


def assign(
    manifest: Sequence[Mapping[str, str]],
    diagnoses: Mapping[str, int],
    cfg: SplitConfig,
    ids: Pseudonymizer | None = None,
) -> tuple[list[dict[str, str]], SplitSummary]:
    """Assign every manifest row to a split.

    Args:
        manifest: ingest manifest rows (``series_key``, ``patient_id``, ``study_uid`` and the columns
            named by ``cfg.external`` and ``cfg.stratify_on``).
        diagnoses: finding (0/1) per study instance UID.
        cfg: the split configuration.
        ids: the data source's identifier policy (external patient IDs or accession numbers given
            in the config are pseudonymized like the manifest's).

    Returns:
        The manifest rows with ``finding`` and ``split`` added, and a summary.
    """
    column = cfg.external.column
    needs_column = bool(cfg.external.values or cfg.external.values_file)
    if manifest and needs_column and column not in manifest[0]:
        raise SplitInputError(
            f"split.external.column: manifest has no column {column!r}; "
            f"choose one of {sorted(manifest[0])}"
        )
    dated = cfg.external.date_from or cfg.external.date_to
    if manifest and dated and "study_date" not in manifest[0]:
        raise SplitInputError("split.external.date_from/date_to: manifest has no study_date")
    is_external = external_rule(cfg.external, ids)
    rows = [dict(r) for r in manifest]
    by_patient: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        finding = diagnoses.get(row["study_uid"])
        row["finding"] = "" if finding is None else str(finding)
        by_patient[row["patient_id"]].append(row)

    moved = 0
    strata: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for patient, prow in sorted(by_patient.items()):
        flags = [is_external(r) for r in prow] if is_external else [False] * len(prow)
        if any(flags):
            moved += sum(not f for f in flags)
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


def check_trainable(summary: SplitSummary, cfg: SplitConfig, labelled: int) -> None:
    """Fail unless the train split holds both classes and val and test hold a patient each (a split
    given no share, like an evaluation-only hold-out set's train split, is not checked).

    Raises:
        TooFewLabelledError: naming the counts, the fractions, and what to do.
    """
    negatives = {s: summary.series[s] - summary.positives[s] for s in SPLITS}
    short = []
    if cfg.fractions["train"] > 0 and not (summary.positives["train"] and negatives["train"]):
        short.append(
            f"train has {summary.positives['train']} positive and {negatives['train']} negative "
            "series"
        )
    short += [
        f"{s} is empty" for s in ("val", "test") if cfg.fractions[s] > 0 and not summary.patients[s]
    ]
    if short:
        raise TooFewLabelledError(
            f"split: {labelled} labelled studies remain after the join "
            f"({summary.patients['unlabelled']} patients unlabelled, "
            f"{summary.patients['external']} external) and {'; '.join(short)} "
            f"(split.fractions {dict(cfg.fractions)}): label more studies (see "
            "reports/split/labels.csv), widen the data source, or select fewer external studies"
        )


def run(
    cfg: SplitConfig,
    data: DataConfig,
    manifest_csv: Path,
    out_dir: Path,
    labels_csv: Path,
    quarantine_csv: Path | None = None,
    ids: Pseudonymizer | None = None,
    trainable: bool = True,
) -> tuple[SplitSummary, label_join.LabelJoin]:
    """Join the ingest manifest with the data source's labels, split, and write the tables.

    Writes ``out_dir/dataset.csv`` (every manifest row with ``finding``, empty when unlabelled, and
    ``split``: train, val, test, external or unlabelled; nothing is dropped),
    ``out_dir/diagnoses.csv`` (:data:`DIAGNOSIS_COLUMNS`: the matched label rows, the shadow stage's
    verified diagnoses) and ``labels_csv`` (the labels report, :data:`labels.REPORT_COLUMNS`).

    With ``trainable`` (a set to train on), too few labelled studies for the split is an error
    (:func:`check_trainable`); an evaluation-only set (all external, say) passes ``False``.

    Raises:
        SplitInputError: the manifest cannot be split (a column missing, too few labelled studies).
        labels.LabelFileError: a label file cannot be read or lacks a mapped column.
    """
    ids = ids or Pseudonymizer(None)
    manifest = read_csv(manifest_csv, ["series_key", "patient_id", "study_uid"])
    label_rows = label_join.read_labels(Path(data.labels))
    label_join.check_columns(label_rows, data, data.labels)
    joined = label_join.join(manifest, label_rows, data, ids)
    if quarantine_csv is not None and quarantine_csv.is_file():
        with quarantine_csv.open(newline="", encoding="utf-8") as fh:
            joined.report.extend(label_join.excluded_rows(list(csv.DictReader(fh))))
    demographics = joined.demographics
    manifest = [
        {**r, **{k: v for k, v in demographics.get(r["study_uid"], {}).items() if not r.get(k)}}
        for r in manifest
    ]
    rows, summary = assign(manifest, joined.findings, cfg, ids)
    summary.extra.update(joined.counts())
    for line in label_join.summary_lines(joined):
        log.info("%s", line)
    label_join.write_report(joined, labels_csv)
    fieldnames = [*manifest[0].keys(), "finding", "split"] if manifest else ["split"]
    write_csv(
        out_dir / "dataset.csv",
        fieldnames,
        sorted(rows, key=lambda r: (r["split"], r["series_key"])),
    )
    write_diagnoses(joined, data, ids, out_dir / "diagnoses.csv")
    if trainable:
        check_trainable(summary, cfg, len(joined.findings))
    return summary, joined


def write_diagnoses(
    joined: label_join.LabelJoin, data: DataConfig, ids: Pseudonymizer, path: Path
) -> Path:
    """The matched label rows as verified diagnoses (:data:`DIAGNOSIS_COLUMNS`), for the shadow
    stage. ``reported_at`` is the mapped column where identifiers are kept, else empty (unknown)."""
    rows = []
    for uid, label, finding in joined.matched:
        reader = label.values.get(data.columns.reader or "", "") or "label file"
        stamp = "" if ids.active else label.values.get(data.columns.reported_at or "", "")
        rows.append({"study_instance_uid": uid, "finding": finding, "reader": reader,
                     "reported_at": stamp})  # fmt: skip
    rows.sort(key=lambda r: (r["study_instance_uid"], r["reported_at"], r["reader"]))
    return write_csv(path, DIAGNOSIS_COLUMNS, rows)


__all__ = [
    "DIAGNOSIS_COLUMNS",
    "EXTERNAL",
    "SPLITS",
    "UNLABELLED",
    "SplitInputError",
    "SplitSummary",
    "TooFewLabelledError",
    "allocate",
    "assign",
    "check_trainable",
    "external_rule",
    "run",
    "write_diagnoses",
]
