"""One HTTP endpoint for ShiftGuard's services: health, Prometheus metrics and a service's routes.

The edge service (:mod:`shiftguard.edge.service`) and the central collector
(:mod:`shiftguard.monitor.collect`) both serve through :class:`Endpoint`:

* ``GET /healthz``: the JSON object the service's health function returns (``status: ok`` added),
  503 with the error when that function raises;
* ``GET /metrics``: the service's ``prometheus_client`` registry in Prometheus' text format;
* the routes a service adds, e.g. the collector's ``POST /v1/records``: a handler takes the
  :class:`Request` and returns the JSON answer (or a :class:`Body`, e.g. a page), or raises
  :class:`HttpError` for a 4xx.

The server is the standard library's threaded one (a thread per connection), bound when the endpoint
is built (a taken port is a :class:`~shiftguard.errors.PortInUseError` naming the setting), served
from a background thread. With a TLS context each connection's handshake runs in its own thread,
bounded by the read timeout, so a slow or failing client delays nobody. Request bodies need a
``Content-Length`` and are refused past ``max_body_bytes`` (413); a refused body is read and dropped
so the client gets the answer rather than a reset connection.

Example:
    >>> import json, urllib.request
    >>> from prometheus_client import CollectorRegistry, Counter
    >>> registry = CollectorRegistry()
    >>> Counter("demo_requests", "requests seen", registry=registry).inc()
    >>> endpoint = Endpoint("127.0.0.1", 0, "demo.port", health=lambda: {"queue": 0},
    ...                     registry=registry)
    >>> endpoint.start()
    >>> json.load(urllib.request.urlopen(endpoint.url + "/healthz"))
    {'status': 'ok', 'queue': 0}
    >>> b"demo_requests_total 1.0" in urllib.request.urlopen(endpoint.url + "/metrics").read()
    True
    >>> endpoint.stop()
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from shiftguard.errors import listening

log = logging.getLogger(__name__)

HEALTH_PATH = "/healthz"
METRICS_PATH = "/metrics"


class HttpError(Exception):
    """An error answer: status, message, extra JSON fields and extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.headers, self.extra = dict(headers or {}), extra


class Request:
    """One request as a route handler sees it: method, path, headers, client address, body."""

    def __init__(self, handler: BaseHTTPRequestHandler, max_body_bytes: int, service: str) -> None:
        self._handler = handler
        self._max, self._service = max_body_bytes, service
        self.method = handler.command
        self.path = urlsplit(handler.path).path
        self.headers = handler.headers
        self.address = handler.client_address[0]
        self.body_read = False

    def length(self) -> int:
        """The body's declared length (411 without one, 400 when it is invalid)."""
        if self.headers.get("Transfer-Encoding"):
            raise HttpError(411, "chunked bodies are not supported; send Content-Length")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise HttpError(411, "missing or invalid Content-Length") from None
        if length < 0:
            raise HttpError(400, f"invalid Content-Length {length}")
        return length

    def body(self) -> bytes:
        """The whole body (413 past the endpoint's limit, 400 when it ends early)."""
        length = self.length()
        if length > self._max:
            self.drain(length)
            raise HttpError(
                413,
                f"the body has {length} bytes; this {self._service} takes at most {self._max}, "
                "send smaller batches",
            )
        self.body_read = True
        body = self._handler.rfile.read(length)
        if len(body) < length:
            raise HttpError(400, f"the body ended after {len(body)} of {length} bytes")
        return body

    def drain(self, length: int | None = None) -> None:
        """Read a body that is refused, so the client reads the answer instead of a reset
        connection (beyond 4 x the body limit the connection is just closed)."""
        if self.body_read:
            return
        self.body_read = True
        try:
            left = self.length() if length is None else length
        except HttpError:
            return
        if left > 4 * self._max:
            return
        while left > 0:
            chunk = self._handler.rfile.read(min(left, 1 << 16))
            if not chunk:
                return
            left -= len(chunk)


class Body:
    """A route's answer that is not JSON: the bytes and their content type (a page)."""

    def __init__(self, content: bytes, content_type: str = "text/html; charset=utf-8") -> None:
        self.content, self.content_type = content, content_type


Route = Callable[[Request], "Mapping[str, Any] | Body"]


