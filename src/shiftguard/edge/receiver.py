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
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shiftguard.edge.queue import WorkQueue

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC210
VERIFICATION = "1.2.840.10008.1.1"  # C-ECHO, so PACS admins can test the node


@dataclass(frozen=True)
class ReceiverSettings:
    """Where and from whom the SCP accepts studies."""

    ae_title: str = "SHIFTGUARD"
    host: str = "127.0.0.1"
    port: int = 11112
    calling_ae_titles: tuple[str, ...] = ()
    allowed_addresses: tuple[str, ...] = ()
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    max_pdu: int = 0  # 0: unlimited

    def address_allowed(self, address: str) -> bool:
        if not self.allowed_addresses:
            return True
        ip = ipaddress.ip_address(address)
        return any(ip in ipaddress.ip_network(net, strict=False) for net in self.allowed_addresses)


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


def _uids(data: bytes) -> tuple[str, str]:
    """(StudyInstanceUID, SeriesInstanceUID) from an encoded instance, reading the header only."""
    import pydicom

    ds = pydicom.dcmread(
        io.BytesIO(data),
        stop_before_pixels=True,
        specific_tags=["StudyInstanceUID", "SeriesInstanceUID"],
    )
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def _safe(uid: str) -> str:
    return "".join(c for c in uid if c.isdigit() or c == ".")[:64] or "unknown"


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that it is complete on disk or absent: temp file, fsync,
    rename, fsync of the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Receiver:
    """The Storage SCP bound to a queue and an inbox folder."""

    def __init__(
        self,
        settings: ReceiverSettings,
        queue: WorkQueue,
        inbox: Path,
        on_ready: Callable[[Sequence[str]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.inbox = Path(inbox)
        self.on_ready = on_ready
        self.stats = ReceiveStats()
        self._studies: dict[int, set[str]] = defaultdict(set)
        self._lock = threading.Lock()
        self._server: Any = None

    # the handlers run in pynetdicom's association threads -------------------------------------------

    def _on_store(self, event: Any) -> int:
        try:
            data = event.encoded_dataset(include_meta=True)
            sop_uid = str(event.request.AffectedSOPInstanceUID)
            study_uid, series_uid = _uids(data)
        except Exception as exc:  # a malformed object: refuse it, keep serving
            log.warning("refusing an instance from %s: %s", event.assoc.requestor.ae_title, exc)
            self.stats.add(rejected=1)
            return CANNOT_UNDERSTAND
        path = self.inbox / _safe(study_uid) / f"{_safe(sop_uid)}.dcm"
        try:
            write_durably(path, data)
            new = self.queue.record_instance(
                sop_uid,
                study_uid,
                series_uid,
                str(path),
                str(event.assoc.requestor.ae_title).strip(),
            )
        except OSError as exc:
            log.error("cannot store %s: %s", sop_uid, exc)
            return OUT_OF_RESOURCES
        with self._lock:
            self._studies[id(event.assoc)].add(study_uid)
        self.stats.add(received=1, duplicates=0 if new else 1, bytes=len(data))
        return SUCCESS

    def _on_released(self, event: Any) -> None:
        with self._lock:
            studies = self._studies.pop(id(event.assoc), set())
        if studies:
            if self.on_ready is not None:  # first, so the release time is noted before any worker
                self.on_ready(sorted(studies))  # can take the study
            self.queue.mark_ready(studies)

    def _on_aborted(self, event: Any) -> None:
        # an aborted association leaves its studies receiving: the stability timer decides
        with self._lock:
            self._studies.pop(id(event.assoc), None)

    def _on_conn_open(self, event: Any) -> None:
        no_delay(event.assoc)
        address = event.address[0]
        if not self.settings.address_allowed(address):
            log.warning("refusing a connection from %s: not in allowed_addresses", address)
            self.stats.add(refused_associations=1)
            event.assoc.abort()

    def _on_rejected(self, event: Any) -> None:
        self.stats.add(refused_associations=1)

    # life cycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

        ae = AE(ae_title=self.settings.ae_title)
        for storage in AllStoragePresentationContexts:
            ae.add_supported_context(str(storage.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(VERIFICATION)
        ae.require_calling_aet = list(self.settings.calling_ae_titles)
        ae.maximum_pdu_size = self.settings.max_pdu
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        context: ssl.SSLContext | None = None
        if self.settings.tls_cert:
            context = ssl.create_default_context(
                ssl.Purpose.CLIENT_AUTH, cafile=self.settings.tls_ca
            )
            context.load_cert_chain(self.settings.tls_cert, self.settings.tls_key)
            if self.settings.tls_ca:
                context.verify_mode = ssl.CERT_REQUIRED
        self._server = ae.start_server(
            (self.settings.host, self.settings.port),
            block=False,
            evt_handlers=handlers,
            ssl_context=context,
        )
        log.info(
            "DICOM SCP %s listening on %s:%d (calling AE titles: %s)",
            self.settings.ae_title,
            self.settings.host,
            self.port,
            ", ".join(self.settings.calling_ae_titles) or "any",
        )

    @property
    def port(self) -> int:
        if self._server is None:
            return self.settings.port
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
