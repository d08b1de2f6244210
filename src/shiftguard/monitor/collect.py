"""The central side of record collection: one collector for all sites.

Records come from each edge's spool and shipper (:mod:`shiftguard.edge.shipper`); what a record
holds is :mod:`shiftguard.records.features`, what the collector accepts
:mod:`shiftguard.records.contract`.

* :class:`Collector`: ``POST /v1/records`` validates the whole batch and stores all of it or
  nothing, answering 200 only after the commit; ``GET /healthz`` needs no token.
* :class:`RecordStore`: one SQLite table, a column per envelope field and feature, unique on
  ``record_id``, so a batch sent twice (a lost answer, a re-processed series) is counted as
  duplicates and stored once; :meth:`RecordStore.frame` gives the records in arrival order.

Standard library only, except :meth:`RecordStore.frame` (pandas, imported there).

A round trip on the loopback interface (the collector on a free port):

>>> import tempfile, pathlib
>>> from shiftguard.edge.shipper import Shipper, Spool
>>> from shiftguard.records.features import make_record
>>> tmp = pathlib.Path(tempfile.mkdtemp())
>>> collector = Collector(tmp / "records.db", token="s3cret")
>>> collector.start()
>>> spool = Spool(tmp / "spool.db")
>>> record = make_record({"snr": 21.5}, site="north", bundle="brain-ct", bundle_version="1.0",
...                      series_uid="1.2.3", processed_at="2026-11-28T10:04:16Z",
...                      record_key=b"the site's secret, 32 bytes long")
>>> spool.add([record])
1
>>> shipper = Shipper(spool, collector.url, token="s3cret")
>>> shipper.start()
>>> shipper.flush(timeout=10)
True
>>> collector.store.sites(), collector.store.count(), spool.counts()
(['north'], 1, {'pending': 0, 'sent': 1, 'rejected': 0})
>>> shipper.stop(); spool.close(); collector.stop()
>>> import shutil; shutil.rmtree(tmp)
"""

from __future__ import annotations

import hmac
import json
import logging
import ssl
import threading
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from shiftguard.errors import listening
from shiftguard.records.contract import (
    HEALTH_ROUTE,
    NUMERICAL,
    RECORDS_ROUTE,
    check_records,
    validate_record,
)
from shiftguard.records.features import ENVELOPE, FEATURE_NAMES
from shiftguard.store import Database
from shiftguard.tls import server_context

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _store_schema() -> str:
    columns = [
        "seq INTEGER PRIMARY KEY AUTOINCREMENT",
        "received_at TEXT NOT NULL",
        "record_id TEXT NOT NULL UNIQUE",
        '"schema" INTEGER NOT NULL',
        "site TEXT NOT NULL",
        "bundle TEXT NOT NULL",
        "bundle_version TEXT NOT NULL",
        "processed_at TEXT NOT NULL",
        *(f"{_quote(n)} {'REAL' if n in NUMERICAL else 'TEXT'}" for n in FEATURE_NAMES),
    ]
    return (
        "CREATE TABLE IF NOT EXISTS records (\n    "
        + ",\n    ".join(columns)
        + "\n);\nCREATE INDEX IF NOT EXISTS records_site ON records (site, seq);\n"
    )


