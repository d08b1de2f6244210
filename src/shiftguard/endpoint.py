"""One HTTP endpoint for ShiftGuard's services: health, Prometheus metrics and a service's routes.

The edge service (:mod:`shiftguard.edge.service`) and the central collector
(:mod:`shiftguard.monitor.collect`) both serve through :class:`Endpoint`:

* ``GET /healthz``: the JSON object the service's health function returns (``status: ok`` added),
  503 with the error when that function raises;
* ``GET /metrics``: the service's ``prometheus_client`` registry in Prometheus' text format;
* the routes a service adds, e.g. the collector's ``POST /v1/records``: a handler takes the
  :class:`Request` and returns the JSON answer (or a :class:`Body`, e.g. a page), or raises
  :class:`HttpError` for a 4xx.

The server is uvicorn (HTTP/1.1 on asyncio, TLS through the context :mod:`shiftguard.tls`
builds), serving a small ASGI application from a background thread. The port is bound when the
endpoint is built (a taken port is a :class:`~shiftguard.errors.PortInUseError` naming the
setting). Handlers are ordinary functions: each runs in a worker thread, so a slow store delays
its own request, not the event loop. Request bodies need a ``Content-Length`` (411 for chunked or
missing ones), are refused past ``max_body_bytes`` (413), and must arrive within
``read_timeout_s`` (408).

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

import asyncio
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from shiftguard.errors import listening

log = logging.getLogger(__name__)

HEALTH_PATH = "/healthz"
METRICS_PATH = "/metrics"
#: connections served at once; beyond, uvicorn answers 503
MAX_CONNECTIONS = 512
START_TIMEOUT_S = 30.0


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


class Headers:
    """A request's headers, looked up without regard to case."""

    def __init__(self, pairs: list[tuple[bytes, bytes]]) -> None:
        self._values: dict[str, str] = {}
        for key, value in pairs:
            name = key.decode("latin-1").lower()
            text = value.decode("latin-1")
            self._values[name] = f"{self._values[name]}, {text}" if name in self._values else text

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._values.get(name.lower(), default)


class Request:
    """One request as a route handler sees it: method, path, headers, client address, body.

    The body was read before the handler runs, up to one byte past the endpoint's limit;
    :meth:`body` raises the refusal when it was too long, missing its length or incomplete.
    """

    def __init__(
        self,
        method: str,
        path: str,
        headers: Headers,
        address: str,
        content: bytes,
        max_body_bytes: int,
        service: str,
        problem: HttpError | None = None,
    ) -> None:
        self.method, self.path, self.headers, self.address = method, path, headers, address
        self._content, self._max, self._service = content, max_body_bytes, service
        self._problem = problem

    def length(self) -> int:
        """The body's declared length (411 without one or when chunked, 400 when invalid)."""
        if self.headers.get("Transfer-Encoding"):
            raise HttpError(411, "chunked bodies are not supported; send Content-Length")
        try:
            length = int(self.headers.get("Content-Length") or "")
        except ValueError:
            raise HttpError(411, "missing or invalid Content-Length") from None
        if length < 0:
            raise HttpError(400, f"invalid Content-Length {length}")
        return length

    def body(self) -> bytes:
        """The whole body (413 past the endpoint's limit, 400 when it ended early)."""
        if self._problem is not None:
            raise self._problem
        length = self.length()
        if length > self._max:
            raise HttpError(
                413,
                f"the body has {length} bytes; this {self._service} takes at most {self._max}, "
                "send smaller batches",
            )
        if len(self._content) < length:
            raise HttpError(400, f"the body ended after {len(self._content)} of {length} bytes")
        return self._content[:length]


class Body:
    """A route's answer that is not JSON: the bytes and their content type (a page)."""

    def __init__(self, content: bytes, content_type: str = "text/html; charset=utf-8") -> None:
        self.content, self.content_type = content, content_type


Route = Callable[[Request], "Mapping[str, Any] | Body"]
Answer = tuple[int, bytes, str, dict[str, str]]


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
        read_timeout_s: How long a request's body may take to arrive.
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
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            with listening(host, port, setting):
                self._socket.bind((host, port))
        except BaseException:
            self._socket.close()
            raise
        self._socket.listen(MAX_CONNECTIONS)
        self._port = int(self._socket.getsockname()[1])
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port listened on (the one picked when built with ``port=0``)."""
        return self._port

    @property
    def url(self) -> str:
        """``https://host:port`` (``http://`` without TLS)."""
        return http_url(self.host, self.port, self.tls is not None)

    def start(self) -> None:
        """Serve from a background thread; returns when requests are taken."""
        import uvicorn

        if self._thread is not None:
            return
        context = self.tls
        config = uvicorn.Config(
            self._app,
            interface="asgi3",
            lifespan="off",
            proxy_headers=False,
            log_level="warning",
            access_log=False,
            server_header=False,
            date_header=True,
            headers=[("server", self.name)],
            limit_concurrency=MAX_CONNECTIONS,
            timeout_keep_alive=max(int(self.read_timeout_s), 1),
            ssl_context_factory=(lambda _config, _default: context) if context else None,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._socket]},
            name=f"{self.name}-http",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: the HTTP server did not start on {self.url}")
            time.sleep(0.005)
        log.debug("%s: listening on %s", self.name, self.url)

    def stop(self) -> None:
        """Stop serving and free the port."""
        if self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
            self._thread = None
        self._socket.close()

    # ---------------------------------------------------------------------------------------------

    async def _app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The ASGI application: read the request, answer it from a worker thread."""
        if scope["type"] != "http":
            return
        headers = Headers(list(scope.get("headers") or []))
        client = scope.get("client") or ("", 0)
        content, problem = await self._read(receive)
        request = Request(
            scope["method"], scope["path"], headers, str(client[0]), content,
            self.max_body_bytes, self.name, problem,
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        status, body, kind, extra = await loop.run_in_executor(None, self._answer, request)
        response_headers = [
            (b"content-type", kind.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
            *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        await send({"type": "http.response.body", "body": body})

    async def _read(self, receive: Any) -> tuple[bytes, HttpError | None]:
        """The body, up to one byte past the limit; a 408 when it stalls."""
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout=self.read_timeout_s)
            except TimeoutError:
                return b"", HttpError(
                    408, f"the body did not arrive within {self.read_timeout_s:g} s"
                )
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            if size <= self.max_body_bytes:
                chunks.append(chunk)
            size += len(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)[: self.max_body_bytes + 1], None

    def _answer(self, request: Request) -> Answer:
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
            if refusal.status != 404:
                log.warning("%s: %d to %s: %s", self.name, refusal.status, request.address, refusal)
            payload = {"error": refusal.message, **refusal.extra}
            return refusal.status, _json(payload), "application/json", refusal.headers
        except Exception as exc:  # a bug or a failing disk: the handler committed nothing
            log.exception("%s: %s %s failed", self.name, request.method, request.path)
            payload = {"error": f"the {self.name} could not handle the request: {exc}"}
            return 500, _json(payload), "application/json", {}
        if isinstance(answer, Body):
            return 200, answer.content, answer.content_type, {}
        return 200, _json(answer), "application/json", {}


def http_url(host: str, port: int, tls: bool) -> str:
    """``https://host:port`` (``http://`` without TLS; an IPv6 address in brackets).

    >>> http_url("::1", 8765, tls=True), http_url("127.0.0.1", 80, tls=False)
    ('https://[::1]:8765', 'http://127.0.0.1:80')
    """
    return f"{'https' if tls else 'http'}://{f'[{host}]' if ':' in host else host}:{port}"


def _json(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload).encode()
