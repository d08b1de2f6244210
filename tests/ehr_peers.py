"""The EHR's side for tests, on loopback: an HL7 v2 MLLP listener (hl7apy's ``MLLPServer``) and a
FHIR R4 endpoint (starlette under uvicorn) that validate what they receive with maintained
libraries (hl7apy, python-hl7; ``fhir.resources``) and keep it.

Both behave as a careful receiver does: the listener acknowledges each message (``AA``, or ``AR``
for one that does not validate, or ``AE`` for the next ``nack`` messages, to test retries) and
keeps the first copy of each control ID, counting the repeats it discards; the FHIR endpoint
stores resources by type and id (a PUT of an id it has replaces it, with the next version), finds
``ServiceRequest`` by identifier and honours ``If-Match``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from typing import Any

import hl7
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.mllp import AbstractErrorHandler, AbstractHandler, MLLPServer
from hl7apy.parser import parse_message, parse_segment

#: message types whose hl7apy 2.5.1 structure validates strictly; ORM^O01's ORDER_DETAIL is a
#: choice group that hl7apy models as a sequence, so ORM's segments are validated one by one
WHOLE = ("ORU^R01^ORU_R01", "OMI^O23^OMI_O23")
TYPES = (*WHOLE, "ORM^O01^ORM_O01")


def validate_hl7(message: str) -> None:
    """Raise unless ``message`` parses with python-hl7 and validates with hl7apy (strict)."""
    parsed = hl7.parse(message)  # python-hl7: the framing and the delimiters
    assert str(parsed.segment("MSH")[10]), "no control ID"
    kind = str(parsed.segment("MSH")[9])
    if kind in WHOLE:
        msg = parse_message(message, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
        msg.validate()
    else:
        for line in message.split("\r"):
            if line and not line.startswith("MSH"):
                parse_segment(line, version="2.5.1", validation_level=VALIDATION_LEVEL.STRICT)


def ack(message: str, code: str, text: str = "") -> str:
    """An ACK of ``message`` with MSA-1 ``code``, MLLP-framed."""
    msh = hl7.parse(message).segment("MSH")
    control = str(msh[10])
    reply = "\r".join(
        [
            f"MSH|^~\\&|EHR|HOSP|{msh[3]}|{msh[4]}|{time.strftime('%Y%m%d%H%M%S')}||ACK|"
            f"A{control[:19]}|P|2.5.1",
            f"MSA|{code}|{control}|{text}",
        ]
    )
    return "\x0b" + reply + "\r\x1c\r"


class MllpListener:
    """hl7apy's MLLP server on ``127.0.0.1:port`` in a thread (see the module docstring)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received: list[str] = []  # every message that arrived, in order
        self.accepted: dict[str, str] = {}  # control ID -> the first copy
        self.repeats: Counter[str] = Counter()
        self.invalid: list[tuple[str, str]] = []
        self.conflicts: list[str] = []
        self.nack = 0
        self._lock = threading.Lock()
        self._server: MLLPServer | None = None

    def handle(self, message: str) -> str:
        with self._lock:
            self.received.append(message)
            try:
                validate_hl7(message)
            except Exception as exc:
                self.invalid.append((message, f"{type(exc).__name__}: {exc}"))
                return ack(message, "AR", "does not validate")
            if self.nack > 0:
                self.nack -= 1
                return ack(message, "AE", "try again later")
            control = str(hl7.parse(message).segment("MSH")[10])
            if control in self.accepted:
                self.repeats[control] += 1  # a resend: acknowledged, not taken twice
                if self.accepted[control] != message:
                    self.conflicts.append(control)  # the same ID for another message
            else:
                self.accepted[control] = message
            return ack(message, "AA")

    def start(self) -> MllpListener:
        listener = self

        class Handler(AbstractHandler):  # type: ignore[misc]
            def reply(self) -> str:
                return listener.handle(self.incoming_message)

        class Errors(AbstractErrorHandler):  # type: ignore[misc]
            def reply(self) -> str:
                with listener._lock:
                    listener.invalid.append((self.incoming_message, str(self.exc)))
                return ack(self.incoming_message, "AR", "unsupported")

        handlers = {kind: (Handler,) for kind in TYPES} | {"ERR": (Errors,)}
        MLLPServer.allow_reuse_address = True
        self._server = MLLPServer("127.0.0.1", self.port, handlers, timeout=10)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def of_type(self, kind: str) -> list[str]:
        """The accepted messages of MSH-9 ``kind`` (``"ORU^R01"``...)."""
        return [
            m for m in self.accepted.values()
            if str(hl7.parse(m).segment("MSH")[9]).startswith(kind)
        ]  # fmt: skip


def validate_fhir(resource: dict[str, Any]) -> Any:
    """``resource`` as its ``fhir.resources`` R4B model (raises when it does not validate)."""
    from fhir.resources.R4B import get_fhir_model_class

    return get_fhir_model_class(resource["resourceType"]).model_validate(resource)


