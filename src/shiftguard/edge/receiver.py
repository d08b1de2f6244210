"""The edge service's DICOM Storage SCP: receive, write the encoded bytes, queue, acknowledge.

A C-STORE is answered "success" only after the instance's bytes are on disk (written to a temporary
name, flushed, renamed) and recorded in the :class:`~shiftguard.edge.queue.WorkQueue`; nothing on the
receive path decodes pixels. Associations are accepted only from the configured calling AE titles
(and, when given, addresses); a study becomes ready for processing when the association that
brought it is released.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import logging
import os
import socket
import ssl
import struct
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom

from shiftguard.config.deploy import EdgeConfig
from shiftguard.dicom import binary
from shiftguard.dicom.uid import check_uid
from shiftguard.edge.queue import WorkQueue
from shiftguard.edge.scp import Acceptor
from shiftguard.tls import server_context

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC210
VERIFICATION = "1.2.840.10008.1.1"  # C-ECHO, so PACS admins can test the node
RECORD_BATCH = 64  # queue records committed together under durability "association"
CALLING_AE_NOT_RECOGNISED, NO_REASON = 3, 1


def address_allowed(allowed: Sequence[str], address: str) -> bool:
    """Whether ``address`` is in one of the ``allowed`` addresses or CIDR networks (empty: any)."""
    if not allowed:
        return True
    ip = ipaddress.ip_address(address)
    return any(ip in ipaddress.ip_network(net, strict=False) for net in allowed)


@dataclass
class ReceiveStats:
    """Counters the service exposes on ``/metrics``."""

    received: int = 0
    duplicates: int = 0
    rejected: int = 0
    refused_associations: int = 0
    bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)


def no_delay(assoc: Any) -> None:
    """Switch Nagle's algorithm off on an association's socket. DIMSE exchanges are small request /
    response messages; with Nagle on one side and delayed ACKs on the other each one waits ~40 ms
    (dcmtk reads the ``TCP_NODELAY`` environment variable for the same reason)."""
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):  # not a TCP socket, or already closed
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Syncer:
    """fsyncs received files in a thread of its own, behind the acknowledgements, so that a release
    waits only for the last few (``durability: association``)."""

    def __init__(self) -> None:
        self._pending: list[tuple[int, Path]] = []
        self._written = 0  # sequence number of the last file handed in
        self._synced = 0  # every file up to this sequence number is on disk
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="scp-fsync", daemon=True)
        self._thread.start()

    def add(self, path: Path) -> int:
        with self._cond:
            self._written += 1
            self._pending.append((self._written, path))
            self._cond.notify_all()
            return self._written

    def wait(self, sequence: int, folders: Iterable[Path]) -> None:
        """Block until every file up to ``sequence`` is fsynced, then fsync ``folders``."""
        with self._cond:
            while self._synced < sequence and not self._stop:
                self._cond.wait(1.0)
        for folder in set(folders):
            fsync_folder(folder)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(10)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if self._stop and not self._pending:
                    return
                batch, self._pending = self._pending, []
            fsync_files([path for _, path in batch], folders=False)
            with self._cond:
                self._synced = batch[-1][0]
                self._cond.notify_all()


def _uids(data: bytes) -> tuple[str, str]:
    """(StudyInstanceUID, SeriesInstanceUID) from an encoded Part 10 instance, reading the header
    only: :func:`scan_uids` for little endian syntaxes, pydicom for the rest."""
    found = scan_uids(data)
    if found is not None:
        return found
    ds = pydicom.dcmread(
        io.BytesIO(data),
        stop_before_pixels=True,
        specific_tags=["StudyInstanceUID", "SeriesInstanceUID"],
    )
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


_STUDY, _SERIES = binary.TAGS["StudyInstanceUID"], binary.TAGS["SeriesInstanceUID"]
#: the receive path's walk: stops once both UIDs are found
_UID_FIELDS = binary.Fields((_STUDY, _SERIES), stop_when_found=True)


def scan_uids(data: bytes) -> tuple[str, str] | None:
    """The study and series UIDs of a Part 10 instance by walking its top-level elements with the
    DICOM binary layer's walker (about ten times faster than pydicom on the receive path). None when
    it cannot say (no Part 10 header, big endian, deflated, or an element it cannot skip): the
    caller falls back to pydicom. Raises ValueError when the dataset has no study or series UID."""
    if len(data) < 144 or data[128:132] != b"DICM":
        return None
    try:
        header = binary.parse_header(data, _UID_FIELDS)
    except (binary.NeedsFallback, binary.Truncated, struct.error):
        return None
    if binary.TS_TAG not in header.elements:
        return None  # a transfer syntax guessed from the data set: pydicom guesses better
    study, series = header.text(_STUDY), header.text(_SERIES)
    if study is None or series is None:
        raise ValueError("no StudyInstanceUID / SeriesInstanceUID in the dataset")
    return study, series


def _meta_identity(data: bytes) -> tuple[str, str]:
    """(SOP instance UID, source AE title) from a Part 10 file's meta information."""
    meta = binary.parse_meta(data)
    instance = meta.get(binary.MEDIA_SOP_INSTANCE_TAG)
    if instance is None:
        raise ValueError("no MediaStorageSOPInstanceUID in the file meta information")
    source = meta.get(binary.SOURCE_AE_TAG, (b"", b""))
    return (
        instance[1].decode("ascii").strip("\x00 "),
        source[1].decode("ascii", "replace").strip("\x00 "),
    )


