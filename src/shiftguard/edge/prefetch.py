"""Work on a study while it arrives: each stored instance's header is read and its slice resampled
beside the receiver, so that after the association's release only the last slices, the product
across the slices, inference and the two result objects remain.

The receiver hands over every instance it stores (:meth:`Prefetcher.add`). A preparer reads its
header (:func:`~shiftguard.dicom.scan.scan_files`) and, for a series the served bundle may read
(its series selection, as far as one slice tells), reduces the slice to the bundle's canonical
grid (:func:`~shiftguard.data.stream.reduce_slice`); the slices are collected in the series'
:class:`~shiftguard.data.stream.SeriesStream`. The worker that claims the study takes what was
prepared (:meth:`Prefetcher.take`): headers it need not read again and streams to finish; anything
not prepared yet it does itself. A study taken is closed: an instance arriving later is prepared
for the next revision of the study.

The preparer runs in a child process by default (``edge.prepare_in: process``): the receiver's
event loop is Python, and a preparing thread in the same process takes the interpreter's lock from
it for every header it parses and every slice it decodes, which slows receiving on a small box. Only
the path goes to the child and only the header and the reduced plane (the grid's in-plane size,
float32) come back. ``thread`` keeps it in the service's process (no second process, slower
receiving).

Preparing never delays the receiver (its queue has a bound; past it an instance is left to the
worker) and never fails a study: an error here, or a child that dies, is logged and the worker
reads the files the usual way (a dead child is started again for the next instance). It holds the
reduced slices of the studies being received, and forgets a study after :data:`FORGET_S` without
being taken (one that was refused or failed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from shiftguard.data.stream import SeriesStream, reduce_slice, stream_plan
from shiftguard.dicom.scan import scan_files
from shiftguard.dicom.series import SeriesGroup
from shiftguard.edge.predict import header_refusal

if TYPE_CHECKING:
    import numpy as np

    from shiftguard.config.deploy import SeriesSelection
    from shiftguard.config.schema import IngestConfig
    from shiftguard.data.volume import InPlanePlan
    from shiftguard.dicom.quarantine import QuarantineEntry
    from shiftguard.dicom.scan import SliceHeader
    from shiftguard.edge.predict import Predictor

log = logging.getLogger(__name__)

__all__ = ["Prefetcher", "PreparedStudy"]

#: instances waiting for the preparer; beyond this the worker reads them itself
QUEUE_LIMIT = 100_000
#: the preparing process' scheduling niceness (Linux): the lowest priority, so that receiving
#: always goes first and preparing takes the cycles left (on 2 cores shared with a local sender it
#: still kept up with a 1 GiB study); a study it is behind on is finished by the worker, so on a
#: box busy with other work studies fall back to being read after their release
NICENESS = 19
#: the preparing thread's: it also competes for the interpreter's lock, which niceness cannot
#: give back, so it is less far down
THREAD_NICENESS = 10
#: a study not taken this long after its last instance is forgotten (seconds)
FORGET_S = 3600.0
#: instances (and results) sent to (and from) the preparer in one message at most
BATCH = 64
#: child processes started again after one died; past this the worker reads every file
MAX_RESTARTS = 10
#: how often the collector looks whether the preparer is still there (seconds)
CHECK_S = 1.0

Mode = Literal["process", "thread"]
#: one slice prepared: its header, reduced plane, minimum and the key of the plan that reduced it
Slice = tuple["SliceHeader", "np.ndarray | None", float, tuple[object, ...]]
_CONFIGURE, _INSTANCE, _READY = "configure", "instance", "ready"


class _Preparer:
    """Reads one instance and reduces the slices of the series a bundle may read (in the child
    process, or in the service's preparing thread)."""

    def __init__(self) -> None:
        self.generation = -1
        self.rules: IngestConfig | None = None
        self.selection: SeriesSelection | None = None
        self._plans: dict[str, InPlanePlan | None] = {}

    def configure(self, generation: int, rules: IngestConfig, selection: SeriesSelection) -> None:
        self.generation, self.rules, self.selection = generation, rules, selection
        self._plans.clear()

    def prepare(self, path: str) -> tuple[list[SliceHeader], list[QuarantineEntry], list[Slice]]:
        assert self.rules is not None and self.selection is not None
        headers, issues = scan_files([path])
        slices: list[Slice] = []
        for h in headers:
            group = SeriesGroup(h.study_uid, h.series_uid, (h,))
            if header_refusal(self.selection, group, count=False) is not None:
                continue
            if h.series_uid not in self._plans:
                if len(self._plans) > 1000:  # series of studies long gone
                    self._plans.clear()
                self._plans[h.series_uid] = stream_plan(self.rules, h)
            plan = self._plans[h.series_uid]
            if plan is None or (h.rows, h.cols) != (plan.rows, plan.cols):
                slices.append((h, None, 0.0, ()))  # wanted, not streamed
                continue
            plane, minimum = reduce_slice(plan, h)
            slices.append((h, plane, minimum, plan.key))
        return headers, issues, slices


def _serve(
    receive: Callable[[], list[Any]],
    pending: Callable[[], bool],
    send: Callable[[Any], None],
    niceness: int,
) -> None:
    """The preparer's loop: lists of configurations and instances from ``receive``, the results
    to ``send`` in lists, each sent when nothing more is ``pending`` (or :data:`BATCH` are ready),
    so that the service wakes for a batch rather than for every instance; ends on ``None`` or
    when the other end is gone."""
    with contextlib.suppress(OSError, AttributeError):  # Linux: a thread has its own niceness
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    preparer = _Preparer()
    send(_READY)
    batch: list[Any] = []
    while True:
        if batch and (len(batch) >= BATCH or not pending()):
            send(batch)
            batch = []
        for item in receive():
            if item is None:
                return
            if item[0] == _CONFIGURE:
                preparer.configure(*item[1:])
                continue
            _, number, study_uid, path = item
            try:
                prepared: Any = preparer.prepare(path)
                error = ""
            except Exception as exc:  # the worker reads the file itself; never fails a study
                prepared, error = None, f"{type(exc).__name__}: {exc}"
            batch.append((number, study_uid, path, preparer.generation, prepared, error))


def _child_main(argv: Sequence[str]) -> None:
    """The child process' entry: ``argv`` = the requests' and the results' pipe ends, niceness."""
    from multiprocessing.connection import Connection

    requests = Connection(int(argv[0]), writable=False)
    results = Connection(int(argv[1]), readable=False)
    with contextlib.suppress(EOFError, OSError):  # the service ended: so does this
        _serve(requests.recv, lambda: requests.poll(0), results.send, int(argv[2]))


class _InThread:
    """The preparer as a thread of this process."""

    def __init__(self, niceness: int) -> None:
        self._requests: queue.Queue[Any] = queue.Queue()
        self._results: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(
            target=_serve,
            args=(self._receive, lambda: not self._requests.empty(), self._results.put, niceness),
            name="prepare", daemon=True,
        )  # fmt: skip
        self._thread.start()

    def _receive(self) -> list[Any]:
        return [self._requests.get()]

    def put(self, item: Any) -> None:
        self._requests.put(item)

    def get(self, timeout: float) -> Any:
        """The next result (raises queue.Empty after ``timeout``)."""
        return self._results.get(timeout=timeout)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._requests.put(None)
        self._thread.join(timeout=10)
        self._results.put(None)  # the collector's end

    def describe(self) -> str:
        return "thread"


class _InProcess:
    """The preparer in a child process (``python -c``, so that nothing of the service's main
    module runs again there), a pipe each way. Requests go through a feeding thread: a full pipe
    makes it wait, never the receiver. The child ends with its pipe, so it never outlives the
    service, killed or not."""

    def __init__(self, niceness: int) -> None:
        from multiprocessing.connection import Connection

        import shiftguard

        request_r, request_w = os.pipe()
        result_r, result_w = os.pipe()
        package_root = str(Path(shiftguard.__file__).resolve().parents[1])
        path = os.pathsep.join([package_root, *filter(None, [os.environ.get("PYTHONPATH")])])
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(request_r), str(result_w), str(niceness)],
                pass_fds=(request_r, result_w),
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": path, **_ONE_THREAD},
            )
        finally:
            os.close(request_r)
            os.close(result_w)
        self._out = Connection(request_w, readable=False)
        self._in = Connection(result_r, writable=False)
        self._pending: queue.Queue[Any] = queue.Queue()
        self._feeder = threading.Thread(target=self._feed, name="prepare-feed", daemon=True)
        self._feeder.start()

    def _feed(self) -> None:
        """Send what is waiting, up to :data:`BATCH` items a message."""
        while True:
            items = [self._pending.get()]
            while len(items) < BATCH and items[-1] is not None:
                try:
                    items.append(self._pending.get_nowait())
                except queue.Empty:
                    break
            try:
                self._out.send(items)
            except OSError:  # the child is gone: the worker reads what it did not prepare
                return
            if items[-1] is None:
                return

    def put(self, item: Any) -> None:
        self._pending.put(item)

    def get(self, timeout: float) -> Any:
        """The next result (queue.Empty after ``timeout``; EOFError when the child is gone)."""
        if not self._in.poll(timeout):
            raise queue.Empty
        return self._in.recv()

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """End the child at once (it holds nothing the service needs)."""
        self._pending.put(None)
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self._feeder.join(timeout=5)
        self._out.close()

    def describe(self) -> str:
        return f"process {self.process.pid} (exit {self.process.returncode})"


