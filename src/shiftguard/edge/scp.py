"""A Storage SCP on asyncio: the DICOM upper layer (PS3.8) and the DIMSE messages (PS3.7) a
modality's sending job needs, C-STORE and C-ECHO, in one event loop.

pynetdicom runs two threads per association that hand each PDU over through polled queues; on
loopback that caps a single association near 360 images/s whatever the handler does, several times
below dcmtk's ``storescp``. Receiving is the service's hot path, so this module implements the
acceptor directly: association negotiation (calling AE titles checked, presentation contexts for
the storage SOP classes and Verification, any transfer syntax pydicom knows), P-DATA reassembly,
the C-STORE / C-ECHO responses, release and abort, optional TLS, and ARTIM / idle timeouts. The
dataset bytes are never decoded here; :class:`Acceptor` hands them, with the file meta information
built from the negotiated context, to a ``store`` callable that answers with a DIMSE status.

The protocol is small and fixed; what it does not implement (asynchronous operations windows, role
selection, extended negotiation, user identity) is negotiated away, as the standard allows: a
requestor proposing them gets the default behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shiftguard.dicom import binary

log = logging.getLogger(__name__)

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1463.1"  # ShiftGuard's implementation class
IMPLEMENTATION_VERSION = "SHIFTGUARD_1"
VERIFICATION = "1.2.840.10008.1.1"

# PDU types (PS3.8 9.3)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA, RELEASE_RQ, RELEASE_RP, ABORT = 0x04, 0x05, 0x06, 0x07
MAX_PDU_ACCEPTED = 64 * 1024 * 1024  # a PDU claiming more than this is not DICOM; abort
MAX_COMMAND_BYTES = 64 * 1024  # a DIMSE command set is a few hundred bytes
MAX_DATASET_BYTES = 1 << 30  # one instance; a larger one aborts its association (memory bound)

# DIMSE command fields (PS3.7 E.1)
C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
NO_DATASET = 0x0101


class ProtocolError(Exception):
    """The peer sent something that is not valid DICOM upper layer protocol."""


@dataclass
class Association:
    """One accepted association: who, from where, on which contexts, and what it brought."""

    calling_ae: str
    called_ae: str
    address: str
    contexts: dict[int, tuple[str, str]] = field(default_factory=dict)  # id -> (sop class, ts)
    released: bool = False


# ------------------------------------------------------------------------------------------------
# encoding and decoding
# ------------------------------------------------------------------------------------------------


def _ae(raw: bytes) -> str:
    return raw.decode("ascii", "replace").strip(" \0")


def _uid(raw: bytes) -> str:
    try:
        return raw.decode("ascii").rstrip("\0 ")
    except UnicodeDecodeError:  # a UID is digits and dots; it is echoed back in the answers
        raise ProtocolError(f"a UID that is not ASCII: {raw[:64]!r}") from None


def _items(data: bytes, offset: int = 0) -> list[tuple[int, bytes]]:
    """Variable items: type (1), reserved (1), length (2, big endian), value."""
    out = []
    while offset < len(data):
        if offset + 4 > len(data):
            raise ProtocolError("truncated variable item")
        kind, length = data[offset], struct.unpack_from(">H", data, offset + 2)[0]
        value = data[offset + 4 : offset + 4 + length]
        if len(value) != length:
            raise ProtocolError(f"variable item 0x{kind:02X} overruns its PDU")
        out.append((kind, value))
        offset += 4 + length
    return out


@dataclass
class AssociateRequest:
    called_ae: str
    calling_ae: str
    raw_aes: bytes  # echoed in the answer
    application_context: str
    contexts: list[tuple[int, str, list[str]]]  # (id, abstract syntax, transfer syntaxes)
    max_pdu: int

    @classmethod
    def decode(cls, body: bytes) -> AssociateRequest:
        if len(body) < 68:
            raise ProtocolError("A-ASSOCIATE-RQ shorter than its fixed fields")
        called, calling = _ae(body[4:20]), _ae(body[20:36])
        app, contexts, max_pdu = "", [], 0
        for kind, value in _items(body, 68):
            if kind == 0x10:
                app = _uid(value)
            elif kind == 0x20:
                if len(value) < 4:
                    raise ProtocolError("presentation context item too short")
                abstract, syntaxes = "", []
                for sub, sub_value in _items(value, 4):
                    if sub == 0x30:
                        abstract = _uid(sub_value)
                    elif sub == 0x40:
                        syntaxes.append(_uid(sub_value))
                contexts.append((value[0], abstract, syntaxes))
            elif kind == 0x50:
                for sub, sub_value in _items(value):
                    if sub == 0x51 and len(sub_value) == 4:
                        max_pdu = struct.unpack(">I", sub_value)[0]
        return cls(called, calling, body[4:36], app, contexts, max_pdu)


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def _pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBI", kind, 0, len(body)) + body


def associate_ac(
    request: AssociateRequest, results: list[tuple[int, int, str]], max_pdu: int
) -> bytes:
    """A-ASSOCIATE-AC: one (id, result, transfer syntax) per proposed context."""
    body = struct.pack(">HH", 1, 0) + request.raw_aes + bytes(32)
    body += _item(0x10, APPLICATION_CONTEXT)
    for context_id, result, syntax in results:
        body += _item(0x21, bytes([context_id, 0, result, 0]) + _item(0x40, syntax.encode("ascii")))
    user = _item(0x51, struct.pack(">I", max_pdu))
    user += _item(0x52, IMPLEMENTATION_CLASS_UID.encode("ascii"))
    user += _item(0x55, IMPLEMENTATION_VERSION.encode("ascii"))
    return _pdu(ASSOCIATE_AC, body + _item(0x50, user))


def associate_rj(reason: int, source: int = 1, result: int = 1) -> bytes:
    """A-ASSOCIATE-RJ; source 1 service user (reason 1 none given, 2 application context, 3
    calling AE title, 7 called AE title), source 2 service provider (reason 2 protocol version)."""
    return _pdu(ASSOCIATE_RJ, bytes([0, result, source, reason]))


def abort_pdu(source: int = 2, reason: int = 0) -> bytes:
    return _pdu(ABORT, bytes([0, 0, source, reason]))


def _even(value: bytes, pad: bytes = b"\0") -> bytes:
    return value + pad if len(value) % 2 else value


def parse_command(data: bytes) -> dict[int, bytes]:
    """A command set (implicit VR little endian, group 0000) as {element: value}."""
    out, offset = {}, 0
    while offset + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHI", data, offset)
        if group != 0x0000 or offset + 8 + length > len(data):
            raise ProtocolError("malformed DIMSE command set")
        out[element] = data[offset + 8 : offset + 8 + length]
        offset += 8 + length
    if offset != len(data):
        raise ProtocolError("malformed DIMSE command set")
    return out


def _us(command: dict[int, bytes], element: int) -> int:
    value = command.get(element)
    if value is None or len(value) != 2:
        raise ProtocolError(f"DIMSE command without a valid (0000,{element:04X})")
    return int(struct.unpack("<H", value)[0])


def encode_command(elements: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(struct.pack("<HHI", 0, e, len(v)) + v for e, v in elements)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def response(
    command_field: int,
    message_id: int,
    sop_class: str,
    sop_instance: str | None,
    status: int,
    comment: str = "",
) -> bytes:
    elements = [
        (0x0002, _even(sop_class.encode("ascii"))),
        (0x0100, struct.pack("<H", command_field)),
        (0x0120, struct.pack("<H", message_id)),
        (0x0800, struct.pack("<H", NO_DATASET)),
        (0x0900, struct.pack("<H", status)),
    ]
    if comment:
        elements.append((0x0902, _even(comment[:64].encode("ascii", "replace"), b" ")))
    if sop_instance:
        elements.append((0x1000, _even(sop_instance.encode("ascii"))))
    return encode_command(elements)


def p_data(context_id: int, command: bytes) -> bytes:
    """One P-DATA-TF with the whole command set in one PDV (command, last fragment)."""
    pdv = struct.pack(">I", len(command) + 2) + bytes([context_id, 0x03]) + command
    return _pdu(P_DATA, pdv)


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, ``DICM`` and the file meta information group (PS3.10 7.1), explicit VR little
    endian, so that the received dataset bytes appended to it make a Part 10 file."""

    def element(number: int, vr: bytes, value: bytes) -> bytes:
        return binary.explicit_element(0x00020000 | number, vr, value)

    group = b"".join(
        [
            element(0x0001, b"OB", b"\x00\x01"),
            element(0x0002, b"UI", _even(sop_class.encode("ascii"))),
            element(0x0003, b"UI", _even(sop_instance.encode("ascii"))),
            element(0x0010, b"UI", _even(transfer_syntax.encode("ascii"))),
            element(0x0012, b"UI", _even(IMPLEMENTATION_CLASS_UID.encode("ascii"))),
            element(0x0013, b"SH", _even(IMPLEMENTATION_VERSION.encode("ascii"), b" ")),
            element(0x0016, b"AE", _even(source_ae.encode("ascii", "replace"), b" ")),
        ]
    )
    return bytes(128) + b"DICM" + element(0x0000, b"UL", struct.pack("<I", len(group))) + group


