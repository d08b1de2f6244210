"""TLS contexts, one recipe for every ShiftGuard service and client.

The DICOM Storage SCP and the drift collector take the same three settings: a PEM certificate and
its key (TLS on when set) and a CA bundle (when set, a client must present a certificate it
signed). Their clients (a shipper, a modality) check the server's certificate against a CA bundle
and may present their own.
"""

from __future__ import annotations

import ipaddress
import ssl
from urllib.parse import urlsplit

from shiftguard.errors import CollectorAddressError, TlsConfigError


def server_context(cert: str, key: str | None, ca: str | None = None) -> ssl.SSLContext:
    """A server-side context (TLS 1.2 or later).

    Args:
        cert: PEM certificate (chain) of the server.
        key: its PEM private key (None: in ``cert``).
        ca: PEM CA bundle; when given, clients must present a certificate it signed.

    Raises:
        TlsConfigError: a file is missing or not a certificate/key that fits.
    """
    context = _context(
        ssl.Purpose.CLIENT_AUTH, ca, (cert, key), f"certificate {cert}, key {key}, CA {ca}"
    )
    if ca:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(
    ca: str | None = None, cert: str | None = None, key: str | None = None
) -> ssl.SSLContext:
    """A client-side context that checks the server's certificate and host name.

    Args:
        ca: PEM CA bundle the server's certificate must chain to (None: the system's).
        cert: PEM client certificate, for a server that requires one.
        key: its PEM private key.

    Raises:
        TlsConfigError: a file is missing or not a certificate/key that fits.
    """
    chain = (cert, key) if cert else None
    return _context(ssl.Purpose.SERVER_AUTH, ca, chain, f"CA {ca}, certificate {cert}, key {key}")


def url_context(
    url: str, ca: str | None, cert: str | None, key: str | None, what: str
) -> ssl.SSLContext | None:
    """The client TLS context for ``url`` (None for plain HTTP, allowed to loopback only: a
    bearer token must not cross the network in clear).

    Args:
        url: ``https://host:port`` or ``http://127.0.0.1:port``.
        ca, cert, key: :func:`client_context`'s.
        what: the setting, named in errors (``"collector URL"``).

    Raises:
        CollectorAddressError: not http(s), or plain HTTP to another machine.

    >>> url_context("http://127.0.0.1:8765", None, None, None, "collector URL") is None
    True
    """
    parts = urlsplit(url)
    if parts.scheme == "https":
        return client_context(ca, cert, key)
    if parts.scheme != "http" or not parts.hostname:
        raise CollectorAddressError(
            f"{what} {url!r}: expected https://host:port (http:// on loopback only)"
        )
    host = parts.hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise CollectorAddressError(
            f"{what} {url}: plain HTTP would send the bearer token across the network in "
            f"clear; serve it over TLS and use https://{parts.netloc}"
        )
    return None


def _context(
    purpose: ssl.Purpose, ca: str | None, chain: tuple[str, str | None] | None, files: str
) -> ssl.SSLContext:
    """The one recipe: a context for ``purpose`` (TLS 1.2 or later) that trusts ``ca`` (None:
    the system's CAs) and presents ``chain`` (certificate, key) when given.

    Raises:
        TlsConfigError: a file is missing or not a certificate/key that fits; the message names
            ``files``.
    """
    try:
        context = ssl.create_default_context(purpose, cafile=ca)
        if chain is not None:
            context.load_cert_chain(*chain)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"TLS: cannot use {files}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
