"""HL7 v2 messages over MLLP (HL7's Minimal Lower Layer Protocol, release 2): the sending side.

A message travels framed as ``<VT> message <FS><CR>`` on a TCP connection (TLS when the
destination gives a CA or client certificate), and counts as delivered only when the receiver's
acknowledgement comes back on the same connection with MSA-1 ``AA`` or ``CA`` and MSA-2 equal to
the message's control ID (original acknowledgement mode). Anything else, a refused or dropped
connection, a timeout, a negative acknowledgement (``AE``/``AR``/``CE``/``CR``) or an
acknowledgement of another message, is an :class:`MllpError` whose message the delivery queue
keeps; the queue retries with its backoff. Each message has its own connection, which suits
receivers that keep a connection open and those that close it after one message alike.
"""

from __future__ import annotations

import socket
import ssl

__all__ = ["FS", "VT", "MllpError", "acknowledgement", "frame", "send"]

VT, FS, CR = b"\x0b", b"\x1c", b"\r"
#: the most bytes an acknowledgement may have (a runaway peer is cut off)
MAX_ACK = 1 << 20


class MllpError(Exception):
    """A message the receiver did not acknowledge as accepted (the message says why)."""


def frame(message: str) -> bytes:
    """``message`` (ER7, ``\\r`` between segments) as an MLLP block, UTF-8."""
    return VT + message.encode("utf-8") + FS + CR


def _field(message: str, segment: str, index: int) -> str:
    for line in message.replace("\n", "\r").split("\r"):
        if line.startswith(segment + "|"):
            fields = line.split("|")
            return fields[index] if index < len(fields) else ""
    return ""


def acknowledgement(reply: str, sent_control_id: str) -> None:
    """Check an acknowledgement ``reply`` of the message ``sent_control_id``.

    Raises:
        MllpError: no MSA segment, a negative code, or another message's control ID.

    >>> acknowledgement("MSH|^~\\\\&|EHR||||||ACK|9|P|2.5.1\\rMSA|AA|SG1\\r", "SG1")
    >>> acknowledgement("MSH|^~\\\\&|EHR||||||ACK|9|P|2.5.1\\rMSA|AE|SG1|busy\\r", "SG1")
    Traceback (most recent call last):
    shiftguard.edge.mllp.MllpError: negative acknowledgement AE of SG1: busy
    """
    code = _field(reply, "MSA", 1).split("^")[0].strip()
    acked = _field(reply, "MSA", 2).strip()
    if not code:
        raise MllpError(f"the reply to {sent_control_id} has no MSA segment")
    if acked != sent_control_id:
        raise MllpError(f"the reply acknowledges {acked!r}, not {sent_control_id}")
    if code not in ("AA", "CA"):
        text = _field(reply, "MSA", 3) or _field(reply, "ERR", 8) or "no reason given"
        raise MllpError(f"negative acknowledgement {code} of {sent_control_id}: {text}")


def _read_block(sock: socket.socket) -> bytes:
    buffer = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise MllpError("the receiver closed the connection before acknowledging")
        buffer += chunk
        end = buffer.find(FS + CR)
        if end >= 0:
            start = buffer.find(VT)
            if start < 0 or start > end:
                raise MllpError("the receiver's reply is not an MLLP block")
            return buffer[start + 1 : end]
        if len(buffer) > MAX_ACK:
            raise MllpError(f"the receiver's reply exceeds {MAX_ACK} bytes without its end")


def send(
    host: str,
    port: int,
    message: str,
    control_id: str | None = None,
    timeout_s: float = 30.0,
    context: ssl.SSLContext | None = None,
) -> str:
    """Send ``message`` to ``host:port`` and return the receiver's acknowledgement once it has
    accepted it (see :func:`acknowledgement`); ``control_id``: the one the acknowledgement must
    name (default: the message's own, MSH-10).

    Raises:
        MllpError: it was not accepted; the message says why.
    """
    if control_id is None:
        control_id = _field(message, "MSH", 9)  # MSH-1 is the separator itself: MSH-10
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = context.wrap_socket(raw, server_hostname=host) if context else raw
            sock.sendall(frame(message))
            reply = _read_block(sock).decode("utf-8", errors="replace")
    except MllpError:
        raise
    except (OSError, ssl.SSLError) as exc:  # refused, reset, timed out, TLS failed
        raise MllpError(f"{host}:{port}: {type(exc).__name__}: {exc}") from None
    acknowledgement(reply, control_id)
    return reply
