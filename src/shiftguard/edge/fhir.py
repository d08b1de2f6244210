"""Results to a FHIR R4 server: the sending side of :mod:`shiftguard.edge.ehr`'s resources.

A result goes as one ``transaction`` Bundle POSTed to the server's base: ``PUT`` of its
``Observation`` and ``DiagnosticReport`` under ids derived from the SR, so a resend (a lost
response, a service killed after the server committed) updates the same resources instead of
adding copies. It counts as delivered when the server answers 200 with a
``transaction-response`` whose every entry has a 2xx status. A priority update reads the
``ServiceRequest`` whose identifier is the study's accession number and, unless it is already
``stat``, writes it back with ``priority: stat`` under ``If-Match`` of the version read (a
concurrent change makes the server refuse it, and the queue tries again on the new version).

Authentication and TLS are those of the DICOMweb client (:func:`shiftguard.edge.dicomweb.
session_for`): a bearer token from ``token_env``, a client certificate, the server checked
against ``ca``; plain ``http://`` on loopback only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shiftguard.edge.dicomweb import session_for

if TYPE_CHECKING:
    from shiftguard.config.deploy import EdgeDestination

__all__ = ["FHIR_JSON", "FhirClient", "FhirError", "search_escape"]

FHIR_JSON = "application/fhir+json"


class FhirError(Exception):
    """A FHIR request that did not do what it was for (the message says why). ``permanent``: it
    cannot succeed by trying again (no order with the study's accession number)."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class FhirClient:
    """The FHIR server of one ``kind: fhir`` destination."""

    def __init__(self, dest: EdgeDestination) -> None:
        """
        Raises:
            CollectorAddressError: the URL is plain HTTP to another machine, or not HTTP(S).
            TlsConfigError: a certificate, key or CA file cannot be used.
        """
        assert dest.url is not None  # the schema requires it for fhir
        self.base = dest.url.rstrip("/")
        self.timeout = dest.timeout_s
        self.session, headers = session_for(
            dest.url, dest.token_env, dest.ca, dest.cert, dest.key, f"destination {dest.name} url"
        )
        self.headers = {**headers, "Accept": FHIR_JSON}

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        import requests

        url = f"{self.base}/{path}" if path else self.base
        try:
            response = self.session.request(
                method,
                url,
                headers={**self.headers, **kwargs.pop("headers", {})},
                timeout=self.timeout,
                **kwargs,
            )
        except (requests.RequestException, OSError) as exc:
            raise FhirError(f"{method} {url}: {type(exc).__name__}: {exc}") from None
        if not 200 <= response.status_code < 300:
            raise FhirError(f"{method} {url}: HTTP {response.status_code}: {_outcome(response)}")
        try:
            return response.json()
        except ValueError:
            raise FhirError(f"{method} {url}: the response is not JSON") from None

    def capabilities(self) -> dict[str, Any]:
        """The server's CapabilityStatement (``GET [base]/metadata``).

        Raises:
            FhirError: the request failed.
        """
        reply = self._request("GET", "metadata")
        return reply if isinstance(reply, dict) else {}

    def transaction(self, bundle: dict[str, Any]) -> dict[str, Any]:
        """POST the transaction ``bundle``; its response once every entry succeeded.

        Raises:
            FhirError: the request failed or an entry's status is not 2xx.
        """
        reply = self._request(
            "POST", "", json=bundle, headers={"Content-Type": FHIR_JSON}
        )  # fmt: skip
        if reply.get("resourceType") != "Bundle" or reply.get("type") != "transaction-response":
            raise FhirError(f"{self.base}: the reply is not a transaction-response Bundle")
        entries = reply.get("entry", [])
        if len(entries) != len(bundle.get("entry", [])):
            raise FhirError(
                f"{self.base}: {len(entries)} responses for {len(bundle.get('entry', []))} entries"
            )
        for entry in entries:
            status = str(entry.get("response", {}).get("status", ""))
            if not status.startswith("2"):
                raise FhirError(f"{self.base}: an entry was answered {status or 'without status'}")
        return reply

    def raise_priority(self, accession: str, priority: str = "stat") -> bool:
        """Set the ``ServiceRequest`` identified by ``accession`` to ``priority``; False when it
        already had it.

        Raises:
            FhirError: the request failed; ``permanent`` when there is no accession number, or
                no order or several orders carry it.
        """
        if not accession:
            raise FhirError("the study has no accession number to find its order by", True)
        found = self._request(
            "GET", "ServiceRequest", params={"identifier": search_escape(accession)}
        )
        matches = [
            e["resource"]
            for e in found.get("entry", [])
            if e.get("resource", {}).get("resourceType") == "ServiceRequest"
        ]
        if len(matches) != 1:
            raise FhirError(
                f"{self.base}: {len(matches)} ServiceRequests have identifier {accession!r} "
                "(expected one)",
                permanent=True,
            )
        order = matches[0]
        if order.get("priority") == priority:
            return False
        order["priority"] = priority
        headers = {"Content-Type": FHIR_JSON}
        version = order.get("meta", {}).get("versionId")
        if version:
            headers["If-Match"] = f'W/"{version}"'
        self._request("PUT", f"ServiceRequest/{order['id']}", json=order, headers=headers)
        return True


def search_escape(value: str) -> str:
    """``value`` as a FHIR search parameter value: ``\\``, ``|``, ``,`` and ``$`` escaped with a
    backslash (FHIR R4 search, 3.1.1.4.2.2).

    >>> search_escape("ACC|7,1")
    'ACC\\\\|7\\\\,1'
    """
    out = value.replace("\\", "\\\\")
    for c in "|,$":
        out = out.replace(c, "\\" + c)
    return out


def _outcome(response: Any) -> str:
    """What an error response says: its OperationOutcome's diagnostics, else its first bytes."""
    try:
        body = response.json()
        issues = body.get("issue", []) if isinstance(body, dict) else []
        text = "; ".join(str(i.get("diagnostics") or i.get("code", "")) for i in issues)
        if text:
            return text[:500]
    except ValueError:
        pass
    return response.text[:200] or "no body"