# ------------------------------------------------------------------------------------------------
# the acceptor
# ------------------------------------------------------------------------------------------------

StoreHandler = Callable[[Association, str, str, bytes], tuple[int, str]]
PROCESSING_FAILURE = 0x0110


class Acceptor:
    """Listens on ``host:port`` in a thread of its own and serves associations.

    ``accept(calling_ae, address)`` returns None to accept or an A-ASSOCIATE-RJ reason;
    ``store(assoc, sop_class, sop_instance, part10_bytes)`` returns (status, error comment);
    ``released(assoc)`` (before the A-RELEASE-RP goes out) and ``aborted(assoc)`` are called at the
    end of an association. All of them run in the event loop's thread, one at a time: each
    association is strictly request / response anyway, and handing work to other threads cost more
    than the writing itself on the service's hardware.
    """

    def __init__(
        self,
        host: str,
        port: int,
        ae_title: str,
        abstract_syntaxes: set[str],
        transfer_syntaxes: set[str],
        accept: Callable[[str, str], int | None],
        store: StoreHandler,
        released: Callable[[Association], None],
        aborted: Callable[[Association], None],
        ssl_context: ssl.SSLContext | None = None,
        max_pdu: int = 0,
        acse_timeout: float = 30.0,
        network_timeout: float = 60.0,
        max_dataset: int | None = None,
    ) -> None:
        self.host, self.requested_port, self.ae_title = host, port, ae_title
        #: the largest instance taken (bytes); its fragments are held in memory until complete
        self.max_dataset = MAX_DATASET_BYTES if max_dataset is None else max_dataset
        self.abstract_syntaxes = abstract_syntaxes
        self.transfer_syntaxes = transfer_syntaxes
        self.accept, self.store, self.released, self.aborted = accept, store, released, aborted
        self.ssl_context = ssl_context
        self.max_pdu = max_pdu
        self.acse_timeout, self.network_timeout = acse_timeout, network_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[_Connection] = set()
        self.port = port

    # life cycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            loop.set_exception_handler(self._loop_exception)
            try:
                self._server = loop.run_until_complete(
                    loop.create_server(
                        lambda: _Connection(self), self.host, self.requested_port,
                        ssl=self.ssl_context, reuse_address=True,
                    )
                )  # fmt: skip
                self.port = int(self._server.sockets[0].getsockname()[1])
            except BaseException as exc:
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name="dicom-scp", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            raise failure[0]

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for connection in list(self._connections):
                connection.close(abort=True)
            loop.stop()

        loop.call_soon_threadsafe(shutdown)
        thread.join(10)
        self._loop = self._thread = None

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # a failed TLS handshake (an untrusted client) lands here; it is the client's problem
        log.warning("DICOM SCP: %s", context.get("exception") or context.get("message"))


