"""``shiftguard data init``: a site's DICOM export and label file(s) -> a data source in ``conf/data/``.

:func:`inspect_dicom` reads every file's header once (what ingest will read) and :func:`inspect_labels`
every label row; :func:`propose` matches the label columns against the headers (which column holds the
study UIDs, the accession numbers, the patient IDs and study dates; which holds a two-valued finding,
the sex, the age) and counts what the join would give; :func:`render_config` writes it as a Hydra
group file that also sets what such data lacks (no lesion masks); :func:`register` tracks the data
with DVC. :func:`phi_fields` names the identifying header fields an export still carries.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shiftguard.config.schema import (
    DEFAULT_NEGATIVE,
    DEFAULT_POSITIVE,
    JOIN_KEY_FIELDS,
    DataConfig,
    LabelColumns,
)
from shiftguard.data import labels as label_join
from shiftguard.data.identifiers import Pseudonymizer
from shiftguard.dicom.scan import list_files, scan_files
from shiftguard.errors import DataSourceError, LabelFileError
from shiftguard.utils import progress_bar

log = logging.getLogger(__name__)

#: header fields that identify a patient or a visit, as (keyword, what it is)
PHI_KEYWORDS: tuple[tuple[str, str], ...] = (
    ("PatientName", "patient name"),
    ("PatientID", "patient ID"),
    ("PatientBirthDate", "birth date"),
    ("OtherPatientIDs", "other patient IDs"),
    ("OtherPatientNames", "other patient names"),
    ("PatientAddress", "address"),
    ("PatientTelephoneNumbers", "telephone"),
    ("AccessionNumber", "accession number"),
    ("ReferringPhysicianName", "referring physician"),
    ("StudyDate", "study date"),
    ("InstitutionAddress", "institution address"),
)
PHI_SAMPLE = (
    200  # files read for the de-identification check (one pass over the whole tree is ingest's)
)


@dataclass
class StudyInfo:
    """What the headers say about one study (the first series' first slice)."""

    study_uid: str
    patient_id: str
    accession_number: str
    study_date: str
    series: Counter[str] = field(default_factory=Counter)  # images per series UID


@dataclass
class DicomInventory:
    """What :func:`inspect_dicom` found."""

    root: Path
    files: int = 0
    readable: int = 0
    studies: dict[str, StudyInfo] = field(default_factory=dict)
    fields: dict[str, Counter[str]] = field(
        default_factory=dict
    )  # manufacturer, scanner_model, ...
    issues: Counter[str] = field(default_factory=Counter)
    dates: list[str] = field(default_factory=list)

    @property
    def patients(self) -> int:
        return len({s.patient_id for s in self.studies.values()})

    @property
    def series(self) -> int:
        return sum(len(s.series) for s in self.studies.values())

    def manifest_rows(self, min_slices: int = 1) -> list[dict[str, str]]:
        """One manifest-like row per study with a series of at least ``min_slices`` images (what
        ingest can make a volume of), for a trial join (identifiers as they are)."""
        return [
            {
                "study_uid": s.study_uid,
                "patient_id": s.patient_id,
                "accession_number": s.accession_number,
                "study_date": s.study_date,
            }
            for s in self.studies.values()
            if max(s.series.values(), default=0) >= min_slices
        ]


def inspect_dicom(root: Path, progress: bool = True) -> DicomInventory:
    """Read every header under ``root`` (no pixels).

    Raises:
        DataSourceError: ``root`` does not exist or holds no readable DICOM image.
    """

    root = Path(root)
    if not root.exists():
        raise DataSourceError(f"--dicom {root}: no such folder")
    files = list_files(root)
    inv = DicomInventory(root=root, files=len(files))
    fields = ("modality", "manufacturer", "model", "field_strength", "institution", "station")
    inv.fields = {name: Counter() for name in fields}
    with progress_bar(progress) as bar:
        task = bar.add_task("read headers", total=len(files))
        for start in range(0, len(files), 256):
            chunk = files[start : start + 256]
            headers, issues = scan_files(chunk)
            bar.advance(task, len(chunk))
            inv.issues.update(e.code for e in issues)
            for h in headers:
                study = inv.studies.get(h.study_uid)
                if study is None:
                    study = inv.studies[h.study_uid] = StudyInfo(
                        h.study_uid, h.patient_id, h.accession_number, h.study_date
                    )
                    if h.study_date:
                        inv.dates.append(h.study_date)
                study.series[h.series_uid] += 1
                if study.series[h.series_uid] == 1:
                    for name in fields:
                        value = getattr(h, name)
                        inv.fields[name][_text(value)] += 1
            inv.readable += len({h.path for h in headers})
    if not inv.studies:
        codes = ", ".join(f"{n} {c}" for c, n in inv.issues.most_common(5)) or "no files"
        raise DataSourceError(
            f"--dicom {root}: no readable DICOM image among {len(files)} files ({codes})"
        )
    return inv


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def phi_fields(root: Path, sample: int = PHI_SAMPLE) -> dict[str, int]:
    """The identifying fields (:data:`PHI_KEYWORDS`) that hold a value in a sample of the export's
    files, with how many sampled files hold each; empty for a de-identified export.

    A file that says ``PatientIdentityRemoved = YES`` still counts its fields: a de-identification
    profile may keep dates or IDs on purpose, and the user is told which.
    """
    import pydicom

    files = list_files(root)
    step = max(1, len(files) // sample)
    found: Counter[str] = Counter()
    keywords = [k for k, _ in PHI_KEYWORDS]
    for path in files[::step][:sample]:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=keywords)
        except Exception:  # not DICOM or unreadable: ingest quarantines it
            continue
        for keyword, _ in PHI_KEYWORDS:
            value = ds.get(keyword)
            if value not in (None, "") and str(value).strip():
                found[keyword] += 1
    return dict(found)


def inspect_labels(path: Path) -> list[label_join.LabelRow]:
    """Every label row (see :func:`shiftguard.data.labels.read_labels`).

    Raises:
        DataSourceError: the file cannot be read.
    """
    try:
        rows = label_join.read_labels(Path(path))
    except LabelFileError as err:
        raise DataSourceError(f"--labels: {err}") from None
    if not rows:
        raise DataSourceError(f"--labels {path}: no rows")
    return rows


_NAME_HINTS: dict[str, tuple[str, ...]] = {
    "finding": (
        "finding",
        "label",
        "diagnos",
        "result",
        "outcome",
        "abnormal",
        "positive",
        "lesion",
        "target",
        "class",
    ),
    "patient_sex": ("sex", "gender"),
    "patient_age": ("age",),
    "reader": ("reader", "radiologist", "reported_by", "reporter"),
    "reported_at": ("report_date", "reported", "signed", "verified_at", "report_time"),
    "study_date": ("study_date", "exam_date", "studydate", "date"),
}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


@dataclass
class Proposal:
    """A proposed mapping and what the trial join gives with it."""

    key: str
    columns: LabelColumns
    positive: list[str]
    negative: list[str]
    match_rates: dict[str, float]
    counts: dict[str, int]
    finding_values: dict[str, int]
    notes: list[str] = field(default_factory=list)


def _column_values(rows: Sequence[label_join.LabelRow], column: str) -> list[str]:
    return [r.values.get(column, "").strip() for r in rows if r.values.get(column, "").strip()]


def _match_rate(values: Iterable[str], known: set[str]) -> float:
    values = list(values)
    return sum(v in known for v in values) / len(values) if values else 0.0


def propose(
    inventory: DicomInventory,
    rows: Sequence[label_join.LabelRow],
    overrides: Mapping[str, Any] | None = None,
    min_slices: int = 1,
) -> Proposal:
    """Propose the join key, the column mapping and the finding's values; count the trial join.

    Args:
        inventory: the export's headers (:func:`inspect_dicom`).
        rows: the label rows (:func:`inspect_labels`).
        overrides: what the user fixed: ``key``, any :class:`LabelColumns` field, ``positive``,
            ``negative``.
        min_slices: ingest's ``min_slices``: studies without such a series are left out of the
            trial join (ingest will not make a volume of them).

    Raises:
        DataSourceError: no column joins the export, or no column looks like a finding (the message
            lists the columns and what to pass).
    """
    overrides = dict(overrides or {})
    columns = label_join.columns_of(rows)
    studies = list(inventory.studies.values())
    known = {
        "study_uid": {s.study_uid for s in studies},
        "accession_number": {s.accession_number for s in studies if s.accession_number},
        "patient_id": {s.patient_id for s in studies if s.patient_id},
    }
    rates: dict[str, dict[str, float]] = {
        kind: {c: _match_rate(_column_values(rows, c), ids) for c in columns}
        for kind, ids in known.items()
    }
    chosen: dict[str, str | None] = {}
    for kind in known:
        best = max(columns, key=lambda c: rates[kind][c])
        chosen[kind] = best if rates[kind][best] > 0 else None
    chosen.update({k: v for k, v in overrides.items() if k in LabelColumns.model_fields and v})

    def hinted(kind: str, exclude: set[str]) -> list[str]:
        hints = _NAME_HINTS[kind]
        return [c for c in columns if c not in exclude and any(h in _norm(c) for h in hints)]

    used = {c for c in chosen.values() if c}
    # the study date: a column whose cells are dates, preferring date-like names
    if not chosen.get("study_date"):
        dated = [c for c in columns if c not in used and _date_share(rows, c) > 0.8]
        named = [c for c in hinted("study_date", used) if c in dated]
        reported = set(hinted("reported_at", used))
        named = [c for c in named if c not in reported] or [c for c in dated if c not in reported]
        chosen["study_date"] = named[0] if named else None
    key = overrides.get("key") or _best_key(chosen, rates, rows, inventory)
    used = {c for c in chosen.values() if c}
    positive = list(overrides.get("positive") or [])
    negative = list(overrides.get("negative") or [])
    finding = overrides.get("finding") or _finding_column(rows, columns, used, positive, negative)
    if finding is None:
        raise DataSourceError(
            "--labels: no column looks like a finding (two values such as 0/1, yes/no, "
            f"positive/negative); the columns are {columns}. Pass --finding COLUMN "
            "(and --positive VALUE ... when its values are not the usual ones)"
        )
    values = Counter(_column_values(rows, finding))
    auto_pos, auto_neg = _finding_values(values)
    if not positive:
        positive = auto_pos or [v for v in values if v.lower() not in {n.lower() for n in negative}]
    if not negative:
        negative = auto_neg or [v for v in values if v.lower() not in {p.lower() for p in positive}]
    if (
        not positive
        or not negative
        or {v.lower() for v in positive} & {v.lower() for v in negative}
    ):
        raise DataSourceError(
            f"--labels: finding column {finding!r} holds {sorted(values)}; say which values are "
            "positive and which negative with --positive VALUE ... --negative VALUE ..."
        )
    used.add(finding)
    for kind in ("patient_sex", "patient_age", "reader", "reported_at"):
        if not chosen.get(kind):
            candidates = hinted(kind, used)
            chosen[kind] = candidates[0] if candidates else None
            used |= {c for c in candidates[:1]}
    mapped = {k: v for k, v in chosen.items() if k in LabelColumns.model_fields}
    needed = JOIN_KEY_FIELDS[key]
    mapped = {
        k: v
        for k, v in mapped.items()
        if v and (k in needed or k in ("patient_sex", "patient_age", "reader", "reported_at"))
    }
    missing = [f for f in needed if not mapped.get(f)]
    if missing:
        raise DataSourceError(
            f"--labels: join key {key} needs column(s) for {', '.join(missing)}; none of {columns} "
            "matches the export's headers. Pass --key and the column(s): e.g. --key accession_number "
            "--accession-column COLUMN"
        )
    label_columns = LabelColumns(finding=finding, **mapped)
    trial = DataConfig(
        name="trial",
        dicom=str(inventory.root),
        labels="-",
        ground_truth="-",
        key=key,
        columns=label_columns,
        positive=positive or ["1"],
        negative=negative or ["0"],
        identifiers="keep",
    )
    joined = label_join.join(inventory.manifest_rows(min_slices), rows, trial, Pseudonymizer(None))
    notes = []
    unread = [v for v in values if label_join.finding_value(v, trial) is None]
    if unread:
        notes.append(
            f"finding values {unread[:5]} are in neither --positive {positive} nor --negative "
            f"{negative}: those rows will be reported as unreadable"
        )
    key_rates = {k: round(rates[k][c], 3) for k, c in mapped.items() if k in rates and c}
    return Proposal(
        key, label_columns, positive, negative, key_rates, joined.counts(), dict(values), notes
    )


def _date_share(rows: Sequence[label_join.LabelRow], column: str) -> float:
    values = _column_values(rows, column)
    return (
        sum(label_join.normalize_date(v) is not None for v in values) / len(values) if values else 0
    )


def _best_key(
    chosen: Mapping[str, str | None],
    rates: Mapping[str, Mapping[str, float]],
    rows: Sequence[label_join.LabelRow],
    inventory: DicomInventory,
) -> str:
    score = {}
    for key in ("study_uid", "accession_number"):
        column = chosen.get(key)
        score[key] = rates[key][column] if column else 0.0
    if chosen.get("patient_id") and chosen.get("study_date"):
        pairs = {(s.patient_id, s.study_date) for s in inventory.studies.values()}
        pid, date = str(chosen["patient_id"]), str(chosen["study_date"])
        cells = [
            (r.values.get(pid, "").strip(), label_join.normalize_date(r.values.get(date, "")))
            for r in rows
        ]
        score["patient_id+study_date"] = _match_rate(
            (f"{p}|{d}" for p, d in cells), {f"{p}|{d}" for p, d in pairs}
        )
    best = max(score, key=lambda k: score[k])
    if score[best] == 0:
        raise DataSourceError(
            "--labels: no column's values match the export's StudyInstanceUIDs, AccessionNumbers, "
            "or PatientIDs with study dates; check that the label file belongs to this export, or "
            "pass --key and the column(s) to join on"
        )
    return best


_KNOWN = {v.lower() for v in (*DEFAULT_POSITIVE, *DEFAULT_NEGATIVE)}


def _finding_column(
    rows: Sequence[label_join.LabelRow],
    columns: Sequence[str],
    used: set[str],
    positive: Sequence[str],
    negative: Sequence[str],
) -> str | None:
    candidates = []
    for column in columns:
        if column in used:
            continue
        values = {v.lower() for v in _column_values(rows, column)}
        if not values:
            continue
        given = {v.lower() for v in (*positive, *negative)}
        two_valued = len(values) <= 2 or (given and values <= given)
        if not two_valued:
            continue
        known = values <= _KNOWN or bool(given and values <= given)
        named = any(h in _norm(column) for h in _NAME_HINTS["finding"])
        candidates.append((known, named, -columns.index(column), column))
    if not candidates:
        return None
    best = max(candidates)
    return best[3] if best[0] or best[1] else None


def _finding_values(values: Counter[str]) -> tuple[list[str], list[str]]:
    pos = sorted(v for v in values if v.lower() in {p.lower() for p in DEFAULT_POSITIVE})
    neg = sorted(v for v in values if v.lower() in {n.lower() for n in DEFAULT_NEGATIVE})
    return pos, neg


def render_config(
    cfg: DataConfig,
    inventory: DicomInventory,
    proposal: Proposal,
    external: Mapping[str, Any] | None,
) -> str:
    """``conf/data/<name>.yaml``: the data source, commented with what was found, as a Hydra group
    file in the global package (it also sets what a site's data lacks: lesion masks)."""
    import yaml

    body: dict[str, Any] = {"data": cfg.model_dump(mode="json", exclude_none=False)}
    body["data"]["columns"] = cfg.columns.model_dump(exclude_none=True)
    body["train"] = {"lesion_masks": None}  # no lesion masks in a site's export
    if external is not None:
        body["split"] = {"external": dict(external)}
    found = inventory.fields
    top = lambda name: ", ".join(f"{v or '?'} ({n})" for v, n in found[name].most_common(6))  # noqa: E731
    dates = sorted(inventory.dates)
    header = [
        "# @package _global_",
        f"# Data source {cfg.name!r}, written by `shiftguard data init`; edit freely, then",
        "# `shiftguard config dump` and `dvc repro`.",
        f"# Export: {inventory.files} files, {inventory.readable} readable images, "
        f"{len(inventory.studies)} studies, {inventory.series} series, {inventory.patients} patients",
        f"#   modality: {top('modality')}",
        f"#   manufacturer: {top('manufacturer')}",
        f"#   scanner_model: {top('model')}",
        f"#   field_strength: {top('field_strength')}",
        f"#   site: {top('institution')}",
        f"#   study dates: {_month(dates[0]) if dates else '?'} to {_month(dates[-1]) if dates else '?'}",
        f"# Labels: key {proposal.key} (match rates {proposal.match_rates}); finding values "
        f"{proposal.finding_values}",
        "# Trial join: " + ", ".join(f"{k} {v}" for k, v in proposal.counts.items() if v),
    ]
    return "\n".join(header) + "\n" + yaml.safe_dump(body, sort_keys=False, allow_unicode=True)


def _month(date: str) -> str:
    digits = "".join(c for c in date if c.isdigit())
    return f"{digits[:4]}-{digits[4:6]}" if len(digits) >= 6 else date


def dvc(root: Path, *args: str) -> str:
    """Run ``dvc`` in ``root``; fail naming the command and DVC's message."""
    import shutil
    import sys

    exe = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    result = subprocess.run(
        [exe, *args], cwd=root, capture_output=True, text=True, check=False, env=os.environ.copy()
    )
    if result.returncode:
        lines = [ln.strip() for ln in (result.stderr + result.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines[-1:] or ["failed"]
        raise DataSourceError(f"dvc {' '.join(args)}: {errors[0]}")
    return result.stdout


def tracked_by_dvc(root: Path, path: Path) -> bool:
    """Whether a ``.dvc`` file in the project already tracks ``path`` or a folder above it."""
    import yaml

    rel = path.resolve().relative_to(root.resolve())
    for dvc_file in root.rglob("*.dvc"):
        if ".dvc" in dvc_file.relative_to(root).parts[:-1] or ".git" in dvc_file.parts:
            continue
        try:
            outs = yaml.safe_load(dvc_file.read_text()).get("outs") or []
        except (yaml.YAMLError, AttributeError, OSError):
            continue
        for out in outs:
            target = (dvc_file.parent / str(out.get("path", ""))).resolve()
            try:
                rel.relative_to(target.relative_to(root.resolve()))
                return True
            except ValueError:
                continue
    return False


def dvc_file_for(root: Path, path: Path) -> str | None:
    """The ``.dvc`` file :func:`register` makes for ``path`` (relative to ``root``), or ``None``
    when it makes none: the path is outside the project (the pipeline's stages then depend on it
    where it is: DVC hashes it as an external dependency) or a ``.dvc`` file tracks it already."""
    try:
        rel = path.resolve().relative_to(root.resolve())
    except ValueError:
        return None
    return None if tracked_by_dvc(root, path) else f"{rel.as_posix()}.dvc"


def register(root: Path, path: Path) -> str | None:
    """Track ``path`` with DVC (``dvc add``) when :func:`dvc_file_for` names a file for it.

    Run it after ``params.yaml`` names the source: DVC reads ``dvc.yaml``, whose paths come from it.

    Returns:
        The ``.dvc`` file made, or ``None``.
    """
    dvc_file = dvc_file_for(root, path)
    if dvc_file is not None:
        dvc(root, "add", "--quiet", dvc_file.removesuffix(".dvc"))
    return dvc_file


def data_path(root: Path, path: Path) -> str:
    """How the config names ``path``: relative to the project when inside it, else absolute."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


__all__ = [
    "PHI_KEYWORDS",
    "DataSourceError",
    "DicomInventory",
    "Proposal",
    "data_path",
    "dvc_file_for",
    "inspect_dicom",
    "inspect_labels",
    "phi_fields",
    "propose",
    "register",
    "render_config",
]
