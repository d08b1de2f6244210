"""Label files from a RIS export or a reading study, joined to the ingested studies, with a report.

:func:`read_labels` reads one file or a folder of them (CSV and TSV with any common delimiter, JSON,
JSON lines; Excel and Parquet when pandas' readers for them are installed) into rows that remember their
file and line. :func:`join` maps each row to a study of the ingest manifest by the configured key
(``data.key``: study UID, accession number, or patient ID + study date), reads the finding with the
configured positive and negative values, and accounts for every study and every label row in one table
(:data:`REPORT_COLUMNS`): labelled, unlabelled, label without a study, duplicate, conflicting,
unreadable finding, unreadable key, ambiguous. Each row says what to do about it.

Identifiers follow the data source's policy (:mod:`shiftguard.data.identifiers`): with pseudonyms the
report names patients, accession numbers and files only by their pseudonyms and label rows by file and
line, so it can be shared; ``shiftguard data lookup`` resolves them on site.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shiftguard.config.schema import JOIN_KEY_FIELDS, DataConfig
from shiftguard.data.identifiers import Pseudonymizer
from shiftguard.errors import LabelFileError
from shiftguard.utils import write_csv

log = logging.getLogger(__name__)

#: file suffixes read as label tables
SUFFIXES = (".csv", ".tsv", ".txt", ".json", ".jsonl", ".ndjson", ".xlsx", ".xls", ".parquet")
REPORT_COLUMNS = (
    "status",
    "study_uid",
    "patient",
    "key",
    "label_row",
    "series",
    "detail",
    "action",
)
#: every status a report row can have, with what to do about it
ACTIONS: dict[str, str] = {
    "labelled": "",
    "unlabelled": "add a label for this study to the label file, or leave it out of training "
    "(it is kept as 'unlabelled')",
    "label_without_study": "check the key against the export: the study may be missing from it, "
    "quarantined by ingest (see quarantine), or keyed differently",
    "duplicate_label": "nothing to do (the same finding twice); remove the copy to keep the file clean",
    "conflicting_labels": "resolve the disagreement in the label file; the study is left unlabelled "
    "until then",
    "unreadable_finding": "write the finding as one of data.positive or data.negative, or add the "
    "value to one of them",
    "missing_key": "fill in the key column(s) for this row",
    "ambiguous_key": "the key matches several studies; key the labels by accession number or study "
    "UID instead",
    "excluded_by_ingest": "see the fix; the series is in ingest's quarantine.csv, not in training",
}


@dataclass(frozen=True)
class LabelRow:
    """One row of a label file: its cells, and where it came from (``file:line``)."""

    values: dict[str, str]
    file: str
    line: int

    @property
    def where(self) -> str:
        """``<file name>:<line>``: line 1 is a CSV's header, so data starts at 2."""
        return f"{self.file}:{self.line}"