class _Server(ThreadingHTTPServer):
    """A threaded HTTP server; with a TLS context, the handshake runs in the connection's thread."""

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        tls: ssl.SSLContext | None,
        timeout_s: float,
        name: str,
    ) -> None:
        self.tls, self.timeout_s, self.name = tls, timeout_s, name
        super().__init__(address, handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(self.timeout_s)
        try:
            wrapped = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:  # plain HTTP, no client certificate, a scanner
            log.warning("%s: TLS handshake with %s failed: %s", self.name, client_address[0], exc)
            return
        try:
            super().finish_request(wrapped, client_address)
        finally:
            wrapped.close()


class Endpoint:
    """A service's HTTP endpoint (see the module docstring).

    Args:
        host: The interface to listen on.
        port: The TCP port; 0 picks a free one (see :attr:`port`).
        setting: Where the user sets the port (named when it is taken), e.g. ``"edge.http_port"``.
        health: Returns the health figures (a JSON object); raising makes ``/healthz`` answer 503.
        registry: The metrics ``/metrics`` serves; None: no ``/metrics`` route.
        routes: ``(method, path) -> handler`` for the service's own routes.
        tls: A server TLS context: HTTPS.
        read_timeout_s: How long a connection may stall while its request is read.
        max_body_bytes: The largest request body.
        name: The service's name in logs and the ``Server`` header.

    Raises:
        PortInUseError: The port is taken, or the address is not this machine's.
    """

    def __init__(
        self,
        host: str,
        port: int,
        setting: str,
        health: Callable[[], Mapping[str, Any]],
        registry: CollectorRegistry | None = None,
        routes: Mapping[tuple[str, str], Route] | None = None,
        tls: ssl.SSLContext | None = None,
        read_timeout_s: float = 30.0,
        max_body_bytes: int = 8 << 20,
        name: str = "shiftguard",
    ) -> None:
        self.host, self.name, self.tls = host, name, tls
        self.health, self.registry = health, registry
        self.routes = dict(routes or {})
        self.read_timeout_s, self.max_body_bytes = read_timeout_s, max_body_bytes
        with listening(host, port, setting):
            self._server = _Server((host, port), self._handler(), tls, read_timeout_s, name)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port listened on (the one picked when built with ``port=0``)."""
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """``https://host:port`` (``http://`` without TLS)."""
        return http_url(self.host, self.port, self.tls is not None)

    def start(self) -> None:
        """Serve from a background thread; requests are taken from the moment the port was bound."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"{self.name}-http",
            daemon=True,
        )
        self._thread.start()
        log.debug("%s: listening on %s", self.name, self.url)

    def stop(self) -> None:
        """Stop serving and free the port."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    # ---------------------------------------------------------------------------------------------

    def _answer(self, request: Request) -> tuple[int, bytes, str, dict[str, str]]:
        """(status, body, content type, extra headers) for one request."""
        if request.method == "GET" and request.path == HEALTH_PATH:
            try:
                figures = dict(self.health())
            except Exception as exc:
                log.exception("%s: health check failed", self.name)
                return 503, _json({"status": "error", "error": str(exc)}), "application/json", {}
            return 200, _json({"status": "ok", **figures}), "application/json", {}
        if request.method == "GET" and request.path == METRICS_PATH and self.registry is not None:
            return 200, generate_latest(self.registry), CONTENT_TYPE_LATEST, {}
        route = self.routes.get((request.method, request.path))
        try:
            if route is None:
                raise HttpError(404, f"no such route: {request.method} {request.path}")
            answer = route(request)
        except HttpError as refusal:
            request.drain()
            if refusal.status != 404:
                log.warning("%s: %d to %s: %s", self.name, refusal.status, request.address, refusal)
            payload = {"error": refusal.message, **refusal.extra}
            return refusal.status, _json(payload), "application/json", refusal.headers
        except Exception as exc:  # a bug or a failing disk: the handler committed nothing
            log.exception("%s: %s %s failed", self.name, request.method, request.path)
            request.drain()
            payload = {"error": f"the {self.name} could not handle the request: {exc}"}
            return 500, _json(payload), "application/json", {}
        if isinstance(answer, Body):
            return 200, answer.content, answer.content_type, {}
        return 200, _json(answer), "application/json", {}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            timeout = endpoint.read_timeout_s
            server_version = endpoint.name

            def _handle(self) -> None:
                request = Request(self, endpoint.max_body_bytes, endpoint.name)
                status, body, kind, headers = endpoint._answer(request)
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("%s: %s " + format, endpoint.name, self.address_string(), *args)

        return Handler


def http_url(host: str, port: int, tls: bool) -> str:
    """``https://host:port`` (``http://`` without TLS; an IPv6 address in brackets).

    >>> http_url("::1", 8765, tls=True), http_url("127.0.0.1", 80, tls=False)
    ('https://[::1]:8765', 'http://127.0.0.1:80')
    """
    return f"{'https' if tls else 'http'}://{f'[{host}]' if ':' in host else host}:{port}"


def _json(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload).encode()
