"""The central side of record collection: one collector for all sites.

Records come from each edge's spool and shipper (:mod:`shiftguard.edge.shipper`); what a record
holds is :mod:`shiftguard.records.features`, what the collector accepts
:mod:`shiftguard.records.contract`.

* :class:`Collector`: ``POST /v1/records`` validates the whole batch and stores all of it or
  nothing, answering 200 only after the commit; ``POST /v1/heartbeats`` keeps each site's latest
  heartbeat (both need the token); ``GET /v1/fleet`` and ``GET /fleet`` (the fleet view as JSON
  and as a page, :mod:`shiftguard.monitor.fleet`), ``GET /healthz`` and ``GET /metrics``
  (batches and records by outcome, records per site, each site's heartbeat age and bundle) need
  none. The alert rules on ``heartbeat_age`` are judged every few seconds (stale sites, to the
  webhook). It serves through :class:`~shiftguard.endpoint.Endpoint` (uvicorn), like the edge
  service.
* :class:`RecordStore`: one SQLite table, a column per envelope field and feature, unique on
  ``record_id``, so a batch sent twice (a lost answer, a re-processed series) is counted as
  duplicates and stored once; :meth:`RecordStore.frame` gives the records in arrival order.
  :class:`PostgresRecordStore` is the same table on a PostgreSQL server (psycopg 3), for a
  central side that many sites report to; :func:`open_record_store` picks by the location
  (``monitor.collector.store``: a file path, or a ``postgresql://`` URL).

No pandas except in :meth:`RecordStore.frame` (imported there).

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
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily

from shiftguard.endpoint import Body, Endpoint, HttpError, Request, http_url
from shiftguard.errors import CollectorStoreError
from shiftguard.monitor.fleet import FLEET_PAGE, FleetWatch, fleet_rows, render_page, stale_limit
from shiftguard.records.contract import (
    FLEET_ROUTE,
    HEARTBEATS_ROUTE,
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

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="shiftguard-collector"'}
SITE_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
MAX_HEARTBEAT_BYTES = 64 << 10


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _columns(seq: str, real: str) -> list[str]:
    """The records table's column definitions; ``seq`` the key's, ``real`` the type of a number."""
    return [
        seq,
        "received_at TEXT NOT NULL",
        "record_id TEXT NOT NULL UNIQUE",
        '"schema" INTEGER NOT NULL',
        "site TEXT NOT NULL",
        "bundle TEXT NOT NULL",
        "bundle_version TEXT NOT NULL",
        "processed_at TEXT NOT NULL",
        *(_column(n, real) for n in FEATURE_NAMES),
    ]


def _column(name: str, real: str) -> str:
    return f"{_quote(name)} {real if name in NUMERICAL else 'TEXT'}"


def _store_schema() -> str:
    return (
        "CREATE TABLE IF NOT EXISTS records (\n    "
        + ",\n    ".join(_columns("seq INTEGER PRIMARY KEY AUTOINCREMENT", "REAL"))
        + "\n);\nCREATE INDEX IF NOT EXISTS records_site ON records (site, seq);\n"
        + _HEARTBEATS_TABLE
        + ";\n"
    )


#: each site's latest heartbeat (:meth:`_RecordReads.put_heartbeat`)
_HEARTBEATS_TABLE = (
    "CREATE TABLE IF NOT EXISTS heartbeats (site TEXT PRIMARY KEY, received_at TEXT NOT NULL, "
    "beats INTEGER NOT NULL, payload TEXT NOT NULL)"
)


#: the columns an insert writes, in its order (``received_at`` first)
_INSERTED = (*ENVELOPE, *FEATURE_NAMES)


def _insert_rows(records: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    """``records`` checked and as insert rows: ``received_at`` (now), then :data:`_INSERTED`.

    Raises:
        InvalidRecordError: (a ``ValueError``) naming each invalid record's index.
    """
    check_records(records, "records for the store")
    received = _utc_now()
    return [
        [received]
        + [
            float(r[n]) if n in NUMERICAL and r[n] is not None else r[n]  # ints beyond int64
            for n in _INSERTED
        ]
        for r in records
    ]


class _RecordReads:
    """What both stores read back, and the heartbeats they keep, in their own SQL dialect:
    :meth:`_rows` runs one query, :meth:`_write` one write, their parameters written
    :attr:`_MARK`."""

    COLUMNS = (*ENVELOPE, *FEATURE_NAMES, "seq", "received_at")
    _MARK = "?"

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        raise NotImplementedError

    def _write(self, sql: str, args: Sequence[Any] = ()) -> None:
        """Run one write statement in its own transaction, committed when it returns."""
        raise NotImplementedError

    def frame(self, site: str | None = None, since_seq: int = 0) -> pd.DataFrame:
        """The records in arrival order, of one ``site`` or all, after sequence ``since_seq``.

        Returns:
            A ``(N, 6 + len(FEATURE_NAMES) + 2)`` frame, columns :data:`ENVELOPE`, then
            :data:`FEATURE_NAMES`, then ``seq`` (int, increasing with arrival) and ``received_at``
            (ISO-8601 UTC); numerical features float (NaN where null), categoricals str.
        """
        import pandas as pd

        where = f"seq > {self._MARK}"
        args: list[Any] = [int(since_seq)]
        if site is not None:
            where += f" AND site = {self._MARK}"
            args.append(site)
        rows = self._rows(
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
            return int(self._rows("SELECT COUNT(*) FROM records")[0][0])
        sql = f"SELECT COUNT(*) FROM records WHERE site = {self._MARK}"
        return int(self._rows(sql, (site,))[0][0])

    def sites(self) -> list[str]:
        """The sites that reported, sorted."""
        return [str(s) for (s,) in self._rows("SELECT DISTINCT site FROM records ORDER BY site")]

    def counts_by_site(self) -> dict[str, int]:
        """Records stored per site."""
        rows = self._rows("SELECT site, COUNT(*) FROM records GROUP BY site ORDER BY site")
        return {str(site): int(n) for site, n in rows}

    def put_heartbeat(self, site: str, payload: Mapping[str, Any]) -> None:
        """Keep ``site``'s latest heartbeat (one row per site: the newest replaces the last),
        committed when this returns."""
        m = self._MARK
        self._write(
            f"INSERT INTO heartbeats (site, received_at, beats, payload) VALUES ({m}, {m}, 1, {m}) "
            "ON CONFLICT (site) DO UPDATE SET received_at = excluded.received_at, "
            "beats = heartbeats.beats + 1, payload = excluded.payload",
            (site, _utc_now(), json.dumps(dict(payload), sort_keys=True)),
        )

    def heartbeats(self) -> list[dict[str, Any]]:
        """Each site's latest heartbeat, by site: what the site sent, with ``received_at`` (when
        the collector got it, ISO-8601 UTC) and ``beats`` (how many it has sent)."""
        rows = self._rows("SELECT site, received_at, beats, payload FROM heartbeats ORDER BY site")
        return [
            {
                **json.loads(payload),
                "site": str(site),
                "received_at": str(received),
                "beats": int(n),
            }
            for site, received, n, payload in rows
        ]


class RecordStore(_RecordReads, Database):
    """The collector's records from every site (see the module docstring).

    Args:
        path: the SQLite file (created with its folder when missing). A store written before a
            feature was added gains the column (empty for the earlier records).
    """

    def __init__(self, path: Path | str) -> None:
        super().__init__(path, _store_schema())
        present = {row[1] for row in self.query("PRAGMA table_info(records)")}
        with self.tx() as db:
            for name in FEATURE_NAMES:
                if name not in present:
                    db.execute(f"ALTER TABLE records ADD COLUMN {_column(name, 'REAL')}")

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        return self.query(sql, args)

    def _write(self, sql: str, args: Sequence[Any] = ()) -> None:
        with self.tx() as db:
            db.execute(sql, list(args))

    def insert(self, records: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
        """Store ``records`` in one transaction, committed (on disk) when this returns.

        Returns:
            ``(accepted, duplicates)``: records whose ``record_id`` was already stored (or came
            earlier in the same batch) are duplicates and change nothing.

        Raises:
            InvalidRecordError: (a ``ValueError``) naming each invalid record's index; nothing
                is stored then.
        """
        rows = _insert_rows(list(records))
        sql = (
            f"INSERT OR IGNORE INTO records (received_at, {', '.join(map(_quote, _INSERTED))}) "
            f"VALUES ({', '.join('?' * (len(_INSERTED) + 1))})"
        )
        with self.tx() as db:
            before = db.total_changes
            db.executemany(sql, rows)
            accepted = db.total_changes - before
        return accepted, len(rows) - accepted


class PostgresRecordStore(_RecordReads):
    """:class:`RecordStore`'s table and methods on a PostgreSQL server.

    Args:
        url: a libpq connection URL, ``postgresql://user@host:port/database`` (a password is
            better given by ``PGPASSWORD`` or ``~/.pgpass`` than in the URL, which is logged
            without it). The table is created when missing; a table written before a feature
            was added gains the column.

    One connection, shared by the collector's request threads under a lock; each
    :meth:`insert` is one transaction, committed before it returns.
    """

    _MARK = "%s"

    def __init__(self, url: str) -> None:
        import psycopg

        self.url = url
        try:
            self._db = psycopg.connect(url, autocommit=False)
        except psycopg.Error as exc:
            raise CollectorStoreError(
                f"monitor.collector.store {safe_url(url)}: cannot connect ({exc}); check the "
                "server, database and credentials"
            ) from None
        self._lock = threading.Lock()
        columns = _columns("seq BIGSERIAL PRIMARY KEY", "DOUBLE PRECISION")
        with self._lock, self._db.transaction(), self._db.cursor() as cur:
            cur.execute(f"CREATE TABLE IF NOT EXISTS records ({', '.join(columns)})")
            cur.execute("CREATE INDEX IF NOT EXISTS records_site ON records (site, seq)")
            cur.execute(_HEARTBEATS_TABLE)
            cur.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'records'"
            )
            present = {row[0] for row in cur.fetchall()}
            for name in FEATURE_NAMES:
                if name not in present:
                    cur.execute(
                        f"ALTER TABLE records ADD COLUMN {_column(name, 'DOUBLE PRECISION')}"
                    )

    def insert(self, records: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
        """:meth:`RecordStore.insert`: one transaction; ``(accepted, duplicates)``."""
        rows = _insert_rows(list(records))
        sql = (
            f"INSERT INTO records (received_at, {', '.join(map(_quote, _INSERTED))}) "
            f"VALUES ({', '.join(['%s'] * (len(_INSERTED) + 1))}) "
            "ON CONFLICT (record_id) DO NOTHING"
        )
        with self._lock, self._db.transaction(), self._db.cursor() as cur:
            cur.executemany(sql, rows)  # rowcount: the rows inserted over the whole batch
            accepted = max(cur.rowcount, 0)
        return accepted, len(rows) - accepted

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        with self._lock, self._db.transaction(), self._db.cursor() as cur:
            cur.execute(sql, list(args))
            return list(cur.fetchall())

    def _write(self, sql: str, args: Sequence[Any] = ()) -> None:
        with self._lock, self._db.transaction(), self._db.cursor() as cur:
            cur.execute(sql, list(args))

    def close(self) -> None:
        with self._lock:
            self._db.close()


AnyRecordStore = RecordStore | PostgresRecordStore


def open_record_store(location: Path | str) -> AnyRecordStore:
    """The store at ``location``: a ``postgresql://`` (or ``postgres://``) URL opens
    :class:`PostgresRecordStore`, anything else is a SQLite file for :class:`RecordStore`."""
    text = str(location)
    if text.startswith(("postgresql://", "postgres://")):
        return PostgresRecordStore(text)
    return RecordStore(Path(text))


def safe_url(url: str) -> str:
    """``url`` without its password.

    >>> safe_url("postgresql://sg:secret@db:5432/records")
    'postgresql://sg:***@db:5432/records'
    """
    return re.sub(r"(//[^:/@]+):[^@/]*@", r"\1:***@", url)


class Collector:
    """The HTTP service every site's :class:`Shipper` reports to (see the module docstring).

    Args:
        store: the :class:`RecordStore` or :class:`PostgresRecordStore`, or where it is (a file
            path or a ``postgresql://`` URL: then the collector opens it and closes it on
            :meth:`stop`).
        token: the bearer token the shippers send (compared in constant time); must not be empty.
        host: the interface to listen on (loopback by default).
        port: the TCP port; 0 picks a free one (see :attr:`port` after :meth:`start`).
        max_batch: the most records per request (413 beyond).
        max_body_bytes: the largest request body (413 beyond).
        read_timeout_s: how long a connection may stall while its request is read.
        tls_cert: PEM certificate: HTTPS when set (the SCP's options: cert, key, CA).
        tls_key: its private key.
        tls_ca: PEM CA bundle; when set, a shipper must present a certificate it signed.
        rules: the monitor's alert rules; those on ``heartbeat_age`` judge the fleet
            (:class:`~shiftguard.monitor.fleet.FleetWatch`) every ``fleet_check_s`` seconds.
        webhook: where new fleet alerts are POSTed (None: logged only).
        fleet_check_s: how often the heartbeats are judged.
    """

    def __init__(
        self,
        store: RecordStore | PostgresRecordStore | Path | str,
        token: str,
        host: str = "127.0.0.1",
        port: int = 0,
        max_batch: int = 5000,
        max_body_bytes: int = 8 << 20,
        read_timeout_s: float = 30.0,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_ca: str | None = None,
        rules: Sequence[Any] = (),
        webhook: str | None = None,
        fleet_check_s: float = 5.0,
    ) -> None:
        if not token or not token.strip():
            raise ValueError(
                "Collector: the token is empty; set a secret token shared with the sites"
            )
        self._owns_store = not isinstance(store, RecordStore | PostgresRecordStore)
        self.store: AnyRecordStore = (
            store
            if isinstance(store, RecordStore | PostgresRecordStore)
            else open_record_store(store)
        )
        self._token = token.encode()
        self.host, self._port = host, port
        self.max_batch, self.max_body_bytes = max_batch, max_body_bytes
        self.read_timeout_s = read_timeout_s
        self._tls = server_context(tls_cert, tls_key, tls_ca) if tls_cert else None
        self._endpoint: Endpoint | None = None
        self.registry = CollectorRegistry()
        self._batches = Counter(
            "shiftguard_collector_batches", "Record batches answered, by outcome", ["outcome"],
            registry=self.registry,
        )  # fmt: skip
        self._records = Counter(
            "shiftguard_collector_records_received",
            "Records in accepted batches: stored, or already stored (duplicates)",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in ("accepted", "refused"):
            self._batches.labels(outcome)
        for outcome in ("stored", "duplicate"):
            self._records.labels(outcome)
        self.registry.register(_StoreFigures(self))
        self.fleet = FleetWatch(rules, webhook)
        self.stale_after = stale_limit(rules)
        self.fleet_check_s = fleet_check_s
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port listened on (the one picked when constructed with ``port=0``)."""
        return self._endpoint.port if self._endpoint is not None else self._port

    @property
    def url(self) -> str:
        """``https://host:port`` (``http://`` without TLS), what a :class:`Shipper` is given."""
        return http_url(self.host, self.port, self._tls is not None)

    def start(self) -> None:
        """Bind the port and serve from a background thread; returns when requests are taken."""
        if self._endpoint is not None:
            return
        self._endpoint = Endpoint(
            self.host,
            self._port,
            "monitor.collector.port",
            health=lambda: {"records": self.store.count()},
            registry=self.registry,
            routes={
                ("POST", RECORDS_ROUTE): self._post_records,
                ("POST", HEARTBEATS_ROUTE): self._post_heartbeat,
                ("GET", FLEET_ROUTE): lambda _: self.fleet_status(),
                ("GET", FLEET_PAGE): lambda _: Body(render_page(self.fleet_status()["sites"])),
            },
            tls=self._tls,
            read_timeout_s=self.read_timeout_s,
            max_body_bytes=self.max_body_bytes,
            name="collector",
        )
        self._endpoint.start()
        self._stop.clear()
        if self.fleet.rules:
            self._watcher = threading.Thread(
                target=self._watch, name="collector-fleet", daemon=True
            )
            self._watcher.start()
        log.debug("collector: listening on %s", self.url)

    def stop(self) -> None:
        """Stop serving (the port is freed) and close the store if the collector opened it."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=10)
            self._watcher = None
        if self._endpoint is not None:
            self._port = self._endpoint.port
            self._endpoint.stop()
            self._endpoint = None
        if self._owns_store:
            self.store.close()

    # ---------------------------------------------------------------------------------------------

    def _post_records(self, request: Request) -> dict[str, Any]:
        """``POST /v1/records``: the token, then the whole batch stored, or nothing."""
        try:
            self._authorized(request.headers.get("Authorization"))
            answer = self._accept(request.body())
        except HttpError:
            self._batches.labels("refused").inc()
            raise
        self._batches.labels("accepted").inc()
        self._records.labels("stored").inc(answer["accepted"])
        self._records.labels("duplicate").inc(answer["duplicates"])
        log.debug("collector: %s from %s", answer, request.address)
        return answer

    def _post_heartbeat(self, request: Request) -> dict[str, Any]:
        """``POST /v1/heartbeats``: the token, then one site's state, kept as its latest."""
        self._authorized(request.headers.get("Authorization"))
        body = request.body()
        if len(body) > MAX_HEARTBEAT_BYTES:
            raise HttpError(413, f"a heartbeat of {len(body)} bytes; at most {MAX_HEARTBEAT_BYTES}")
        try:
            beat = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise HttpError(400, f"the body is not JSON: {exc}") from exc
        site = beat.get("site") if isinstance(beat, dict) else None
        if not isinstance(site, str) or not SITE_NAME.fullmatch(site):
            raise HttpError(
                400, "a heartbeat is a JSON object with a 'site' name (A-Z a-z 0-9 _ . -)"
            )
        interval = beat.get("interval_s")
        if not isinstance(interval, int | float) or not interval > 0:
            raise HttpError(400, f"heartbeat of {site}: 'interval_s' must be a positive number")
        self.store.put_heartbeat(site, beat)
        return {"site": site, "stored": True}

    def fleet_status(self) -> dict[str, Any]:
        """``GET /v1/fleet``: each site's latest heartbeat with its age and whether it is stale."""
        return {
            "stale_after": self.stale_after,
            "sites": fleet_rows(self.store.heartbeats(), stale_after=self.stale_after),
        }

    def _watch(self) -> None:
        while not self._stop.wait(self.fleet_check_s):
            try:
                self.fleet.check(self.store.heartbeats())
            except Exception:  # the store failing must not stop the collector taking records
                log.exception("collector: the fleet check failed; trying again")

    def _authorized(self, header: str | None) -> None:
        if not header:
            raise HttpError(401, "missing token: send 'Authorization: Bearer <token>'", _CHALLENGE)
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), self._token
        ):
            raise HttpError(401, "invalid token: check the site's collector token", _CHALLENGE)

    def _accept(self, body: bytes) -> dict[str, Any]:
        """Validate and store one request body; the 200 answer or a :class:`HttpError`."""
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise HttpError(400, f"the body is not JSON: {exc}") from exc
        records = payload.get("records") if isinstance(payload, dict) else None
        if not isinstance(records, list):
            raise HttpError(400, 'expected a JSON object {"records": [...]}')
        if len(records) > self.max_batch:
            raise HttpError(
                413,
                f"{len(records)} records in one batch; this collector takes at most "
                f"{self.max_batch}, send smaller batches",
            )
        problems = {str(i): p for i, r in enumerate(records) if (p := validate_record(r))}
        if problems:
            raise HttpError(
                400,
                f"{len(problems)} of {len(records)} records are invalid; nothing from this "
                "batch was stored, send the others again",
                problems=problems,
            )
        accepted, duplicates = self.store.insert(records)
        return {"accepted": accepted, "duplicates": duplicates}