def write_durably(path: Path, data: bytes, sync: bool = True) -> None:
    """Write ``data`` to ``path`` so that it is complete or absent: a temporary file renamed into
    place. With ``sync``, the file and its folder are fsynced, so it is also on disk."""
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
        fd = os.open(tmp, flags, 0o644)
    except FileNotFoundError:  # the study's first instance: make its folder
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, flags, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    if sync:
        fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_files(paths: Iterable[Path], folders: bool = True) -> None:
    """fsync files already written, then (``folders``) their folders (the renames)."""
    parents = set()
    for path in paths:
        with contextlib.suppress(FileNotFoundError):  # replaced by a duplicate meanwhile
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        parents.add(path.parent)
    if folders:
        for folder in parents:
            fsync_folder(folder)


class Receiver:
    """The Storage SCP bound to a queue and an inbox folder."""

    def __init__(
        self,
        settings: EdgeConfig,
        queue: WorkQueue,
        inbox: Path,
        on_ready: Callable[[Sequence[str]], None] | None = None,
        on_stored: Callable[[str, str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.inbox = Path(inbox)
        self.on_ready = on_ready
        self.on_stored = on_stored  # (study UID, path) of each instance stored; must not block
        self.stats = ReceiveStats()
        self._studies: dict[int, set[str]] = defaultdict(set)
        self._unsynced: dict[int, list[tuple[int, Path]]] = defaultdict(list)
        self._batches: dict[int, list[tuple[str, str, str, str, str, float]]] = defaultdict(list)
        self._syncer = Syncer()
        self._lock = threading.Lock()
        self._server: Any = None
        #: bytes received per study not yet released (a study spanning associations is counted
        #: again from the inbox), and the studies refused for their size
        self._study_bytes: dict[str, int] = {}
        self.oversized: set[str] = set()

    # the work common to both engines (runs in their threads) ---------------------------------------

    def _refusal(self, calling_ae: str, address: str) -> int | None:
        """None to accept an association, else the A-ASSOCIATE-RJ reason."""
        if not address_allowed(self.settings.allowed_addresses, address):
            log.warning("refusing an association from %s: not in allowed_addresses", address)
            self.stats.add(refused_associations=1)
            return NO_REASON
        allowed = self.settings.calling_ae_titles
        if allowed and calling_ae not in allowed:
            log.warning("refusing an association from %s: calling AE title %r not configured",
                        address, calling_ae)  # fmt: skip
            self.stats.add(refused_associations=1)
            return CALLING_AE_NOT_RECOGNISED
        return None

    def _store(self, key: int, calling_ae: str, sop_uid: str, data: bytes) -> tuple[int, str]:
        """Write one Part 10 instance and queue it; (DIMSE status, error comment).

        ``durability: instance``: the file and its record are fsynced before the answer.
        ``durability: association``: the file is written (it survives the process being killed,
        and :meth:`recover_inbox` records it should the record be lost); records are committed in
        batches, and everything is fsynced before the association's release is acknowledged."""
        try:
            study_uid, series_uid = _uids(data)
            # they name the files: checked against the UI rules before any path is built
            check_uid(study_uid, "StudyInstanceUID")
            check_uid(series_uid, "SeriesInstanceUID")
            check_uid(sop_uid, "Affected SOP Instance UID")
        except Exception as exc:  # a malformed object: refuse it, keep serving
            log.warning("refusing instance %r from %s: %s", sop_uid[:80], calling_ae, exc)
            self.stats.add(rejected=1)
            return CANNOT_UNDERSTAND, f"cannot use the instance's UIDs: {exc}"
        refusal = self._too_large(key, study_uid, len(data))
        if refusal:
            self.stats.add(rejected=1)
            return OUT_OF_RESOURCES, refusal
        path = self.inbox / study_uid / f"{sop_uid}.dcm"
        row = (sop_uid, study_uid, series_uid, str(path), calling_ae, time.time())
        try:
            if self.settings.durability == "instance":
                write_durably(path, data, sync=True)
                new = self.queue.record_instance(*row, sync=True)
                self.stats.add(duplicates=0 if new else 1)
            else:
                write_durably(path, data, sync=False)
                sequence = self._syncer.add(path)
                with self._lock:
                    batch = self._batches[key]
                    batch.append(row)
                    self._unsynced[key].append((sequence, path.parent))
                if len(batch) >= RECORD_BATCH:
                    self._flush(key)
        except OSError as exc:
            log.error("cannot store %s: %s", sop_uid, exc)
            return OUT_OF_RESOURCES, f"cannot store: {exc.strerror or exc}"
        with self._lock:
            self._studies[key].add(study_uid)
        self.stats.add(received=1, bytes=len(data))
        if self.on_stored is not None:
            self.on_stored(study_uid, str(path))
        return SUCCESS, ""

    def _too_large(self, key: int, study_uid: str, size: int) -> str:
        """Why an instance of ``size`` bytes is refused for its study's size ("" to accept).

        The first refusal marks the study failed with the reason (after committing the
        association's pending records, so none of them reopens it): it is never processed from a
        part of its images. The instances already accepted stay in the inbox."""
        limit = int(self.settings.max_study_mb * 2**20)
        if not limit:
            return ""
        with self._lock:
            used = self._study_bytes.get(study_uid)
            if used is None:  # a study that began in another association, or before a restart
                folder = self.inbox / study_uid
                used = sum(e.stat().st_size for e in os.scandir(folder)) if folder.is_dir() else 0
            over = study_uid in self.oversized or used + size > limit
            first = over and study_uid not in self.oversized
            if over:
                self.oversized.add(study_uid)
            else:
                self._study_bytes[study_uid] = used + size
        if not over:
            return ""
        reason = (
            f"study {study_uid} is larger than edge.max_study_mb ({self.settings.max_study_mb:g} "
            "MiB): refused; the images received are kept in the inbox, the study is marked "
            "failed; raise the limit to take such studies"
        )
        if first:
            log.error("%s", reason)
            self._flush(key)
            self.queue.fail_study(study_uid, reason)
        return reason

    def _flush(self, key: int) -> None:
        """Commit an association's pending records (without waiting for the disk)."""
        with self._lock:
            rows, self._batches[key] = self._batches.pop(key, []), []
        if rows:
            new = self.queue.record_instances(rows, sync=False)
            self.stats.add(duplicates=new.count(False))

    def _released(self, key: int) -> None:
        self._flush(key)
        with self._lock:
            self._batches.pop(key, None)
            studies = self._studies.pop(key, set())
            unsynced = self._unsynced.pop(key, [])
            for uid in studies:  # counted again from the inbox if more of it comes
                self._study_bytes.pop(uid, None)
        if unsynced:  # on disk before the release is acknowledged; mark_ready's synchronous
            self._syncer.wait(unsynced[-1][0], [folder for _, folder in unsynced])  # commit
        if studies:  # carries the queue records written without a sync
            if self.on_ready is not None:  # first, so the release time is noted before any worker
                self.on_ready(sorted(studies))  # can take the study
            self.queue.mark_ready(studies)

    def _aborted(self, key: int) -> None:
        # an aborted association leaves its studies receiving: the stability timer decides
        self._flush(key)
        with self._lock:
            self._batches.pop(key, None)
            self._studies.pop(key, None)
            unsynced = self._unsynced.pop(key, [])
        if unsynced:
            self._syncer.wait(unsynced[-1][0], [folder for _, folder in unsynced])
            self.queue.sync()

    def recover_inbox(self) -> int:
        """Record the received files a crash left unrecorded (``durability: association``
        acknowledges an instance once its file is written) and remove half-written temporary
        files. Returns how many instances were recovered; their studies wait for the stability
        timer like any study whose association did not end cleanly."""
        if not self.inbox.is_dir():
            return 0
        known = self.queue.instance_paths()
        rows = []
        for path in sorted(self.inbox.glob("*/*")):
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)  # never acknowledged
                continue
            if str(path) in known or path.suffix != ".dcm":
                continue
            try:
                data = path.read_bytes()
                study_uid, series_uid = _uids(data)
                sop_uid, calling_ae = _meta_identity(data)
            except Exception as exc:
                log.error("inbox file %s cannot be recovered: %s", path, exc)
                continue
            mtime = path.stat().st_mtime
            rows.append((sop_uid, study_uid, series_uid, str(path), calling_ae, mtime))
        if rows:
            self.queue.record_instances(rows, sync=True)
            log.warning("recovered %d received instances the queue had not recorded", len(rows))
        return len(rows)

    # pynetdicom's event handlers --------------------------------------------------------------------

    def _on_store(self, event: Any) -> int:
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception as exc:
            log.warning("refusing an instance from %s: %s", event.assoc.requestor.ae_title, exc)
            self.stats.add(rejected=1)
            return CANNOT_UNDERSTAND
        calling = str(event.assoc.requestor.ae_title).strip()
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        return self._store(id(event.assoc), calling, sop_uid, data)[0]

    def _on_conn_open(self, event: Any) -> None:
        no_delay(event.assoc)
        address = event.address[0]
        if not address_allowed(self.settings.allowed_addresses, address):
            log.warning("refusing a connection from %s: not in allowed_addresses", address)
            self.stats.add(refused_associations=1)
            event.assoc.abort()

    def _on_rejected(self, event: Any) -> None:
        self.stats.add(refused_associations=1)

    # life cycle -------------------------------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.settings.tls_cert:
            return None
        return server_context(self.settings.tls_cert, self.settings.tls_key, self.settings.tls_ca)

    def start(self) -> None:
        from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts

        self.recover_inbox()
        storage = {str(c.abstract_syntax) for c in AllStoragePresentationContexts}
        if self.settings.engine == "asyncio":
            self._server = Acceptor(
                self.settings.host,
                self.settings.port,
                self.settings.ae_title,
                storage | {VERIFICATION},
                {str(ts) for ts in ALL_TRANSFER_SYNTAXES},
                accept=self._refusal,
                store=lambda a, _cls, uid, data: self._store(id(a), a.calling_ae, uid, data),
                released=lambda a: self._released(id(a)),
                aborted=lambda a: self._aborted(id(a)),
                ssl_context=self._ssl_context(),
                max_pdu=self.settings.max_pdu,
                acse_timeout=min(30.0, self.settings.network_timeout_s),
                network_timeout=self.settings.network_timeout_s,
            )
            self._server.start()
        else:
            self._start_pynetdicom(storage, list(ALL_TRANSFER_SYNTAXES))
        log.info(
            "DICOM SCP %s (%s) listening on %s:%d (calling AE titles: %s)",
            self.settings.ae_title,
            self.settings.engine,
            self.settings.host,
            self.port,
            ", ".join(self.settings.calling_ae_titles) or "any",
        )

    def _start_pynetdicom(self, storage: set[str], syntaxes: list[str]) -> None:
        from pynetdicom import AE, evt

        ae = AE(ae_title=self.settings.ae_title)
        for sop_class in sorted(storage):
            ae.add_supported_context(sop_class, syntaxes)
        ae.add_supported_context(VERIFICATION)
        ae.require_calling_aet = list(self.settings.calling_ae_titles)
        ae.maximum_pdu_size = self.settings.max_pdu
        ae.network_timeout = self.settings.network_timeout_s
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, lambda e: self._released(id(e.assoc))),
            (evt.EVT_ABORTED, lambda e: self._aborted(id(e.assoc))),
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        self._server = ae.start_server(
            (self.settings.host, self.settings.port),
            block=False,
            evt_handlers=handlers,
            ssl_context=self._ssl_context(),
        )

    @property
    def port(self) -> int:
        if self._server is None:
            return self.settings.port
        if self.settings.engine == "asyncio":
            return int(self._server.port)
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            if self.settings.engine == "asyncio":
                self._server.stop()
            else:
                self._server.shutdown()
            self._server = None
        self._syncer.close()