def label_files(path: Path) -> list[Path]:
    """The label files at ``path``: the file itself, or the readable files in the folder (sorted)."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise LabelFileError(
                f"{path}: no label file in this folder (looked for {', '.join(SUFFIXES)})"
            )
        return files
    raise LabelFileError(f"{path}: no such label file or folder")


def _text_rows(path: Path, text: str) -> list[LabelRow]:
    sample = text[:65536]
    if path.suffix.lower() == ".tsv":
        delimiter = "\t"
    else:
        try:
            delimiter = csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
        except csv.Error:
            delimiter = ","
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    if not reader.fieldnames:
        raise LabelFileError(f"{path}: empty file; a label table needs a header row")
    names = [n.strip() for n in reader.fieldnames]
    if len(set(names)) != len(names):
        dupes = sorted(n for n, c in Counter(names).items() if c > 1)
        raise LabelFileError(f"{path}: column(s) {dupes} appear twice in the header")
    rows = []
    for record in reader:
        if None in record:
            raise LabelFileError(
                f"{path}:{reader.line_num}: more cells than the header's {len(names)} columns"
            )
        values = {n: (v or "").strip() for n, v in zip(names, record.values(), strict=True)}
        if any(values.values()):
            rows.append(LabelRow(values, path.name, reader.line_num))
    return rows


def _records_rows(path: Path, records: Iterable[Any], first_line: int = 1) -> list[LabelRow]:
    rows = []
    for i, record in enumerate(records, start=first_line):
        if not isinstance(record, Mapping):
            raise LabelFileError(f"{path}: record {i} is not an object of column: value")
        values = {str(k).strip(): "" if v is None else str(v).strip() for k, v in record.items()}
        rows.append(LabelRow(values, path.name, i))
    return rows


def _json_records(path: Path, text: str) -> list[LabelRow]:
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        records = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append((n, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise LabelFileError(f"{path}:{n}: not JSON ({err.msg})") from None
        return [r for n, rec in records for r in _records_rows(path, [rec], n)]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise LabelFileError(f"{path}:{err.lineno}: not JSON ({err.msg})") from None
    if isinstance(data, Mapping):  # {"records": [...]}, or {column: [values]}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(data) == 1 and lists and all(isinstance(x, Mapping) for x in lists[0]):
            data = lists[0]
        elif lists and len(lists) == len(data) and len({len(v) for v in lists}) == 1:
            data = [dict(zip(data, cells, strict=True)) for cells in zip(*lists, strict=True)]
    if not isinstance(data, list):
        raise LabelFileError(f"{path}: expected a list of records (one object per study)")
    return _records_rows(path, data)


def _frame_rows(path: Path) -> list[LabelRow]:
    import pandas as pd

    try:
        if path.suffix.lower() == ".parquet":
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_excel(path, dtype=str)
    except ImportError as err:
        raise LabelFileError(
            f"{path}: reading {path.suffix} files needs an extra package ({err}); "
            "export the sheet as CSV instead"
        ) from None
    except Exception as err:  # a corrupt workbook: name it, do not crash
        raise LabelFileError(f"{path}: cannot read it ({type(err).__name__}: {err})") from None
    frame = frame.astype(object).where(frame.notna(), None)
    return _records_rows(path, frame.to_dict("records"), first_line=2)


def read_labels(path: Path) -> list[LabelRow]:
    """Every row of the label file(s) at ``path``.

    Raises:
        LabelFileError: a file is missing, empty, malformed or in an unknown format.
    """
    rows: list[LabelRow] = []
    for file in label_files(Path(path)):
        suffix = file.suffix.lower()
        if suffix in (".xlsx", ".xls", ".parquet"):
            rows.extend(_frame_rows(file))
            continue
        try:
            text = file.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError:
            text = file.read_bytes().decode("latin-1")  # RIS exports from older systems
        if suffix in (".json", ".jsonl", ".ndjson"):
            rows.extend(_json_records(file, text))
        elif suffix in SUFFIXES:
            rows.extend(_text_rows(file, text))
        else:
            raise LabelFileError(
                f"{file}: unknown label file format {suffix or '(no suffix)'}; use one of "
                f"{', '.join(SUFFIXES)}"
            )
    return rows


def columns_of(rows: Sequence[LabelRow]) -> list[str]:
    """The columns the rows have, in first-seen order."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row.values))
    return list(seen)


def normalize_date(text: str) -> str | None:
    """``YYYYMMDD`` from a DICOM DA, an ISO date or date-time; ``None`` when it is not one.

    >>> normalize_date("2021-03-07"), normalize_date("20210307"), normalize_date("2021-03-07T10:00")
    ('20210307', '20210307', '20210307')
    >>> normalize_date("07/03/2021") is None
    True
    """
    text = text.strip()
    head = text[:10]
    if len(head) == 10 and head[4] in "-./" and head[7] == head[4]:
        digits = head[:4] + head[5:7] + head[8:10]
    else:
        digits = text[:8]
    if len(digits) != 8 or not digits.isdigit():
        return None
    month, day = int(digits[4:6]), int(digits[6:8])
    return digits if 1 <= month <= 12 and 1 <= day <= 31 else None


@dataclass
class LabelJoin:
    """The outcome of :func:`join`."""

    findings: dict[str, int] = field(default_factory=dict)
    """finding (0/1) per study UID, for the studies with one usable label"""
    demographics: dict[str, dict[str, str]] = field(default_factory=dict)
    """``patient_sex`` / ``patient_age`` from the label file per study UID, where mapped"""
    report: list[dict[str, str]] = field(default_factory=list)
    """one row per study and per label row that is not simply 'labelled' (:data:`REPORT_COLUMNS`)"""
    matched: list[tuple[str, LabelRow, int]] = field(default_factory=list)
    """every label row that names one study and a readable finding: (study UID, row, finding)"""

    def counts(self) -> dict[str, int]:
        """Rows of the report per status (studies for study statuses, label rows for the others)."""
        counts = Counter(r["status"] for r in self.report)
        return {status: counts.get(status, 0) for status in ACTIONS}