#: the child's numerical libraries run one thread: its products are small, and a pool of threads
#: waiting for work spins on the cores the receiver needs
_ONE_THREAD = {v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
_CHILD = "import sys; from shiftguard.edge.prefetch import _child_main; _child_main(sys.argv[1:])"


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
    """Prepares studies while they arrive.

    Args:
        predictor: Returns the bundle served now (whose grid and selection the slices are
            prepared for).
        mode: ``"process"``: the preparer runs in a child process (started by :meth:`start`,
            again after it dies, up to :data:`MAX_RESTARTS` times; then the worker reads every
            file); ``"thread"``: in a thread of this process.
    """

    def __init__(self, predictor: Callable[[], Predictor], mode: Mode = "process") -> None:
        self._predictor = predictor
        self.mode: Mode = mode
        self._studies: dict[str, PreparedStudy] = {}
        # instances are numbered as they come; a study taken at number n drops its items up to n
        # (its worker reads those files itself) and prepares later ones for its next revision
        self._added = 0
        self._done = 0  # instances whose result came back (prepared, failed or dropped)
        self._taken: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()
        self._preparer: _InProcess | _InThread | None = None
        self._collector: threading.Thread | None = None
        self._running = False
        # what the preparer was told: the generation of each configuration and its rules
        self._configured: Predictor | None = None
        self._generation = -1
        self._rules: dict[int, IngestConfig] = {}
        self.prepared = 0  # instances prepared
        self.errors = 0  # instances that could not be prepared (the worker read them)
        self.restarts = 0  # child processes started again after one died
        self.ready = threading.Event()  # the preparer takes instances

    def start(self) -> None:
        """Start the preparer (a child process takes a second or two to import what it needs;
        instances that come meanwhile wait for it, or are read by the worker)."""
        with self._lock:
            self._running = True
            if self._preparer is None:
                self._launch()

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """Until the preparer takes instances (whether it does)."""
        return self.ready.wait(timeout)

    def stop(self) -> None:
        with self._lock:
            self._running = False
            preparer, self._preparer = self._preparer, None
            collector, self._collector = self._collector, None
        if preparer is not None:
            preparer.stop()
        if collector is not None:
            collector.join(timeout=10)

    @property
    def child_pid(self) -> int | None:
        """The preparing process' id (None: no child process)."""
        preparer = self._preparer
        return preparer.process.pid if isinstance(preparer, _InProcess) else None

    def backlog(self) -> int:
        """Instances handed over and not prepared (nor dropped) yet."""
        with self._lock:
            return self._added - self._done

    def _launch(self) -> None:
        """Start the preparer (under the lock)."""
        self.ready.clear()
        try:
            self._preparer = (
                _InProcess(NICENESS) if self.mode == "process" else _InThread(THREAD_NICENESS)
            )
        except OSError as exc:
            log.error("cannot start the preparing process (%s): preparing in a thread instead",
                      exc)  # fmt: skip
            self.mode = "thread"
            self._preparer = _InThread(THREAD_NICENESS)
        self._configured = None
        self._done = self._added  # what the last preparer held is the worker's now
        self._collector = threading.Thread(
            target=self._collect, args=(self._preparer,), name="prepared", daemon=True
        )
        self._collector.start()

    def add(self, study_uid: str, path: str) -> None:
        """An instance of ``study_uid`` was stored at ``path`` (from the receiver; never blocks)."""
        predictor = self._predictor()
        with self._lock:
            if not self._running:
                return
            if self._preparer is None or not self._preparer.alive():
                if self._preparer is not None:
                    if self.restarts >= MAX_RESTARTS:
                        log.error("the preparer ended again (%s), %d restarts: studies are "
                                  "read after their release from now on",
                                  self._preparer.describe(), self.restarts)  # fmt: skip
                        self._running = False
                        return
                    self.restarts += 1
                    log.warning("the preparer ended (%s); starting it again",
                                self._preparer.describe())  # fmt: skip
                self._launch()
            assert self._preparer is not None
            self._added += 1
            number = self._added
            if self._added - self._done > QUEUE_LIMIT:
                self._done += 1  # the worker reads it
                return
            if predictor is not self._configured:
                self._generation += 1
                self._rules[self._generation] = predictor.rules
                for old in [g for g in self._rules if g < self._generation - 8]:
                    del self._rules[old]
                self._preparer.put(
                    (_CONFIGURE, self._generation, predictor.rules, predictor.selection)
                )
                self._configured = predictor
            self._preparer.put((_INSTANCE, number, study_uid, str(path)))

    def take(self, study_uid: str) -> PreparedStudy | None:
        """What was prepared of ``study_uid``, closed to further instances (None: nothing)."""
        with self._lock:
            study = self._studies.pop(study_uid, None)
            if study is not None:
                study.closed = True
            self._taken[study_uid] = (self._added, time.monotonic())
        return study

    def _collect(self, preparer: _InProcess | _InThread) -> None:
        """Apply what ``preparer`` sends back, until it stops or is gone."""
        while True:
            try:
                item = preparer.get(CHECK_S)
            except queue.Empty:
                if not preparer.alive():
                    break  # the next instance starts another
                continue
            except (EOFError, OSError):
                break
            if item is None:
                break
            if item == _READY:
                self.ready.set()
                continue
            for result in item:
                try:
                    self._apply(*result)
                except Exception:  # never fails a study: the worker reads what is missing
                    self.errors += 1
                    log.exception("could not keep what was prepared of %s", result[2])
                with self._lock:
                    if preparer is self._preparer:
                        self._done += 1
        with self._lock:
            if preparer is self._preparer and not self.ready.is_set() and self.mode == "process":
                log.error("the preparing process ended before it was ready (%s): preparing in "
                          "a thread instead", preparer.describe())  # fmt: skip
                self.mode = "thread"

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

    def _apply(
        self,
        number: int,
        study_uid: str,
        path: str,
        generation: int,
        prepared: tuple[list[SliceHeader], list[QuarantineEntry], list[Slice]] | None,
        error: str,
    ) -> None:
        if prepared is None:
            self.errors += 1
            log.warning("could not prepare %s while it arrived (read when processed): %s",
                        path, error)  # fmt: skip
            return
        headers, issues, slices = prepared
        rules = self._rules.get(generation)
        study = self._open(number, study_uid)
        if study is None or study.closed or rules is None:
            return
        for h, plane, minimum, key in slices:
            stream = study.series.get(h.series_uid)
            if stream is None:
                stream = study.series.setdefault(h.series_uid, SeriesStream(rules, h))
            if plane is not None and not study.closed:
                stream.put(h, plane, minimum, key)
        with self._lock:
            if study.closed:
                return  # taken meanwhile: its worker read this file itself
            study.headers[path] = list(headers)
            if issues:
                study.issues[path] = list(issues)
        self.prepared += 1
