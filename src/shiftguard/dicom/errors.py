"""Typed errors of DICOM ingest.

Every error a user can meet carries a short machine-readable ``code`` (a slug used in the quarantine
report), a ``reason`` (what is wrong, with which input) and a ``fix`` (what would make the input
acceptable). ``str(err)`` joins them into one readable sentence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from shiftguard.errors import ShiftGuardError


class DicomIngestError(ShiftGuardError):
    """Base of all DICOM ingest errors.

    Args:
        code: Short slug naming the problem, e.g. ``"missing_slice"``.
        reason: What is wrong and with which input.
        fix: What would fix it.
    """

    def __init__(self, code: str, reason: str, fix: str) -> None:
        self.code = code
        self.reason = reason
        self.fix = fix
        super().__init__(f"{reason} [{code}]. To fix: {fix}")

    def __reduce__(self) -> tuple[object, ...]:
        # Keeps the error picklable across process pools despite the keyword-rich __init__.
        return (self.__class__._rebuild, (self.__class__, self.__dict__.copy()))

    @staticmethod
    def _rebuild(cls: type[DicomIngestError], state: dict[str, object]) -> DicomIngestError:
        err = cls.__new__(cls)
        err.__dict__.update(state)
        Exception.__init__(err, f"{err.reason} [{err.code}]. To fix: {err.fix}")
        return err


class UnreadableFileError(DicomIngestError):
    """One file cannot be used: not DICOM, truncated, not an image, malformed header, ...

    Args:
        path: The file.
        code: Short slug, e.g. ``"truncated"``, ``"not_dicom"``, ``"not_image"``, ``"dicomdir"``.
        reason: What is wrong with it.
        fix: What would fix it.
    """

    def __init__(self, path: str, code: str, reason: str, fix: str) -> None:
        self.path = path
        super().__init__(code, reason, fix)


class InvalidSeriesError(DicomIngestError):
    """A series cannot be assembled into a volume: mixed geometry, missing slice, bad pixels, ...

    Args:
        code: Short slug, e.g. ``"missing_slice"``, ``"duplicate_position"``.
        reason: What is wrong with the series.
        fix: What would fix it.
        files: The series' files (paths as given in the slice headers).
    """

    def __init__(self, code: str, reason: str, fix: str, files: Sequence[str] = ()) -> None:
        self.files = tuple(files)
        super().__init__(code, reason, fix)


class PixelDecodeError(InvalidSeriesError):
    """The pixel data of one file of a series could not be read or decoded."""


@dataclass(frozen=True)
class QuarantineEntry:
    """One row of the quarantine report: a file or a series that did not become a volume.

    Attributes:
        path: The file, or for a series the folder holding its files.
        level: ``"file"`` or ``"series"``.
        series_uid: SeriesInstanceUID when known, else ``""``.
        code: Short slug naming the problem.
        reason: What is wrong.
        fix: What would fix it.
        files: The files this entry accounts for (the file itself for a file entry, all the
            series' files for a series entry).
    """

    path: str
    level: str
    series_uid: str
    code: str
    reason: str
    fix: str
    files: tuple[str, ...] = field(default=())

    @classmethod
    def for_file(cls, err: UnreadableFileError, series_uid: str = "") -> QuarantineEntry:
        """Build the file-level entry of an :class:`UnreadableFileError`."""
        return cls(err.path, "file", series_uid, err.code, err.reason, err.fix, (err.path,))


class InvalidUidError(ShiftGuardError, ValueError):
    """A value that should be a DICOM UID breaks the UI rules (PS3.5 9.1); the message names it."""