class FhirServer:
    """A FHIR R4 endpoint on ``127.0.0.1:port`` (see the module docstring): ``POST /`` takes a
    transaction Bundle of PUTs, ``GET /ServiceRequest?identifier=`` searches, ``PUT
    /<type>/<id>`` writes one resource. ``token``: the bearer token it requires, if any;
    ``fail``: the next requests answered 503."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.port = port
        self.token = token
        self.resources: dict[tuple[str, str], dict[str, Any]] = {}
        self.writes: Counter[tuple[str, str]] = Counter()
        self.requests: list[tuple[str, str]] = []
        self.invalid: list[str] = []
        self.fail = 0
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [r for (t, _), r in sorted(self.resources.items()) if t == kind]

    def _store(self, resource: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        validate_fhir(resource)
        key = (resource["resourceType"], resource["id"])
        old = self.resources.get(key)
        version = int(old["meta"]["versionId"]) + 1 if old else 1
        self.resources[key] = {**resource, "meta": {"versionId": str(version)}}
        self.writes[key] += 1
        return ("200 OK" if old else "201 Created"), self.resources[key]

    def app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        def outcome(status: int, text: str) -> JSONResponse:
            body = {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "processing", "diagnostics": text}],
            }
            return JSONResponse(body, status, media_type="application/fhir+json")

        def gate(request: Request) -> JSONResponse | None:
            self.requests.append((request.method, request.url.path))
            if self.token and request.headers.get("authorization") != f"Bearer {self.token}":
                return outcome(401, "bearer token required")
            if self.fail > 0:
                self.fail -= 1
                return outcome(503, "unavailable")
            return None

        async def transaction(request: Request) -> JSONResponse:
            refused = gate(request)
            if refused is not None:
                return refused
            bundle = await request.json()
            try:
                validate_fhir(bundle)
                assert bundle["type"] == "transaction"
                for entry in bundle["entry"]:
                    kind, _, rid = entry["request"]["url"].partition("/")
                    assert entry["request"]["method"] == "PUT"
                    assert (kind, rid) == (
                        entry["resource"]["resourceType"],
                        entry["resource"]["id"],
                    )
                    validate_fhir(entry["resource"])
            except Exception as exc:
                self.invalid.append(f"{type(exc).__name__}: {exc}")
                return outcome(400, str(exc)[:500])
            responses = []
            for entry in bundle["entry"]:
                status, stored = self._store(entry["resource"])
                responses.append(
                    {"response": {"status": status, "etag": f'W/"{stored["meta"]["versionId"]}"'}}
                )
            reply = {"resourceType": "Bundle", "type": "transaction-response", "entry": responses}
            return JSONResponse(reply, media_type="application/fhir+json")

        async def search(request: Request) -> JSONResponse:
            refused = gate(request)
            if refused is not None:
                return refused
            wanted = request.query_params.get("identifier", "")
            # token search: [system|]value, with \\ \| \, \$ escaped (FHIR R4 3.1.1.4.2.2)
            value = re.split(r"(?<!\\)\|", wanted)[-1]
            value = re.sub(r"\\([\\|,$])", r"\1", value)
            found = [
                r for r in self.of_type(request.path_params["kind"])
                if any(i.get("value") == value for i in r.get("identifier", []))
            ]  # fmt: skip
            body = {
                "resourceType": "Bundle",
                "type": "searchset",
                "total": len(found),
                "entry": [{"resource": r} for r in found],
            }
            return JSONResponse(body, media_type="application/fhir+json")

        async def put(request: Request) -> JSONResponse:
            refused = gate(request)
            if refused is not None:
                return refused
            key = (request.path_params["kind"], request.path_params["rid"])
            resource = await request.json()
            match = request.headers.get("if-match")
            old = self.resources.get(key)
            if match and old and match != f'W/"{old["meta"]["versionId"]}"':
                return outcome(412, "version conflict")
            try:
                _, stored = self._store(resource)
            except Exception as exc:
                self.invalid.append(f"{type(exc).__name__}: {exc}")
                return outcome(400, str(exc)[:500])
            return JSONResponse(stored, media_type="application/fhir+json")

        async def metadata(request: Request) -> JSONResponse:
            refused = gate(request)
            if refused is not None:
                return refused
            statement = {
                "resourceType": "CapabilityStatement",
                "status": "active",
                "date": "2026-12-06",
                "kind": "instance",
                "fhirVersion": "4.0.1",
                "format": ["json"],
                "software": {"name": "test FHIR endpoint"},
            }
            validate_fhir(statement)
            return JSONResponse(statement, media_type="application/fhir+json")

        return Starlette(
            routes=[
                Route("/fhir/metadata", metadata, methods=["GET"]),
                Route("/fhir", transaction, methods=["POST"]),
                Route("/fhir/{kind}", search, methods=["GET"]),
                Route("/fhir/{kind}/{rid}", put, methods=["PUT"]),
            ]
        )

    def start(self) -> FhirServer:
        import uvicorn

        config = uvicorn.Config(self.app(), host="127.0.0.1", port=self.port, log_level="error")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            assert time.monotonic() < deadline, "the FHIR endpoint did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            assert self._thread is not None
            self._thread.join(10)
            self._server = None

    def add(self, resource: dict[str, Any]) -> None:
        """Put ``resource`` in the store, as the EHR's own data (an order...)."""
        self._store(json.loads(json.dumps(resource)))