def finding_value(value: str, cfg: DataConfig) -> int | None:
    """1 for one of ``cfg.positive``, 0 for one of ``cfg.negative`` (any case), else ``None``."""
    text = value.strip().lower()
    if text in {v.strip().lower() for v in cfg.positive}:
        return 1
    if text in {v.strip().lower() for v in cfg.negative}:
        return 0
    return None


def _key_of_label(row: LabelRow, cfg: DataConfig, ids: Pseudonymizer) -> tuple[str, ...] | None:
    cells = []
    for name in JOIN_KEY_FIELDS[cfg.key]:
        column = getattr(cfg.columns, name)
        value = row.values.get(column, "").strip()
        if not value:
            return None
        if name == "study_uid":
            value = ids.uid(value)
        elif name == "accession_number":
            value = ids.accession(value)
        elif name == "patient_id":
            value = ids.patient(value)
        elif name == "study_date":
            date = normalize_date(value)
            if date is None:
                return None
            value = ids.study_date(date)
        cells.append(value)
    return tuple(cells)


def _key_of_study(row: Mapping[str, str], cfg: DataConfig, ids: Pseudonymizer) -> tuple[str, ...]:
    if cfg.key == "study_uid":
        return (row["study_uid"],)
    if cfg.key == "accession_number":
        return (row["accession_number"],)
    # pseudonymized manifests hold the month already; label dates are cut the same way
    date = row["study_date"] if ids.active else normalize_date(row["study_date"]) or ""
    return (row["patient_id"], date)


def check_columns(rows: Sequence[LabelRow], cfg: DataConfig, source: str) -> None:
    """Fail naming the label file and the mapped columns it lacks.

    Raises:
        LabelFileError: a column named in ``data.columns`` is in no label row.
    """
    found = set(columns_of(rows))
    wanted = {f: c for f, c in cfg.columns.model_dump().items() if c is not None}
    missing = {f: c for f, c in wanted.items() if c not in found}
    if not rows:
        raise LabelFileError(f"{source}: no label rows")
    if missing:
        raise LabelFileError(
            f"{source}: no column "
            + ", ".join(f"{c!r} (data.columns.{f})" for f, c in missing.items())
            + f"; the file has {sorted(found)}. Fix the mapping in conf/data/{cfg.name}.yaml "
            "or run `shiftguard data init` again"
        )


def join(
    manifest: Sequence[Mapping[str, str]],
    labels: Sequence[LabelRow],
    cfg: DataConfig,
    ids: Pseudonymizer,
) -> LabelJoin:
    """Join label rows to the manifest's studies by ``cfg.key`` and account for every one of both.

    Args:
        manifest: ingest manifest rows (``study_uid``, ``patient_id``, ``accession_number``,
            ``study_date``; already pseudonymized when ``ids`` is active).
        labels: rows of the label file(s) (:func:`read_labels`).
        cfg: the data source (key, columns, positive and negative values).
        ids: the source's identifier policy, applied to the label file's key cells.

    Returns:
        The findings per study UID, label-file demographics, and the report rows.
    """
    studies: dict[str, list[Mapping[str, str]]] = defaultdict(list)
    for row in manifest:
        studies[row["study_uid"]].append(row)
    by_key: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for uid, series in sorted(studies.items()):
        by_key[_key_of_study(series[0], cfg, ids)].append(uid)

    out = LabelJoin()
    label_rows: dict[str, list[tuple[LabelRow, int]]] = defaultdict(list)

    def note(status: str, label: LabelRow | None, key: str, detail: str, uid: str = "") -> None:
        series = studies.get(uid, [])
        out.report.append(
            {
                "status": status,
                "study_uid": uid,
                "patient": series[0]["patient_id"] if series else "",
                "key": key,
                "label_row": label.where if label else "",
                "series": str(len(series)) if series else "",
                "detail": detail,
                "action": ACTIONS[status],
            }
        )

    for label in labels:
        key = _key_of_label(label, cfg, ids)
        if key is None:
            note("missing_key", label, "", f"no usable {cfg.key} in this row")
            continue
        shown = "|".join(key)
        uids = by_key.get(key, [])
        if not uids:
            note("label_without_study", label, shown, f"no ingested study has {cfg.key} {shown}")
            continue
        if len(uids) > 1:
            note("ambiguous_key", label, shown, f"{len(uids)} studies have {cfg.key} {shown}")
            continue
        value = label.values.get(cfg.columns.finding, "")
        finding = finding_value(value, cfg)
        if finding is None:
            note(
                "unreadable_finding",
                label,
                shown,
                f"finding {value!r} is in neither data.positive nor data.negative",
                uids[0],
            )
            continue
        label_rows[uids[0]].append((label, finding))
        out.matched.append((uids[0], label, finding))

    for uid in sorted(studies):
        rows = label_rows.get(uid)
        shown = "|".join(_key_of_study(studies[uid][0], cfg, ids))
        if not rows:
            note("unlabelled", None, shown, "no label row matches this study", uid)
            continue
        values = {f for _, f in rows}
        if len(values) > 1:
            where = ", ".join(f"{r.where}={f}" for r, f in rows)
            note("conflicting_labels", rows[0][0], shown, f"findings disagree: {where}", uid)
            continue
        for extra, _ in rows[1:]:
            note("duplicate_label", extra, shown, f"repeats {rows[0][0].where}", uid)
        label, finding = rows[0]
        out.findings[uid] = finding
        demo = {}
        for name in ("patient_sex", "patient_age"):
            column = getattr(cfg.columns, name)
            if column and label.values.get(column, ""):
                value = label.values[column]
                demo[name] = ids.age(value) if name == "patient_age" else value
        if demo:
            out.demographics[uid] = demo
        note("labelled", label, shown, f"finding {finding}", uid)
    return out


