"""The one HTTP endpoint (shiftguard.endpoint) on loopback: health, metrics, routes, refusals."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from shiftguard.endpoint import Endpoint, HttpError, Request
from shiftguard.errors import PortInUseError


def _request(
    endpoint: Endpoint, method: str, path: str, body: bytes | None = None, **headers: str
) -> tuple[int, bytes, http.client.HTTPMessage]:
    conn = http.client.HTTPConnection("127.0.0.1", endpoint.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers)
        answer = conn.getresponse()
        return answer.status, answer.read(), answer.headers
    finally:
        conn.close()


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    registry = CollectorRegistry()
    seen = Counter("demo_echoes", "echo requests answered", registry=registry)
    state = {"healthy": True}

    def health() -> Mapping[str, Any]:
        if not state["healthy"]:
            raise RuntimeError("the store is gone")
        return {"queue": 3}

    def echo(request: Request) -> Mapping[str, Any]:
        if request.headers.get("Authorization") != "Bearer s3cret":
            raise HttpError(401, "invalid token", {"WWW-Authenticate": "Bearer"})
        payload = json.loads(request.body())
        if "fail" in payload:
            raise ValueError("a bug")
        seen.inc()
        return {"echo": payload}

    endpoint = Endpoint(
        "127.0.0.1", 0, "demo.port", health=health, registry=registry,
        routes={("POST", "/echo"): echo}, max_body_bytes=1024, name="demo",
    )  # fmt: skip
    endpoint.state = state  # type: ignore[attr-defined]
    endpoint.start()
    yield endpoint
    endpoint.stop()


def test_health_answers_its_figures_then_503_when_they_fail(endpoint: Endpoint) -> None:
    status, body, headers = _request(endpoint, "GET", "/healthz")
    assert (status, json.loads(body)) == (200, {"status": "ok", "queue": 3})
    assert headers["Content-Type"] == "application/json"
    endpoint.state["healthy"] = False  # type: ignore[attr-defined]
    status, body, _ = _request(endpoint, "GET", "/healthz")
    assert (status, json.loads(body)) == (503, {"status": "error", "error": "the store is gone"})


def test_metrics_are_the_registry_in_prometheus_text_format(endpoint: Endpoint) -> None:
    for _ in range(2):
        status, _, _ = _request(
            endpoint, "POST", "/echo", b'{"a": 1}', Authorization="Bearer s3cret"
        )
        assert status == 200
    status, body, headers = _request(endpoint, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert families["demo_echoes"].type == "counter"
    assert [s.value for s in families["demo_echoes"].samples if s.name == "demo_echoes_total"] == [
        2
    ]


def test_a_route_answers_json_and_refusals_carry_status_message_and_headers(
    endpoint: Endpoint,
) -> None:
    status, body, _ = _request(
        endpoint, "POST", "/echo", b'{"a": [1, 2]}', Authorization="Bearer s3cret"
    )
    assert (status, json.loads(body)) == (200, {"echo": {"a": [1, 2]}})
    status, body, headers = _request(endpoint, "POST", "/echo", b'{"a": 1}')
    assert (status, json.loads(body)) == (401, {"error": "invalid token"})
    assert headers["WWW-Authenticate"] == "Bearer"
    status, body, _ = _request(endpoint, "DELETE", "/echo")
    assert (status, json.loads(body)) == (404, {"error": "no such route: DELETE /echo"})
    status, body, _ = _request(
        endpoint, "POST", "/echo", b'{"fail": 1}', Authorization="Bearer s3cret"
    )
    assert status == 500 and "a bug" in json.loads(body)["error"]
    # the endpoint still serves after the bug
    assert _request(endpoint, "GET", "/healthz")[0] == 200


def test_bodies_over_the_limit_or_without_a_length_are_refused_and_drained(
    endpoint: Endpoint,
) -> None:
    status, body, _ = _request(
        endpoint, "POST", "/echo", b"x" * 2048, Authorization="Bearer s3cret"
    )
    assert status == 413 and "at most 1024" in json.loads(body)["error"]
    with socket.create_connection(("127.0.0.1", endpoint.port), timeout=10) as sock:
        sock.sendall(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n4\r\n{}{}\r\n0\r\n\r\n"
        )
        answer = sock.recv(65536).decode()
    assert answer.startswith("HTTP/1.0 411") or answer.startswith("HTTP/1.1 411")


def test_a_taken_port_names_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(PortInUseError, match=r"demo\.http_port"):
            Endpoint("127.0.0.1", taken.getsockname()[1], "demo.http_port", health=dict)