class RecordStore(Database):
    """The collector's records from every site (see the module docstring).

    Args:
        path: the SQLite file (created with its folder when missing). A store written before a
            feature was added gains the column (empty for the earlier records).
    """

    COLUMNS = (*ENVELOPE, *FEATURE_NAMES, "seq", "received_at")

    def __init__(self, path: Path | str) -> None:
        super().__init__(path, _store_schema())
        present = {row[1] for row in self.query("PRAGMA table_info(records)")}
        with self.tx() as db:
            for name in FEATURE_NAMES:
                if name not in present:
                    kind = "REAL" if name in NUMERICAL else "TEXT"
                    db.execute(f"ALTER TABLE records ADD COLUMN {_quote(name)} {kind}")

    def insert(self, records: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
        """Store ``records`` in one transaction, committed (on disk) when this returns.

        Returns:
            ``(accepted, duplicates)``: records whose ``record_id`` was already stored (or came
            earlier in the same batch) are duplicates and change nothing.

        Raises:
            InvalidRecordError: (a ``ValueError``) naming each invalid record's index; nothing
                is stored then.
        """
        records = list(records)
        check_records(records, "records for the store")
        received = _utc_now()
        names = [*ENVELOPE, *FEATURE_NAMES]
        sql = (
            f"INSERT OR IGNORE INTO records (received_at, {', '.join(map(_quote, names))}) "
            f"VALUES ({', '.join('?' * (len(names) + 1))})"
        )
        rows: list[list[Any]] = [
            [received]
            + [
                float(r[n]) if n in NUMERICAL and r[n] is not None else r[n]  # ints beyond int64
                for n in names
            ]
            for r in records
        ]
        with self.tx() as db:
            before = db.total_changes
            db.executemany(sql, rows)
            accepted = db.total_changes - before
        return accepted, len(rows) - accepted

    def frame(self, site: str | None = None, since_seq: int = 0) -> pd.DataFrame:
        """The records in arrival order, of one ``site`` or all, after sequence ``since_seq``.

        Returns:
            A ``(N, 6 + len(FEATURE_NAMES) + 2)`` frame, columns :data:`ENVELOPE`, then
            :data:`FEATURE_NAMES`, then ``seq`` (int, increasing with arrival) and ``received_at``
            (ISO-8601 UTC); numerical features float (NaN where null), categoricals str.
        """
        import pandas as pd

        where = "seq > ?"
        args: list[Any] = [int(since_seq)]
        if site is not None:
            where += " AND site = ?"
            args.append(site)
        rows = self.query(
            f"SELECT {', '.join(map(_quote, self.COLUMNS))} FROM records "
            f"WHERE {where} ORDER BY seq",
            args,
        )
        frame = pd.DataFrame.from_records(rows, columns=list(self.COLUMNS))
        dtypes: dict[str, Any] = {n: "float64" for n in NUMERICAL}
        dtypes.update(dict.fromkeys(("schema", "seq"), "int64"))
        dtypes.update({n: object for n in frame.columns if n not in dtypes})
        return frame.astype(dtypes)

    def count(self, site: str | None = None) -> int:
        """How many records are stored (of one ``site``, or all)."""
        if site is None:
            return int(self.query("SELECT COUNT(*) FROM records")[0][0])
        return int(self.query("SELECT COUNT(*) FROM records WHERE site = ?", (site,))[0][0])

    def sites(self) -> list[str]:
        """The sites that reported, sorted."""
        return [str(s) for (s,) in self.query("SELECT DISTINCT site FROM records ORDER BY site")]


class _RefusedError(Exception):
    """An HTTP error answer: status, message and extra JSON fields."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


class _Server(ThreadingHTTPServer):
    """The collector's HTTP server; with a TLS context, each connection's handshake runs in its
    own thread (bounded by the read timeout), so a slow or failing client delays nobody."""

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        tls: ssl.SSLContext | None,
        timeout_s: float,
    ) -> None:
        self.tls, self.timeout_s = tls, timeout_s
        super().__init__(address, handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(self.timeout_s)
        try:
            wrapped = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:  # plain HTTP, no client certificate, a scanner
            log.warning("collector: TLS handshake with %s failed: %s", client_address[0], exc)
            return
        try:
            super().finish_request(wrapped, client_address)
        finally:
            wrapped.close()


class Collector:
    """The HTTP service every site's :class:`Shipper` reports to (see the module docstring).

    Args:
        store: the :class:`RecordStore`, or the path of its file (then the collector opens it and
            closes it on :meth:`stop`).
        token: the bearer token the shippers send (compared in constant time); must not be empty.
        host: the interface to listen on (loopback by default).
        port: the TCP port; 0 picks a free one (see :attr:`port` after :meth:`start`).
        max_batch: the most records per request (413 beyond).
        max_body_bytes: the largest request body (413 beyond).
        read_timeout_s: how long a connection may stall while its request is read.
        tls_cert: PEM certificate: HTTPS when set (the SCP's options: cert, key, CA).
        tls_key: its private key.
        tls_ca: PEM CA bundle; when set, a shipper must present a certificate it signed.
    """

    def __init__(
        self,
        store: RecordStore | Path | str,
        token: str,
        host: str = "127.0.0.1",
        port: int = 0,
        max_batch: int = 5000,
        max_body_bytes: int = 8 << 20,
        read_timeout_s: float = 30.0,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_ca: str | None = None,
    ) -> None:
        if not token or not token.strip():
            raise ValueError(
                "Collector: the token is empty; set a secret token shared with the sites"
            )
        self._owns_store = not isinstance(store, RecordStore)
        self.store = store if isinstance(store, RecordStore) else RecordStore(store)
        self._token = token.encode()
        self.host, self._port = host, port
        self.max_batch, self.max_body_bytes = max_batch, max_body_bytes
        self.read_timeout_s = read_timeout_s
        self._tls = server_context(tls_cert, tls_key, tls_ca) if tls_cert else None
        self._http: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port listened on (the one picked when constructed with ``port=0``)."""
        return int(self._http.server_address[1]) if self._http is not None else self._port

    @property
    def url(self) -> str:
        """``https://host:port`` (``http://`` without TLS), what a :class:`Shipper` is given."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self._tls is not None else 'http'}://{host}:{self.port}"

    def start(self) -> None:
        """Bind the port and serve from a background thread; returns when requests are taken."""
        if self._http is not None:
            return
        with listening(self.host, self._port, "monitor.collector.port"):
            self._http = _Server(
                (self.host, self._port), self._handler(), self._tls, self.read_timeout_s
            )
        self._thread = threading.Thread(
            target=self._http.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="shiftguard-collector",
            daemon=True,
        )
        self._thread.start()
        log.debug("collector: listening on %s", self.url)

    def stop(self) -> None:
        """Stop serving (the port is freed) and close the store if the collector opened it."""
        if self._http is not None:
            self._port = self.port
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._owns_store:
            self.store.close()

    # ---------------------------------------------------------------------------------------------

    def _authorized(self, header: str | None) -> None:
        if not header:
            raise _RefusedError(401, "missing token: send 'Authorization: Bearer <token>'")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), self._token
        ):
            raise _RefusedError(401, "invalid token: check the site's collector token")

    def _accept(self, body: bytes) -> dict[str, Any]:
        """Validate and store one request body; the 200 answer or a :class:`_RefusedError`."""
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise _RefusedError(400, f"the body is not JSON: {exc}") from exc
        records = payload.get("records") if isinstance(payload, dict) else None
        if not isinstance(records, list):
            raise _RefusedError(400, 'expected a JSON object {"records": [...]}')
        if len(records) > self.max_batch:
            raise _RefusedError(
                413,
                f"{len(records)} records in one batch; this collector takes at most "
                f"{self.max_batch}, send smaller batches",
            )
        problems = {str(i): p for i, r in enumerate(records) if (p := validate_record(r))}
        if problems:
            raise _RefusedError(
                400,
                f"{len(problems)} of {len(records)} records are invalid; nothing from this "
                "batch was stored, send the others again",
                problems=problems,
            )
        accepted, duplicates = self.store.insert(records)
        return {"accepted": accepted, "duplicates": duplicates}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        collector = self

        class Handler(BaseHTTPRequestHandler):
            timeout = collector.read_timeout_s
            server_version = "shiftguard-collector"

            def do_GET(self) -> None:
                if urlsplit(self.path).path != HEALTH_ROUTE:
                    self._reply(404, {"error": f"no such route: GET {self.path}"})
                    return
                try:
                    self._reply(200, {"status": "ok", "records": collector.store.count()})
                except Exception as exc:
                    log.exception("collector: health check failed")
                    self._reply(503, {"status": "error", "error": str(exc)})

            def do_POST(self) -> None:
                try:
                    if urlsplit(self.path).path != RECORDS_ROUTE:
                        self._drain()
                        raise _RefusedError(404, f"no such route: POST {self.path}")
                    try:
                        collector._authorized(self.headers.get("Authorization"))
                    except _RefusedError:
                        self._drain()
                        raise
                    answer = collector._accept(self._body())
                except _RefusedError as refusal:
                    log.warning(
                        "collector: %d to %s: %s", refusal.status, self.address_string(), refusal
                    )
                    self._reply(refusal.status, {"error": refusal.message, **refusal.extra})
                    return
                except Exception as exc:  # a bug or a failing disk: nothing was committed
                    log.exception("collector: cannot store a batch")
                    self._reply(500, {"error": f"the collector could not store the batch: {exc}"})
                    return
                log.debug("collector: %s from %s", answer, self.address_string())
                self._reply(200, answer)

            def do_PUT(self) -> None:
                self._not_found()

            def do_DELETE(self) -> None:
                self._not_found()

            def do_PATCH(self) -> None:
                self._not_found()

            def _not_found(self) -> None:
                self._drain()
                self._reply(404, {"error": f"no such route: {self.command} {self.path}"})

            def _length(self) -> int:
                if self.headers.get("Transfer-Encoding"):
                    raise _RefusedError(
                        411, "chunked bodies are not supported; send Content-Length"
                    )
                try:
                    length = int(self.headers.get("Content-Length", ""))
                except ValueError:
                    raise _RefusedError(411, "missing or invalid Content-Length") from None
                if length < 0:
                    raise _RefusedError(400, f"invalid Content-Length {length}")
                return length

            def _body(self) -> bytes:
                length = self._length()
                if length > collector.max_body_bytes:
                    self._drain(length)
                    raise _RefusedError(
                        413,
                        f"the body has {length} bytes; this collector takes at most "
                        f"{collector.max_body_bytes}, send smaller batches",
                    )
                body = self.rfile.read(length)
                if len(body) < length:
                    raise _RefusedError(400, f"the body ended after {len(body)} of {length} bytes")
                return body

            def _drain(self, length: int | None = None) -> None:
                """Read a body that is refused, so the client reads the answer instead of a reset
                connection (beyond 4 x max_body_bytes the connection is just closed)."""
                try:
                    left = self._length() if length is None else length
                except _RefusedError:
                    return
                if left > 4 * collector.max_body_bytes:
                    return
                while left > 0:
                    chunk = self.rfile.read(min(left, 1 << 16))
                    if not chunk:
                        return
                    left -= len(chunk)

            def _reply(self, status: int, payload: Mapping[str, Any]) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                if status == 401:
                    self.send_header("WWW-Authenticate", 'Bearer realm="shiftguard-collector"')
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("collector: %s " + format, self.address_string(), *args)

        return Handler