def excluded_rows(quarantine: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """Report rows for what ingest left out (its ``quarantine.csv`` rows), each with ingest's fix."""
    return [
        {
            "status": "excluded_by_ingest",
            "study_uid": "",
            "patient": "",
            "key": q.get("path", ""),
            "label_row": "",
            "series": q.get("n_files", ""),
            "detail": f"{q.get('level', '')} {q.get('code', '')}: {q.get('reason', '')}".strip(),
            "action": q.get("fix", "") or ACTIONS["excluded_by_ingest"],
        }
        for q in quarantine
    ]


def summary_lines(result: LabelJoin, examples: int = 3) -> list[str]:
    """What the terminal shows: the count per status and a few examples of each problem."""
    counts = result.counts()
    lines = [
        f"labels: {counts['labelled']} studies labelled, {counts['unlabelled']} unlabelled, "
        f"{counts['label_without_study']} label rows without a study, "
        f"{counts['excluded_by_ingest']} files or series excluded by ingest"
    ]
    for status in ACTIONS:
        if status == "labelled" or not counts[status]:
            continue
        rows = [r for r in result.report if r["status"] == status]
        shown = "; ".join(r["label_row"] or r["study_uid"] or r["key"] for r in rows[:examples]) + (
            f"; +{len(rows) - examples} more" if len(rows) > examples else ""
        )
        action = rows[0]["action"] if status == "excluded_by_ingest" else ACTIONS[status]
        lines.append(f"  {status.replace('_', ' ')}: {len(rows)} ({shown}): {action}")
    return lines


def _row_order(where: str) -> tuple[str, int]:
    name, _, line = where.rpartition(":")
    return (name, int(line)) if line.isdigit() else (where, 0)


def write_report(result: LabelJoin, path: Path) -> Path:
    """``path``: every report row (:data:`REPORT_COLUMNS`), problems first, then labelled studies."""
    order = {status: i for i, status in enumerate(ACTIONS)}
    rows = sorted(
        result.report,
        key=lambda r: (
            r["status"] == "labelled",
            order[r["status"]],
            _row_order(r["label_row"]),
            r["study_uid"],
            r["key"],
        ),
    )
    return write_csv(path, REPORT_COLUMNS, rows)


__all__ = [
    "ACTIONS",
    "REPORT_COLUMNS",
    "SUFFIXES",
    "LabelFileError",
    "LabelJoin",
    "LabelRow",
    "check_columns",
    "columns_of",
    "excluded_rows",
    "finding_value",
    "join",
    "label_files",
    "normalize_date",
    "read_labels",
    "summary_lines",
    "write_report",
]
