"""Ingest: any DICOM tree -> validated series -> canonical NIfTI volumes, a manifest and a quarantine.

:func:`run` is the stage's one entry point. It

1. walks ``input_dir`` (sorted) and reads every file's header once, in a process pool over chunks of
   files (:mod:`shiftguard.dicom.scan`);
2. groups slices into series, then, in the pool again (one task per series), de-duplicates,
   validates, assembles (:mod:`shiftguard.dicom.series`), resamples to the canonical RAS+ grid and
   writes ``volumes/<series_key>.nii`` (:mod:`shiftguard.data.volume`);
3. writes ``manifest.csv`` (one row per accepted series) and ``quarantine.csv`` (one row per rejected
   file or series, with the reason and a fix), both sorted, so the output does not depend on the
   number of workers.

Nothing in the input can make it crash: every file ends up either in an accepted series or in the
quarantine, and :class:`IngestSummary` checks that count.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from shiftguard.config.schema import IngestConfig
from shiftguard.data.canonical import canonical_volume, parse_patient_age, series_key
from shiftguard.data.identifiers import Pseudonymizer
from shiftguard.data.volume import (
    volume_stats,
    write_nifti,
)
from shiftguard.dicom.quarantine import QuarantineEntry
from shiftguard.dicom.scan import SliceHeader, chunked, list_files, scan_files
from shiftguard.dicom.series import (
    SeriesGroup,
    group_series,
)
from shiftguard.errors import IngestInputError, InvalidSeriesError
from shiftguard.pool import WorkerPool, limit_blas_threads, run_tasks
from shiftguard.utils import progress_bar, write_csv

log = logging.getLogger(__name__)

__all__ = [
    "MANIFEST_COLUMNS",
    "QUARANTINE_COLUMNS",
    "IngestInputError",
    "IngestSummary",
    "run",
]


MANIFEST_COLUMNS: tuple[str, ...] = (
    "series_key",
    "volume_path",
    "patient_id",
    "patient_sex",
    "patient_age",
    "study_uid",
    "series_uid",
    "accession_number",
    "study_date",
    "modality",
    "manufacturer",
    "scanner_model",
    "field_strength",
    "site",
    "station",
    "series_description",
    "series_number",
    "software_version",
    "transfer_syntax",
    "n_slices",
    "n_files",
    "rows",
    "cols",
    "pixel_spacing_row",
    "pixel_spacing_col",
    "slice_spacing",
    "slice_thickness",
    "orientation",
    "tilt_deg",
    "repetition_time",
    "echo_time",
    "flip_angle",
    "mean",
    "std",
    "min",
    "max",
    "p01",
    "p50",
    "p99",
    "foreground_fraction",
    "snr",
)
QUARANTINE_COLUMNS: tuple[str, ...] = (
    "path",
    "level",
    "series_uid",
    "code",
    "reason",
    "fix",
    "n_files",
)
VOLUMES_DIR = "volumes"
_KEY_FILE = re.compile(r"^[0-9a-f]{16}\.nii$")


@dataclass(frozen=True)
class IngestSummary:
    """Counts and speed of one ingest run.

    ``files_seen == files_accepted + files_quarantined`` always holds.
    """

    files_seen: int
    files_accepted: int
    series_accepted: int
    series_rejected: int
    files_quarantined: int
    slices_accepted: int
    slices_per_second: float
    seconds: float
    quarantine_codes: dict[str, int] = field(default_factory=dict)

    def to_metrics(self) -> dict[str, Any]:
        """Counts for ``dvc metrics``, per-code counts under ``quarantine``.

        Timings are left out: metrics are committed, and the same inputs must give the same file.
        """
        timing = {"quarantine_codes", "seconds", "slices_per_second"}
        metrics: dict[str, Any] = {k: v for k, v in asdict(self).items() if k not in timing}
        metrics["quarantine"] = dict(sorted(self.quarantine_codes.items()))
        return metrics


# --------------------------------------------------------------------------------------------------
# Per-series work (runs in the pool)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SeriesOutcome:
    row: dict[str, Any] | None
    entries: tuple[QuarantineEntry, ...]
    accepted_files: tuple[str, ...]
    n_slices: int


def _series_folder(files: Sequence[str]) -> str:
    if len(files) == 1:
        return files[0]
    try:
        return os.path.commonpath(files)
    except ValueError:  # pragma: no cover - different drives on Windows
        return files[0]


def _fmt(value: float | None, digits: int = 10) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{value:.{digits}g}"


def _ingest_series(group: SeriesGroup, rules: IngestConfig, volumes_dir: str) -> _SeriesOutcome:
    """De-duplicate, validate, assemble, resample and write one series; bad input is reported.

    Errors writing the output (disk full, permissions) are not the input's fault and propagate.
    """
    entries: list[QuarantineEntry] = []

    def rejected(code: str, reason: str, fix: str) -> _SeriesOutcome:
        files = group.files  # every file of the series (after de-duplication), even when the
        # error names only one of them (e.g. the file whose pixels do not decode)
        entries.append(
            QuarantineEntry(
                _series_folder(files), "series", group.series_uid, code, reason, fix, files
            )
        )
        return _SeriesOutcome(None, tuple(entries), (), 0)

    try:
        series, resampled, notes = canonical_volume(group, rules)
        entries.extend(notes)
        geometry = series.geometry
        stats = volume_stats(resampled.array, resampled.inside)
    except InvalidSeriesError as err:
        return rejected(err.code, err.reason, err.fix)
    except Exception as exc:  # a bug met by unusual input: report the series, keep going
        log.exception("unexpected error while assembling series %s", group.series_uid)
        return rejected(
            "internal_error",
            f"unexpected {type(exc).__name__} while assembling the series: {exc}",
            "report this series to the ShiftGuard maintainers; ingest skipped it",
        )

    key = series_key(series.series_uid)
    data = resampled.array
    path = Path(volumes_dir) / f"{key}.nii"
    tmp = path.with_name(f".{key}.{os.getpid()}.tmp.nii")
    write_nifti(tmp, data, resampled.affine)
    tmp.replace(path)

    h = series.headers[0]
    files = series.files
    ts = ";".join(sorted({x.transfer_syntax for x in series.headers}))
    row: dict[str, Any] = {
        "series_key": key,
        "volume_path": f"{VOLUMES_DIR}/{key}.nii",
        "patient_id": h.patient_id,
        "patient_sex": h.patient_sex,
        "patient_age": _fmt(parse_patient_age(h.patient_age, h.patient_birth_date, h.study_date)),
        "study_uid": series.study_uid,
        "series_uid": series.series_uid,
        "accession_number": h.accession_number,
        "study_date": h.study_date,
        "modality": h.modality,
        "manufacturer": h.manufacturer,
        "scanner_model": h.model,
        "field_strength": _fmt(h.field_strength),
        "site": h.institution,
        "station": h.station,
        "series_description": h.series_description,
        "series_number": "" if h.series_number is None else str(h.series_number),
        "software_version": h.software_version,
        "transfer_syntax": ts,
        "n_slices": len(series.headers),
        "n_files": len(files),
        "rows": h.rows,
        "cols": h.cols,
        "pixel_spacing_row": _fmt(geometry.pixel_spacing[0]),
        "pixel_spacing_col": _fmt(geometry.pixel_spacing[1]),
        "slice_spacing": _fmt(round(geometry.slice_spacing, 6)),
        "slice_thickness": _fmt(geometry.slice_thickness),
        "orientation": geometry.orientation,
        "tilt_deg": _fmt(round(geometry.tilt_deg, 3)),
        "repetition_time": _fmt(h.repetition_time),
        "echo_time": _fmt(h.echo_time),
        "flip_angle": _fmt(h.flip_angle),
    }
    for name, value in stats.items():
        row[name] = _fmt(value, 6)
    return _SeriesOutcome(row, tuple(entries), files, len(series.headers))


# --------------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------------


def _preload() -> None:
    """Import what the workers need before forking, so that each worker does not import it again."""
    import pydicom.pixels  # noqa: F401  (nibabel, imported by volume, loads pylibjpeg already)


def _crashed_chunk(pool: WorkerPool) -> Callable[[tuple[Any, ...]], Iterator[Any]]:
    """Scan a chunk that killed its worker file by file; a file that kills a worker is reported."""

    def isolate(args: tuple[Any, ...]) -> Iterator[tuple[list[SliceHeader], list[QuarantineEntry]]]:
        for path in args[0]:
            try:
                yield pool.executor.submit(scan_files, [path]).result()
            except BrokenProcessPool:
                pool.restart()
                entry = QuarantineEntry(
                    path,
                    "file",
                    "",
                    "reader_crashed",
                    "reading this file's header killed the worker process (a crash in native code)",
                    "re-export the file from the archive; if it opens elsewhere, report it to the "
                    "ShiftGuard maintainers",
                    (path,),
                )
                yield [], [entry]

    return isolate


def _crashed_series(args: tuple[Any, ...]) -> Iterator[_SeriesOutcome]:
    group: SeriesGroup = args[0]
    files = group.files
    entry = QuarantineEntry(
        _series_folder(files),
        "series",
        group.series_uid,
        "decoder_crashed",
        "assembling this series killed the worker process (a crash in native code, usually a "
        "pixel decoder on a malformed compressed image, or running out of memory)",
        "re-export the series uncompressed (e.g. gdcmconv --raw) or check the machine's memory; "
        "report it to the ShiftGuard maintainers if it persists",
        files,
    )
    yield _SeriesOutcome(None, (entry,), (), 0)


def _relative(path: str, root: Path) -> str:
    try:
        rel = os.path.relpath(path, root)
    except ValueError:  # pragma: no cover - different drives on Windows
        return Path(path).as_posix()
    return Path(rel).as_posix()


def _reject_conflicting_uids(
    groups: list[SeriesGroup],
) -> tuple[list[SeriesGroup], list[QuarantineEntry]]:
    """A SeriesInstanceUID found in several studies is ambiguous: reject every part of it."""
    counts = Counter(g.series_uid for g in groups)
    keep = [g for g in groups if counts[g.series_uid] == 1]
    entries = []
    for g in groups:
        if counts[g.series_uid] > 1:
            studies = sorted({x.study_uid for x in groups if x.series_uid == g.series_uid})
            entries.append(
                QuarantineEntry(
                    _series_folder(g.files),
                    "series",
                    g.series_uid,
                    "series_uid_conflict",
                    f"SeriesInstanceUID appears in {len(studies)} studies ({', '.join(studies)}); "
                    "a series UID must be unique",
                    "correct the UIDs at the source (one of the studies was mislabelled or "
                    "anonymised inconsistently) and ingest again",
                    g.files,
                )
            )
    return keep, entries


def _clean_volumes(volumes_dir: Path) -> None:
    """Remove volumes of a previous run (only files named like ours)."""
    if not volumes_dir.is_dir():
        return
    for p in volumes_dir.iterdir():
        if _KEY_FILE.match(p.name) or (p.name.startswith(".") and p.name.endswith(".tmp.nii")):
            p.unlink()


def _write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    # the line ends the manifest always had: every stage after ingest hashes it
    write_csv(path, columns, rows, line_end="\r\n", extras="raise")


def _quarantine_row(
    entry: QuarantineEntry, input_dir: Path, prefix: str, ids: Pseudonymizer
) -> dict[str, Any]:
    """One quarantine.csv row; with pseudonyms, the path (in the row and its reason) is ``F-...``."""
    path = _relative(entry.path, input_dir)
    reason = entry.reason.replace(prefix, "")  # paths in reasons: relative too
    if ids.active:  # the files' paths first: a folder's path is a prefix of theirs
        named = {_relative(f, input_dir) for f in entry.files} | {path}
        for rel in sorted(named, key=len, reverse=True):
            reason = reason.replace(rel, ids.path(rel))
        path = ids.path(path)
        if entry.series_uid:
            reason = reason.replace(entry.series_uid, ids.uid(entry.series_uid))
    return {
        "path": path,
        "level": entry.level,
        "series_uid": ids.uid(entry.series_uid),
        "code": entry.code,
        "reason": reason,
        "fix": entry.fix,
        "n_files": len(entry.files),
    }


def run(
    cfg: IngestConfig,
    input_dir: Path,
    out_dir: Path,
    workers: int | None = None,
    progress: bool = True,
    identifiers: Pseudonymizer | None = None,
) -> IngestSummary:
    """Ingest every DICOM file under ``input_dir`` into ``out_dir``.

    Writes ``out_dir/volumes/<series_key>.nii`` (uncompressed NIfTI, RAS+, ``cfg.spacing`` mm voxels,
    ``cfg.shape`` grid centred on the series' field of view, float32),
    ``out_dir/manifest.csv`` (:data:`MANIFEST_COLUMNS`, one row per accepted series) and
    ``out_dir/quarantine.csv`` (:data:`QUARANTINE_COLUMNS`, one row per rejected file or series).

    Args:
        cfg: The ingest section of the configuration.
        input_dir: Root of the DICOM tree (any layout; a single file also works).
        out_dir: Output folder (created; earlier volumes in ``volumes/`` are replaced).
        workers: Worker processes; ``None`` uses ``os.cpu_count()``, 1 runs in this process.
        progress: Show a rich progress bar.
        identifiers: The data source's identifier policy: with a key, patient IDs, accession
            numbers, file paths, study dates and old ages in both tables are pseudonymized (see
            :mod:`shiftguard.data.identifiers`); ``None`` keeps them.

    Returns:
        The run's counts and speed.

    Raises:
        IngestInputError: ``input_dir`` does not exist (a ``FileNotFoundError`` too).
        OSError: The output cannot be written (disk full, permissions); bad *input* never raises.
    """
    started = time.perf_counter()
    input_dir = Path(input_dir)
    out_dir = Path(out_dir)
    if not input_dir.exists():
        raise IngestInputError(
            f"ingest: input folder {input_dir} does not exist; pass the root of the DICOM tree"
        )
    volumes_dir = out_dir / VOLUMES_DIR
    volumes_dir.mkdir(parents=True, exist_ok=True)
    _clean_volumes(volumes_dir)

    files = list_files(input_dir, exclude=[out_dir])  # an output folder inside the input
    n_workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    n_workers = min(n_workers, max(1, len(files)))
    log.info("ingest: %d files under %s, %d worker(s)", len(files), input_dir, n_workers)

    headers: list[SliceHeader] = []
    entries: list[QuarantineEntry] = []
    rows: list[dict[str, Any]] = []
    accepted_files: set[str] = set()
    slices_accepted = 0
    series_accepted = 0

    with ExitStack() as stack:
        pool: WorkerPool | None = None
        _preload()
        if n_workers > 1:
            pool = WorkerPool(n_workers)
            stack.callback(pool.close)
        else:
            stack.enter_context(limit_blas_threads())
        bar = stack.enter_context(progress_bar(progress))
        t_pool = time.perf_counter()

        # 1. Header scan, in chunks of files.
        chunk = max(16, min(512, math.ceil(len(files) / (n_workers * 8)) if files else 16))
        chunks = chunked(files, chunk)
        advance = partial(bar.advance, bar.add_task("scan headers", total=len(files)))
        scan_args = [(c,) for c in chunks]
        crashed_chunk = _crashed_chunk(pool) if pool is not None else iter
        for h, q in run_tasks(
            pool, scan_files, scan_args, crashed_chunk, [len(c) for c in chunks], advance
        ):
            headers.extend(h)
            entries.extend(q)

        t_scan = time.perf_counter()
        # 2. Series: validate, assemble, resample, write.
        groups = group_series(headers)
        groups, conflicts = _reject_conflicting_uids(groups)
        entries.extend(conflicts)
        del headers
        order = sorted(range(len(groups)), key=lambda i: -len(groups[i].headers))  # big first
        tasks = [(groups[i], cfg, str(volumes_dir)) for i in order]
        advance = partial(bar.advance, bar.add_task("assemble series", total=len(tasks)))
        weights = [1] * len(tasks)
        for outcome in run_tasks(pool, _ingest_series, tasks, _crashed_series, weights, advance):
            entries.extend(outcome.entries)
            if outcome.row is not None:
                rows.append(outcome.row)
                accepted_files.update(outcome.accepted_files)
                slices_accepted += outcome.n_slices
                series_accepted += 1
        t_series = time.perf_counter()
    log.debug(
        "ingest timing: start %.3f s, scan %.3f s, series %.3f s, pool shutdown %.3f s",
        t_pool - started,
        t_scan - t_pool,
        t_series - t_scan,
        time.perf_counter() - t_series,
    )

    # 3. Reports, sorted so that the output does not depend on the worker count.
    ids = identifiers or Pseudonymizer(None)
    for row in rows:
        row["patient_id"] = ids.patient(row["patient_id"])
        row["accession_number"] = ids.accession(row["accession_number"])
        row["study_date"] = ids.study_date(row["study_date"])
        row["patient_age"] = ids.age(row["patient_age"])
        row["study_uid"] = ids.uid(row["study_uid"])
        row["series_uid"] = ids.uid(row["series_uid"])
    rows.sort(key=lambda r: (r["patient_id"], r["study_uid"], r["series_uid"]))
    prefix = str(input_dir).rstrip(os.sep) + os.sep
    quarantine_rows = sorted(
        (_quarantine_row(e, input_dir, prefix, ids) for e in entries),
        key=lambda r: (r["path"], r["level"], r["series_uid"], r["code"], r["reason"]),
    )
    _write_csv(out_dir / "manifest.csv", MANIFEST_COLUMNS, rows)
    _write_csv(out_dir / "quarantine.csv", QUARANTINE_COLUMNS, quarantine_rows)

    quarantined_files = {f for e in entries for f in e.files}
    overlap = quarantined_files & accepted_files
    unaccounted = set(files) - quarantined_files - accepted_files
    if overlap or unaccounted:
        # A bug, not bad input: every file must be either accepted or quarantined, once.
        raise RuntimeError(
            f"ingest accounting failed: {len(unaccounted)} file(s) neither accepted nor "
            f"quarantined (e.g. {sorted(unaccounted)[:3]}), {len(overlap)} both (e.g. "
            f"{sorted(overlap)[:3]}); please report this with the input tree"
        )
    seconds = time.perf_counter() - started
    codes = Counter(e.code for e in entries)
    summary = IngestSummary(
        files_seen=len(files),
        files_accepted=len(accepted_files),
        series_accepted=series_accepted,
        series_rejected=sum(1 for e in entries if e.level == "series"),
        files_quarantined=len(quarantined_files),
        slices_accepted=slices_accepted,
        slices_per_second=slices_accepted / seconds if seconds > 0 else 0.0,
        seconds=seconds,
        quarantine_codes=dict(sorted(codes.items())),
    )
    log.info(
        "ingest: %d series accepted (%d slices), %d rejected, %d of %d files quarantined, "
        "%.1f s (%.0f slices/s)",
        summary.series_accepted,
        summary.slices_accepted,
        summary.series_rejected,
        summary.files_quarantined,
        summary.files_seen,
        summary.seconds,
        summary.slices_per_second,
    )
    if codes:
        log.warning(
            "ingest: quarantined %s; see %s",
            ", ".join(f"{n} {c}" for c, n in sorted(codes.items())),
            out_dir / "quarantine.csv",
        )
    return summary