class _StoreFigures:
    """Scrape-time figures of the record store and the fleet: records per site, each site's
    heartbeat age (in its intervals), bundle and state."""

    def __init__(self, collector: Collector) -> None:
        self.collector = collector

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "shiftguard_collector_records", "Records stored, by site", labels=["site"]
        )
        for site, count in self.collector.store.counts_by_site().items():
            family.add_metric([site], count)
        yield family
        age = GaugeMetricFamily(
            "shiftguard_fleet_heartbeat_age",
            "Time since the site's last heartbeat, in units of its heartbeat interval",
            labels=["site"],
        )
        seconds = GaugeMetricFamily(
            "shiftguard_fleet_heartbeat_age_seconds", "Seconds since the site's last heartbeat",
            labels=["site"],
        )  # fmt: skip
        bundle = GaugeMetricFamily(
            "shiftguard_fleet_bundle", "The bundle each site serves (1), with its state",
            labels=["site", "bundle_version", "registry_version", "state"],
        )  # fmt: skip
        for row in self.collector.fleet_status()["sites"]:
            site = str(row["site"])
            age.add_metric([site], float(row["heartbeat_age"]))
            seconds.add_metric([site], float(row["age_s"]))
            labels = [
                str(row.get(k) or "") for k in ("bundle_version", "registry_version", "state")
            ]
            bundle.add_metric([site, *labels], 1.0)
        yield age
        yield seconds
        yield bundle
