"""Work on a study while it arrives: each stored instance's header is read and its slice resampled
in a thread beside the receiver, so that after the association's release only the last slices,
the product across the slices, inference and the two result objects remain.

The receiver hands over every instance it stores (:meth:`Prefetcher.add`); one thread reads its
header (:func:`~shiftguard.dicom.scan.scan_files`) and, for a series the served bundle may read
(:meth:`~shiftguard.edge.predict.Predictor.wants`), feeds the slice to the series'
:class:`~shiftguard.data.stream.SeriesStream`, which reduces it to the bundle's canonical grid.
The worker that claims the study takes what was prepared (:meth:`Prefetcher.take`): headers it
need not read again and streams to finish; anything not prepared yet it does itself. A study taken
is closed: an instance arriving later is prepared for the next revision of the study.

The thread never delays the receiver (it has a queue of its own; when that is full an instance is
left to the worker) and never fails a study: an error here is logged and the worker reads the
file the usual way. It holds the reduced slices of the studies being received, and forgets a study
after :data:`FORGET_S` without being taken (one that was refused or failed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from shiftguard.data.stream import SeriesStream
from shiftguard.dicom.scan import scan_files

if TYPE_CHECKING:
    from shiftguard.dicom.quarantine import QuarantineEntry
    from shiftguard.dicom.scan import SliceHeader
    from shiftguard.edge.predict import Predictor

log = logging.getLogger(__name__)

__all__ = ["Prefetcher", "PreparedStudy"]

#: instances waiting for the thread; beyond this the worker reads them itself
QUEUE_LIMIT = 100_000
#: the thread's scheduling niceness (Linux): receiving goes first when the cores are busy
NICENESS = 10
#: a study not taken this long after its last instance is forgotten (seconds)
FORGET_S = 3600.0


@dataclass
class PreparedStudy:
    """What was read of one study's files while they arrived."""

    headers: dict[str, list[SliceHeader]] = field(default_factory=dict)
    issues: dict[str, list[QuarantineEntry]] = field(default_factory=dict)
    series: dict[str, SeriesStream] = field(default_factory=dict)
    closed: bool = False
    touched: float = field(default_factory=time.monotonic)

    def scanned(
        self, files: Sequence[str | Path]
    ) -> tuple[list[SliceHeader], list[QuarantineEntry]]:
        """``scan_files(files)``, from the headers read already and by reading the others."""
        rest = [f for f in map(str, files) if f not in self.headers and f not in self.issues]
        if rest:
            more, problems = scan_files(rest)
            by_path: dict[str, list[SliceHeader]] = {}
            for h in more:
                by_path.setdefault(h.path, []).append(h)
            issue_by_path: dict[str, list[QuarantineEntry]] = {}
            for e in problems:
                issue_by_path.setdefault(e.path, []).append(e)
        else:
            by_path, issue_by_path = {}, {}
        headers: list[SliceHeader] = []
        issues: list[QuarantineEntry] = []
        for f in map(str, files):
            headers.extend(self.headers.get(f) or by_path.get(f, []))
            issues.extend(self.issues.get(f) or issue_by_path.get(f, []))
        return headers, issues


class Prefetcher:
    """The thread that prepares studies while they arrive.

    Args:
        predictor: Returns the bundle served now (whose grid and selection the slices are
            prepared for).
    """

    def __init__(self, predictor: Callable[[], Predictor]) -> None:
        self._predictor = predictor
        self._queue: queue.Queue[tuple[int, str, str] | None] = queue.Queue(QUEUE_LIMIT)
        self._studies: dict[str, PreparedStudy] = {}
        # instances are numbered as they come; a study taken at number n drops its items up to n
        # (its worker reads those files itself) and prepares later ones for its next revision
        self._added = 0
        self._taken: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.prepared = 0  # instances prepared
        self.errors = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout=10)

    def add(self, study_uid: str, path: str) -> None:
        """An instance of ``study_uid`` was stored at ``path`` (from the receiver; never blocks)."""
        with self._lock:
            self._added += 1
            number = self._added
        with contextlib.suppress(queue.Full):  # full: the worker reads it
            self._queue.put_nowait((number, study_uid, str(path)))

    def take(self, study_uid: str) -> PreparedStudy | None:
        """What was prepared of ``study_uid``, closed to further instances (None: nothing)."""
        with self._lock:
            study = self._studies.pop(study_uid, None)
            if study is not None:
                study.closed = True
            self._taken[study_uid] = (self._added, time.monotonic())
        return study

    def _run(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # Linux: a thread has its own niceness
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICENESS)
        while True:
            item = self._queue.get()
            if item is None:
                return
            number, study_uid, path = item
            try:
                self._prepare(number, study_uid, path)
            except Exception:  # the worker reads the file itself; never fails a study here
                self.errors += 1
                log.exception("could not prepare %s while it arrived (read when processed)", path)

    def _open(self, number: int, study_uid: str) -> PreparedStudy | None:
        """The study's preparation (None: the item came before the study was taken)."""
        now = time.monotonic()
        with self._lock:
            stale = [uid for uid, s in self._studies.items() if now - s.touched > FORGET_S]
            for uid in stale:
                del self._studies[uid]
            for uid in [u for u, (_, at) in self._taken.items() if now - at > FORGET_S]:
                del self._taken[uid]
            if number <= self._taken.get(study_uid, (0, 0.0))[0]:
                return None
            study = self._studies.get(study_uid)
            if study is None:
                study = self._studies[study_uid] = PreparedStudy()
            study.touched = now
            return study

    def _prepare(self, number: int, study_uid: str, path: str) -> None:
        predictor = self._predictor()
        study = self._open(number, study_uid)
        if study is None or study.closed:
            return
        headers, issues = scan_files([path])
        for h in headers:
            if not predictor.wants(h):
                continue
            stream = study.series.get(h.series_uid)
            if stream is None:
                stream = study.series.setdefault(h.series_uid, SeriesStream(predictor.rules, h))
            if not study.closed:
                stream.add(h)
        with self._lock:
            if study.closed:
                return  # taken meanwhile: its worker read this file itself
            study.headers[path] = list(headers)
            if issues:
                study.issues[path] = list(issues)
        self.prepared += 1
