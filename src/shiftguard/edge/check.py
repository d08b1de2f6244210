"""``shiftguard edge check``: whether each destination of a site file can be reached, without
sending it anything it would keep.

What is asked of each kind:

* ``dimse``: an association with its AE title and a C-ECHO (Verification), status 0x0000;
* ``stow-rs``: a QIDO-RS search for one study (the URL, TLS and the bearer token are those the
  STOW-RS deliveries use, so a 401 or a certificate problem shows here);
* ``hl7-mllp``: a TCP connection (and the TLS handshake, when ``ca``/``cert`` is set), closed at
  once: no message is sent, since a test message would reach a clinical system's inbox;
* ``fhir``: ``GET [base]/metadata`` returns a CapabilityStatement for FHIR 4.x.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shiftguard.config.deploy import EdgeConfig, EdgeDestination

__all__ = ["Reach", "check_destination", "check_destinations"]

VERIFICATION = "1.2.840.10008.1.1"


@dataclass(frozen=True)
class Reach:
    """What checking one destination found."""

    name: str
    kind: str
    role: str
    ok: bool
    detail: str
    seconds: float


def _dimse(dest: EdgeDestination, ae_title: str, timeout_s: float) -> str:
    from pynetdicom import AE

    ae = AE(ae_title=ae_title)
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        how = "rejected" if assoc.is_rejected else "not established"
        raise RuntimeError(f"association with {dest.ae_title} at {dest.host}:{dest.port} {how}")
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    code = int(getattr(status, "Status", 0xFFFF)) if status else None
    if code != 0x0000:
        raise RuntimeError(f"C-ECHO answered {'nothing' if code is None else f'0x{code:04X}'}")
    return f"C-ECHO 0x0000 from {dest.ae_title} at {dest.host}:{dest.port}"


def _stow(dest: EdgeDestination) -> str:
    import requests

    from shiftguard.edge.dicomweb import stow_client

    client = stow_client(dest)
    try:
        found = client.search_for_studies(limit=1)
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise RuntimeError(f"QIDO-RS {client.base_url}/studies: HTTP {status}") from None
    except (requests.RequestException, OSError) as exc:
        raise RuntimeError(f"QIDO-RS {client.base_url}/studies: {exc}") from None
    return f"QIDO-RS {client.base_url}/studies answered ({len(found)} study shown)"


def _mllp(dest: EdgeDestination, timeout_s: float) -> str:
    from shiftguard.tls import client_context

    context = client_context(dest.ca, dest.cert, dest.key) if (dest.ca or dest.cert) else None
    with socket.create_connection((dest.host, dest.port), timeout=timeout_s) as raw:
        if context is None:
            return f"{dest.host}:{dest.port} accepts TCP connections (no message sent)"
        with context.wrap_socket(raw, server_hostname=dest.host) as tls:
            version = tls.version()
    return f"{dest.host}:{dest.port} accepts {version} connections (no message sent)"


def _fhir(dest: EdgeDestination) -> str:
    from shiftguard.edge.fhir import FhirClient

    client = FhirClient(dest)
    statement = client.capabilities()
    version = str(statement.get("fhirVersion", ""))
    if statement.get("resourceType") != "CapabilityStatement" or not version.startswith("4."):
        raise RuntimeError(
            f"{client.base}/metadata: not a FHIR R4 CapabilityStatement "
            f"(resourceType {statement.get('resourceType')!r}, fhirVersion {version!r})"
        )
    software = statement.get("software", {}).get("name", "")
    return f"{client.base}: FHIR {version}" + (f" ({software})" if software else "")


def check_destination(
    dest: EdgeDestination, ae_title: str = "SHIFTGUARD", timeout_s: float = 10.0
) -> Reach:
    """Check one destination (see the module docstring); never raises for an unreachable one."""
    began = time.monotonic()
    try:
        if dest.kind == "dimse":
            detail = _dimse(dest, ae_title, timeout_s)
        elif dest.kind == "stow-rs":
            detail = _stow(dest)
        elif dest.kind == "hl7-mllp":
            detail = _mllp(dest, timeout_s)
        else:
            detail = _fhir(dest)
        ok = True
    except (OSError, ssl.SSLError, RuntimeError, ValueError) as exc:
        ok, detail = False, str(exc) or type(exc).__name__
    except Exception as exc:  # a client library's own error: still a failed check, named
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    return Reach(dest.name, dest.kind, dest.role, ok, detail, time.monotonic() - began)


def check_destinations(settings: EdgeConfig, timeout_s: float = 10.0) -> Sequence[Reach]:
    """:func:`check_destination` for each of ``settings.destinations``, in order."""
    return [check_destination(d, settings.ae_title, timeout_s) for d in settings.destinations]
