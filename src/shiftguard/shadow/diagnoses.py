"""Verified diagnoses as they arrive from the RIS: CSV or JSON lines, in any number of batches.

A row names a study (its Study Instance UID), the verified finding, the reader and when the report
was signed. Column names follow the common RIS exports (``study_uid``, ``study_instance_uid`` or
``StudyInstanceUID``; ``finding`` as 0/1, yes/no, true/false, positive/negative; ``reader``;
``reported_at``, ``report_date`` or ``time`` as an ISO-8601 time or a DICOM date, or none: then a
later-signed report of the same study wins over it). Malformed rows
are reported with their file and line number and left out; the rest are kept.

Batches merge into one :class:`DiagnosisBook` whatever their number and order: for each study the
latest signed report wins (ties broken by reader, then finding, so the result never depends on
arrival order), and a study whose readers disagree is noted.

:func:`write_diagnoses` writes diagnoses from elsewhere (the PACS's report SRs) as JSON lines that
:func:`read_diagnoses` reads back.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shiftguard.dicom.uid import is_uid
from shiftguard.errors import DiagnosisFileError

UID_KEYS = ("study_uid", "study_instance_uid", "studyinstanceuid")
FINDING_KEYS = ("finding", "verified_finding", "label")
READER_KEYS = ("reader", "radiologist", "reported_by")
TIME_KEYS = ("reported_at", "report_date", "time", "signed_at")
POSITIVE = {"1", "yes", "true", "positive", "present", "finding", "y"}
NEGATIVE = {"0", "no", "false", "negative", "absent", "no finding", "n"}


@dataclass(frozen=True, order=True)
class Diagnosis:
    """One verified report."""

    study_uid: str
    reported_at: str  # ISO-8601, UTC; "" when the label file has no report time
    reader: str
    finding: int  # 1: the finding is present
    source: str = field(default="", compare=False)  # file:line


@dataclass(frozen=True)
class Problem:
    """A row that was left out, and why."""

    source: str  # file:line
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.message}"


def read_diagnoses(path: Path | str) -> tuple[list[Diagnosis], list[Problem]]:
    """The diagnoses in a CSV or JSON-lines file, and the rows left out (with line numbers).

    Raises:
        DiagnosisFileError: the file is missing, empty, or neither CSV with a header nor JSON lines.
    """
    path = Path(path)
    if not path.is_file():
        raise DiagnosisFileError(f"{path}: no such diagnosis file")
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise DiagnosisFileError(f"{path}: empty diagnosis file")
    rows: Iterable[tuple[int, Any]]
    rows = _json_lines(text) if text.lstrip().startswith("{") else _csv_rows(path, text)
    good, bad = [], []
    for line, row in rows:
        source = f"{path.name}:{line}"
        if isinstance(row, Problem):
            bad.append(Problem(source, row.message))
            continue
        diagnosis, problem = parse_row(row, source)
        if diagnosis is not None:
            good.append(diagnosis)
        else:
            bad.append(Problem(source, problem or "unreadable row"))
    return good, bad


def _json_lines(text: str) -> Iterable[tuple[int, Any]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, Problem("", f"not JSON ({exc.msg})")
            continue
        yield number, value if isinstance(value, dict) else Problem("", "not a JSON object")


def _csv_rows(path: Path, text: str) -> Iterable[tuple[int, Any]]:
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames or not any(_key(f) in UID_KEYS for f in reader.fieldnames):
        raise DiagnosisFileError(
            f"{path}: no study UID column (expected one of {', '.join(UID_KEYS)}) in the header"
        )
    for row in reader:
        if None in row:  # more fields than the header names
            yield reader.line_num, Problem("", "more fields than the header has")
            continue
        yield reader.line_num, row


def write_diagnoses(diagnoses: Iterable[Diagnosis], path: Path | str) -> Path:
    """Write diagnoses as JSON lines that :func:`read_diagnoses` reads back (keys ``study_uid``,
    ``finding``, ``reader``, ``reported_at``, and ``source``, where the diagnosis came from)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps(
            {
                "study_uid": d.study_uid,
                "finding": d.finding,
                "reader": d.reader,
                "reported_at": d.reported_at,
                "source": d.source,
            }
        )
        for d in diagnoses
    ]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _key(name: str) -> str:
    return name.strip().lower().replace(" ", "_")


def _pick(row: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    lowered = {_key(str(k)): v for k, v in row.items()}
    return next((lowered[k] for k in keys if k in lowered and lowered[k] not in (None, "")), None)


def parse_row(row: Mapping[str, Any], source: str = "") -> tuple[Diagnosis | None, str | None]:
    """One row as a :class:`Diagnosis`, or the reason it cannot be one."""
    uid = _pick(row, UID_KEYS)
    if uid is None:
        return None, "no study UID"
    uid = str(uid).strip()
    if not is_uid(uid):
        return None, f"study UID {uid[:70]!r} is not a DICOM UID"
    raw = _pick(row, FINDING_KEYS)
    if raw is None:
        return None, "no finding"
    text = str(raw).strip().lower()
    if isinstance(raw, bool):
        text = "true" if raw else "false"
    if text in POSITIVE:
        finding = 1
    elif text in NEGATIVE:
        finding = 0
    else:
        return None, f"finding {raw!r}: expected 0/1, yes/no, positive/negative"
    stamp = _pick(row, TIME_KEYS)
    when = "" if stamp is None else parse_time(str(stamp))  # "": unknown, older than any time
    if when is None:
        return None, f"report time {stamp!r}: expected ISO-8601 or YYYYMMDD"
    reader = str(_pick(row, READER_KEYS) or "unknown").strip()
    return Diagnosis(uid, when, reader, finding, source), None


def parse_time(text: str) -> str | None:
    """ISO-8601 (any offset, converted to UTC) or a DICOM date, as ``YYYY-MM-DDTHH:MM:SSZ``."""
    text = text.strip()
    try:
        if re.fullmatch(r"\d{8}", text):
            value = datetime.strptime(text, "%Y%m%d").replace(tzinfo=UTC)
        else:
            value = datetime.fromisoformat(text.replace("Z", "+00:00"))
            if value.tzinfo is None:
                value = value.replace(tzinfo=UTC)
    except ValueError:
        return None
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class DiagnosisBook:
    """Every diagnosis received so far, one verdict per study (see the module docstring)."""

    reports: dict[str, list[Diagnosis]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def add(self, diagnoses: Iterable[Diagnosis], problems: Iterable[Problem] = ()) -> None:
        for d in diagnoses:
            seen = self.reports.setdefault(d.study_uid, [])
            if d not in seen:  # the same report sent twice counts once
                seen.append(d)
        self.problems.extend(problems)

    def add_file(self, path: Path | str) -> list[Problem]:
        diagnoses, problems = read_diagnoses(path)
        self.add(diagnoses, problems)
        return problems

    def verdict(self, study_uid: str) -> Diagnosis | None:
        """The report that counts for a study: the latest signed, ties broken by reader and
        finding (so the order in which batches arrived does not matter)."""
        reports = self.reports.get(study_uid)
        return max(reports) if reports else None

    def verdicts(self) -> dict[str, int]:
        """Study UID -> the finding that counts."""
        return {uid: max(reports).finding for uid, reports in self.reports.items()}

    def disagreements(self) -> list[str]:
        """Studies whose reports do not all give the same finding."""
        return sorted(uid for uid, r in self.reports.items() if len({d.finding for d in r}) > 1)
