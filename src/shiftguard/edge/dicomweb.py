"""Results delivered by DICOMweb STOW-RS (PS3.18 10.5), beside C-STORE.

A destination of ``kind: stow-rs`` names the DICOMweb service's root (``url``, e.g.
``https://vna.example/dicom-web``); each result object is POSTed to ``{url}/studies`` as
``multipart/related; type="application/dicom"`` with a maintained client (``dicomweb-client``).
Authentication is a bearer token read from the environment variable ``token_env`` and/or a client
certificate (``cert``, ``key``); the server's certificate is checked against ``ca`` (the system's
CAs when unset), TLS 1.2 or later, through the same context as every other client of the service
(:func:`shiftguard.tls.url_context`; plain ``http://`` on loopback only, as for the collector).

The delivery queue, its retries with backoff and the per-destination isolation are the service's,
as for C-STORE: the client's own retrying is off, and any failure (a refused connection, an HTTP
error, a response whose FailedSOPSequence lists the instance, or one that does not list it as
stored) is a :class:`StowError` whose message the queue keeps.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shiftguard.tls import url_context

if TYPE_CHECKING:
    from dicomweb_client.api import DICOMwebClient

    from shiftguard.config.deploy import EdgeDestination

__all__ = ["StowError", "client_for", "fetch_study", "session_for", "stow", "stow_client"]

#: seconds a STOW-RS request may take (connect, then read) before it counts as failed
TIMEOUT_S = (10.0, 120.0)


class StowError(Exception):
    """A STOW-RS delivery that did not store the instance (the message says why)."""


def _adapter(context: ssl.SSLContext) -> Any:
    """A ``requests`` transport adapter whose connections use ``context``."""
    from requests.adapters import HTTPAdapter

    class _ContextAdapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            kwargs["ssl_context"] = context
            super().init_poolmanager(*args, **kwargs)

    return _ContextAdapter()


def session_for(
    url: str,
    token_env: str | None = None,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    what: str = "DICOMweb url",
) -> tuple[Any, dict[str, str]]:
    """A ``requests`` session for the HTTP(S) service at ``url`` (its TLS context from
    :func:`shiftguard.tls.url_context`: the server checked against ``ca``, a client certificate)
    and the headers every request carries (a bearer token from the variable ``token_env``).

    Raises:
        CollectorAddressError: the URL is plain HTTP to another machine, or not HTTP(S).
        TlsConfigError: a certificate, key or CA file cannot be used.
    """
    import requests

    context = url_context(url, ca, cert, key, what)
    session = requests.Session()
    if context is not None:
        session.mount("https://", _adapter(context))
    headers = {}
    token = os.environ.get(token_env) if token_env else None
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return session, headers


def client_for(
    url: str,
    token_env: str | None = None,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    what: str = "DICOMweb url",
) -> DICOMwebClient:
    """A DICOMweb client for the service at ``url`` (:func:`session_for`'s session and
    headers), its own retries off.

    Raises:
        CollectorAddressError: the URL is plain HTTP to another machine, or not HTTP(S).
        TlsConfigError: a certificate, key or CA file cannot be used.
    """
    from dicomweb_client.api import DICOMwebClient

    session, headers = session_for(url, token_env, ca, cert, key, what)
    client = DICOMwebClient(url.rstrip("/"), session=session, headers=headers, timeout=TIMEOUT_S)
    client.set_http_retry_params(retry=False)  # the delivery queue retries, with its backoff
    return client


def stow_client(dest: EdgeDestination) -> DICOMwebClient:
    """:func:`client_for` a ``stow-rs`` destination."""
    assert dest.url is not None  # the schema requires it for stow-rs
    return client_for(
        dest.url, dest.token_env, dest.ca, dest.cert, dest.key, f"destination {dest.name} url"
    )


def fetch_study(client: DICOMwebClient, study_uid: str, folder: Path) -> list[Path]:
    """Every instance of ``study_uid`` by WADO-RS, written to ``folder`` as Part 10 files (after a
    QIDO-RS search that the study is there).

    Raises:
        InputError: the study is not on the server, or the server cannot be reached.
    """
    import requests

    from shiftguard.errors import InputError

    where = client.base_url
    try:
        found = client.search_for_studies(search_filters={"StudyInstanceUID": study_uid})
        if not found:
            raise InputError(f"{where}: no study {study_uid} (QIDO-RS found none)")
        datasets = client.retrieve_study(study_uid)
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise InputError(f"{where}: study {study_uid}: HTTP {status}") from None
    except (requests.RequestException, OSError) as exc:
        raise InputError(f"{where}: cannot fetch study {study_uid}: {exc}") from None
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, ds in enumerate(datasets):
        path = folder / f"{k:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def stow(client: DICOMwebClient, path: str | Path) -> None:
    """POST the Part 10 file at ``path`` and check the server stored it.

    Raises:
        StowError: it was not stored (connection, HTTP status, or the response's failure list).
    """
    import pydicom
    import requests

    ds = pydicom.dcmread(path)
    try:
        response = client.store_instances([ds])
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise StowError(f"HTTP {status} from {client.base_url}") from None
    except (requests.RequestException, OSError) as exc:
        raise StowError(f"{type(exc).__name__}: {exc}") from None
    sop = ds.SOPInstanceUID
    failed = {
        str(item.get("ReferencedSOPInstanceUID", "")): int(item.get("FailureReason", 0))
        for item in response.get("FailedSOPSequence", [])
    }
    if sop in failed:
        raise StowError(f"refused by {client.base_url}: failure reason 0x{failed[sop]:04X}")
    stored = {
        str(item.get("ReferencedSOPInstanceUID", ""))
        for item in response.get("ReferencedSOPSequence", [])
    }
    if sop not in stored:
        raise StowError(f"{client.base_url} did not list the instance as stored")