class _Connection(asyncio.Protocol):
    """One TCP connection: PDUs parsed from the byte stream as it arrives, answered in place."""

    def __init__(self, acceptor: Acceptor) -> None:
        self.acceptor = acceptor
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.address = "?"
        self.assoc: Association | None = None
        self.command: bytearray = bytearray()
        self.dataset: bytearray = bytearray()
        self.pending: dict[int, bytes] | None = None  # a command waiting for its dataset
        self.last_activity = 0.0
        self.timer: asyncio.TimerHandle | None = None

    # asyncio's callbacks ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        import socket

        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # request / response messages: no Nagle delay
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.address = str(peer[0])
        self.acceptor._connections.add(self)
        loop = asyncio.get_running_loop()
        self.last_activity = loop.time()
        self.timer = loop.call_later(self.acceptor.acse_timeout, self._check_timeout)

    def data_received(self, data: bytes) -> None:
        self.last_activity = asyncio.get_running_loop().time()
        self.buffer += data
        try:
            # once closing (released, aborted, refused) nothing more is read
            while self._open() and len(self.buffer) >= 6:
                kind = self.buffer[0]
                length = struct.unpack_from(">I", self.buffer, 2)[0]
                if kind not in (ASSOCIATE_RQ, P_DATA, RELEASE_RQ, ABORT, RELEASE_RP):
                    raise ProtocolError(f"unexpected PDU type 0x{kind:02X}")
                if length > max(MAX_PDU_ACCEPTED, self.acceptor.max_pdu):
                    raise ProtocolError(f"PDU of {length} bytes exceeds the limit")
                if len(self.buffer) < 6 + length:
                    break
                body = bytes(self.buffer[6 : 6 + length])
                del self.buffer[: 6 + length]
                self._pdu(kind, body)
        except ProtocolError as exc:
            log.warning("association from %s aborted: %s", self.address, exc)
            self._send(abort_pdu())
            self.close()
        except Exception:  # a bug must not leave the association half-open: abort it
            log.exception("association from %s aborted: unexpected error", self.address)
            self._send(abort_pdu())
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.acceptor._connections.discard(self)
        self.transport = None
        if self.assoc is not None and not self.assoc.released:
            self.assoc.released = True  # once
            self._call(self.acceptor.aborted, self.assoc)

    # the protocol -------------------------------------------------------------------------------

    def _pdu(self, kind: int, body: bytes) -> None:
        if self.assoc is None:
            if kind != ASSOCIATE_RQ:
                raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{kind:02X}")
            self._negotiate(AssociateRequest.decode(body))
        elif kind == P_DATA:
            self._p_data(body)
        elif kind == RELEASE_RQ:
            # the studies are marked ready before the requestor learns of the release
            assoc, self.assoc = self.assoc, None
            assoc.released = True
            self._call(self.acceptor.released, assoc)
            self._send(_pdu(RELEASE_RP, bytes(4)))
            self.close()
        elif kind == ABORT:
            log.info("association from %s aborted by the peer", self.assoc.calling_ae)
            self.close()
        else:
            raise ProtocolError(f"unexpected PDU type 0x{kind:02X} during an association")

    def _negotiate(self, request: AssociateRequest) -> None:
        acceptor = self.acceptor
        refusal = self._call(acceptor.accept, request.calling_ae, self.address)
        if refusal is None and request.application_context != APPLICATION_CONTEXT.decode():
            refusal = 2
        if refusal is not None:
            log.warning(
                "refusing an association from %s@%s (reason %d)",
                request.calling_ae, self.address, refusal,
            )  # fmt: skip
            self._send(associate_rj(refusal))
            self.close()
            return
        assoc = Association(request.calling_ae, request.called_ae, self.address)
        results = []
        for context_id, abstract, syntaxes in request.contexts:
            fallback = syntaxes[0] if syntaxes else "1.2.840.10008.1.2"
            if abstract not in acceptor.abstract_syntaxes:
                results.append((context_id, 3, fallback))
                continue
            chosen = next((ts for ts in syntaxes if ts in acceptor.transfer_syntaxes), None)
            if chosen is None:
                results.append((context_id, 4, fallback))
                continue
            assoc.contexts[context_id] = (abstract, chosen)
            results.append((context_id, 0, chosen))
        self.assoc = assoc
        self._send(associate_ac(request, results, acceptor.max_pdu))
        if self.timer is not None:  # from now on the idle limit is the network timeout
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(
            acceptor.network_timeout, self._check_timeout
        )

    def _p_data(self, body: bytes) -> None:
        assoc = self.assoc
        assert assoc is not None
        offset = 0
        while offset < len(body):
            if offset + 6 > len(body):
                raise ProtocolError("truncated presentation data value")
            length = struct.unpack_from(">I", body, offset)[0]
            if length < 2 or offset + 4 + length > len(body):
                raise ProtocolError("presentation data value overruns its PDU")
            context, control = body[offset + 4], body[offset + 5]
            fragment = body[offset + 6 : offset + 4 + length]
            offset += 4 + length
            if context not in assoc.contexts:
                raise ProtocolError(f"data on presentation context {context}, not accepted")
            if control & 0x01:
                self.command += fragment
                if len(self.command) > MAX_COMMAND_BYTES:
                    raise ProtocolError(f"a command set over {MAX_COMMAND_BYTES} bytes")
                if control & 0x02:
                    command = parse_command(bytes(self.command))
                    self.command.clear()
                    if _us(command, 0x0800) == NO_DATASET:
                        self._respond(context, command, b"")
                    else:
                        self.pending = command
            else:
                if self.pending is None:
                    raise ProtocolError("a dataset fragment before its command")
                self.dataset += fragment
                if len(self.dataset) > self.acceptor.max_dataset:
                    raise ProtocolError(
                        f"an instance over {self.acceptor.max_dataset} bytes (the SCP's limit)"
                    )
                if control & 0x02:
                    command, self.pending = self.pending, None
                    self._respond(context, command, bytes(self.dataset))
                    self.dataset.clear()

    def _respond(self, context: int, command: dict[int, bytes], dataset: bytes) -> None:
        assoc = self.assoc
        assert assoc is not None
        field_, message_id = _us(command, 0x0100), _us(command, 0x0110)
        sop_class = _uid(command.get(0x0002, b""))
        if field_ == C_ECHO_RQ:
            reply = response(C_ECHO_RSP, message_id, sop_class or VERIFICATION, None, 0)
        elif field_ == C_STORE_RQ:
            sop_instance = _uid(command.get(0x1000, b""))
            context_class, syntax = assoc.contexts[context]
            if not sop_instance or not dataset:
                status, comment = 0xC210, "C-STORE without an instance UID or a dataset"
            else:
                meta = file_meta(sop_class or context_class, sop_instance, syntax, assoc.calling_ae)
                try:
                    status, comment = self.acceptor.store(
                        assoc, sop_class or context_class, sop_instance, meta + dataset
                    )
                except Exception as exc:  # a bug must not take the service down
                    log.exception("storing %s failed", sop_instance)
                    status, comment = PROCESSING_FAILURE, f"{type(exc).__name__}: {exc}"
            reply = response(C_STORE_RSP, message_id, sop_class, sop_instance, status, comment)
        else:
            raise ProtocolError(f"unsupported DIMSE command 0x{field_:04X}")
        self._send(p_data(context, reply))

    # plumbing -----------------------------------------------------------------------------------

    def _call(self, function: Callable[..., Any], *args: Any) -> Any:
        try:
            return function(*args)
        except Exception:
            log.exception("DICOM SCP callback %s failed", getattr(function, "__name__", function))
            return None

    def _open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def _send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self, abort: bool = False) -> None:
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()  # after what was written has gone out

    def _check_timeout(self) -> None:
        loop = asyncio.get_running_loop()
        limit = self.acceptor.network_timeout if self.assoc else self.acceptor.acse_timeout
        idle = loop.time() - self.last_activity
        if self.transport is None:
            return
        if idle >= limit:
            log.warning("association from %s aborted: silent for %.0f s", self.address, idle)
            self._send(abort_pdu())
            self.close()
            return
        self.timer = loop.call_later(limit - idle, self._check_timeout)
