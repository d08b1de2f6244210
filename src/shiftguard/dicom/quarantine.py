"""The quarantine report's rows: a file or a series that did not become a volume.

An entry says what went wrong in the terms of the ingest errors
(:class:`~shiftguard.errors.DicomIngestError`): a ``code``, a ``reason`` and a ``fix``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shiftguard.errors import UnreadableFileError


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
