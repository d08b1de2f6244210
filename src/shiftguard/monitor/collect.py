"""Collecting feature records: from each edge runner's spool to one collector for all sites.

The path of a record (see :mod:`shiftguard.monitor.features` for what it holds):

* :class:`Spool` (edge side): the runner appends each record to a SQLite queue (WAL,
  ``synchronous=FULL``) and it is on disk when :meth:`Spool.add` returns; a record stays there as
  ``pending`` until the collector has committed it (``sent``) or refused it (``rejected``, with the
  reason, kept for inspection and :meth:`Spool.requeue_rejected`).
* :class:`Shipper` (edge side): a background thread that posts pending records in batches to the
  collector with a bearer token. A collector that is down, slow or failing (connection errors,
  timeouts, 408, 429, 5xx) is retried with exponential backoff and jitter, so nothing is lost; a
  wrong token or URL (401, 403, 404, 405) is logged and retried the same way, the records stay
  pending until the configuration is fixed; a 413 halves the batch; any other refusal (400) rejects
  only the records the collector named, and the others are sent again at once.
* :class:`Collector` (central side): ``POST /v1/records`` validates the whole batch and stores all
  of it or nothing, answering 200 only after the commit; ``GET /healthz`` needs no token.
* :class:`RecordStore` (central side): one SQLite table, a column per envelope field and feature,
  unique on ``record_id``, so a batch sent twice (a lost answer, a re-processed series) is counted
  as duplicates and stored once; :meth:`RecordStore.frame` gives the records in arrival order.

Standard library only, except :meth:`RecordStore.frame` (pandas, imported there): the edge runtime
imports this module without pandas.

A round trip on the loopback interface (the collector on a free port):

>>> import tempfile, pathlib
>>> from shiftguard.monitor.features import make_record
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
import http.client
import ipaddress
import json
import logging
import math
import random
import re
import sqlite3
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from shiftguard.edge.queue import transaction
from shiftguard.errors import ShiftGuardError, listening
from shiftguard.monitor.features import BY_NAME, ENVELOPE, FEATURE_NAMES, SCHEMA_VERSION
from shiftguard.tls import client_context, server_context

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

#: the longest categorical feature value a record may carry (what ``features._category`` keeps)
MAX_CATEGORY = 64
#: the longest ``bundle`` or ``bundle_version`` a record may carry
MAX_ENVELOPE_TEXT = 128
RECORD_ID = re.compile(r"[0-9a-f]{32}")
SITE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
FIELDS = (*ENVELOPE, *FEATURE_NAMES)
NUMERICAL = tuple(n for n in FEATURE_NAMES if BY_NAME[n].kind == "numerical")
CATEGORICAL = tuple(n for n in FEATURE_NAMES if BY_NAME[n].kind == "categorical")
RECORDS_ROUTE = "/v1/records"
HEALTH_ROUTE = "/healthz"
PENDING, SENT, REJECTED = "pending", "sent", "rejected"
#: the most bytes of an answer the shipper reads
MAX_ANSWER_BYTES = 1 << 20


class InvalidRecordError(ShiftGuardError, ValueError):
    """Records that do not follow the record schema; ``problems`` maps each one's index in the
    batch to what is wrong with it."""

    def __init__(self, problems: Mapping[int, Sequence[str]], what: str = "records") -> None:
        self.problems = {int(i): list(p) for i, p in problems.items()}
        shown = "; ".join(f"record {i}: {', '.join(p)}" for i, p in list(self.problems.items())[:5])
        more = len(self.problems) - 5
        super().__init__(
            f"{len(self.problems)} invalid {what} ({shown}{f'; and {more} more' if more > 0 else ''}); "
            "build records with shiftguard.monitor.features.make_record"
        )


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------


def validate_record(record: Any) -> list[str]:
    """Every problem of one record, each naming its field; an empty list for a valid record.

    A record is a JSON object with exactly the envelope fields (:data:`ENVELOPE`) and the features
    (:data:`FEATURE_NAMES`): numerical features a finite number or null, categorical ones a string
    of at most 64 characters.

    >>> for problem in validate_record({"schema": 2, "snr": "abc", "patient_name": "X"})[-3:]:
    ...     print(problem)
    unknown field 'patient_name'
    schema 2: this collector reads schema 1
    snr: expected a number or null, got 'abc'
    >>> validate_record([1, 2])
    ['record: expected a JSON object, got list']
    """
    if not isinstance(record, Mapping):
        return [f"record: expected a JSON object, got {type(record).__name__}"]
    problems = [f"missing field '{name}'" for name in FIELDS if name not in record]
    problems += [
        f"unknown field {_show(k)}" for k in record if k not in BY_NAME and k not in ENVELOPE
    ]
    for name in FIELDS:
        if name in record:
            problem = _field_problem(name, record[name])
            if problem:
                problems.append(problem)
    return problems


def _field_problem(name: str, value: Any) -> str | None:
    if name == "record_id":
        if not (isinstance(value, str) and RECORD_ID.fullmatch(value)):
            return f"record_id: expected 32 lowercase hexadecimal characters, got {_show(value)}"
    elif name == "schema":
        if not isinstance(value, int) or isinstance(value, bool):
            return f"schema: expected an integer, got {_show(value)}"
        if value != SCHEMA_VERSION:
            return f"schema {value}: this collector reads schema {SCHEMA_VERSION}"
    elif name == "site":
        if not (isinstance(value, str) and SITE.fullmatch(value)):
            return f"site: expected 1-64 characters of A-Z a-z 0-9 _ . -, got {_show(value)}"
    elif name in ("bundle", "bundle_version"):
        if not isinstance(value, str) or not 0 < len(value) <= MAX_ENVELOPE_TEXT:
            return (
                f"{name}: expected a string of 1-{MAX_ENVELOPE_TEXT} characters, got {_show(value)}"
            )
    elif name == "processed_at":
        if not _is_utc_timestamp(value):
            return (
                "processed_at: expected an ISO-8601 UTC timestamp such as "
                f"'2026-11-28T10:04:16Z', got {_show(value)}"
            )
    elif BY_NAME[name].kind == "numerical":
        if value is not None and not _is_finite_number(value):
            return f"{name}: expected a number or null, got {_show(value)}"
    elif not isinstance(value, str):
        return f"{name}: expected a string, got {_show(value)}"
    elif len(value) > MAX_CATEGORY:
        return f"{name}: expected at most {MAX_CATEGORY} characters, got {len(value)}"
    return None


def _is_finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond a float's range
        return False


def _is_utc_timestamp(value: Any) -> bool:
    if not isinstance(value, str) or "T" not in value.upper():
        return False
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return False
    return moment.utcoffset() == timedelta(0)


def _show(value: Any, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _check(records: Sequence[Any], what: str) -> None:
    problems = {i: p for i, r in enumerate(records) if (p := validate_record(r))}
    if problems:
        raise InvalidRecordError(problems, what)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class _Database:
    """One SQLite connection (WAL, ``synchronous=FULL``: a commit is on disk when it returns),
    shared by the threads of one process under a lock."""

    def __init__(self, path: Path | str, schema: str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            str(self.path), isolation_level=None, check_same_thread=False, timeout=30.0
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        with self._lock:
            self._db.executescript(schema)

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self._db, self._lock)

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()


# ------------------------------------------------------------------------------------------------
# edge side: the spool and the shipper
# ------------------------------------------------------------------------------------------------

SPOOL_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    record_id TEXT NOT NULL,
    body TEXT NOT NULL,
    state TEXT NOT NULL,
    added_at REAL NOT NULL,
    done_at REAL,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS spool_state ON spool (state, seq);
"""


class Spool(_Database):
    """The edge's durable queue of records waiting for the collector (see the module docstring).

    Args:
        path: the SQLite file (created with its folder when missing).
    """

    def __init__(self, path: Path | str) -> None:
        super().__init__(path, SPOOL_SCHEMA)

    def add(self, records: Sequence[Mapping[str, Any]]) -> int:
        """Queue ``records`` (all or none, one transaction); they are on disk when this returns.

        Returns:
            How many records were queued (a record queued twice is sent twice; the collector
            counts the second as a duplicate).

        Raises:
            InvalidRecordError: (a ``ValueError``) naming each invalid record's index in
                ``records`` and its problems; nothing is queued then.
        """
        records = list(records)
        _check(records, "records for the spool")
        now = time.time()
        rows = [
            (
                r["record_id"],
                json.dumps(dict(r), allow_nan=False, separators=(",", ":")),
                PENDING,
                now,
            )
            for r in records
        ]
        with self._tx() as db:
            db.executemany(
                "INSERT INTO spool (record_id, body, state, added_at) VALUES (?, ?, ?, ?)", rows
            )
        return len(rows)

    def pending(self, limit: int = 500) -> list[tuple[int, dict[str, Any]]]:
        """The oldest ``limit`` pending records as ``(seq, record)`` pairs, in the order added."""
        rows = self._query(
            "SELECT seq, body FROM spool WHERE state = ? ORDER BY seq LIMIT ?", (PENDING, limit)
        )
        return [(int(seq), json.loads(body)) for seq, body in rows]

    def mark_sent(self, seqs: Iterable[int]) -> int:
        """Mark pending records as committed by the collector; returns how many changed."""
        return self._finish({int(s): "" for s in seqs}, SENT)

    def mark_rejected(self, reasons: Mapping[int, str]) -> int:
        """Mark pending records as refused by the collector, keeping each one's reason."""
        return self._finish(reasons, REJECTED)

    def _finish(self, reasons: Mapping[int, str], state: str) -> int:
        now = time.time()
        with self._tx() as db:
            before = db.total_changes
            db.executemany(
                "UPDATE spool SET state = ?, done_at = ?, reason = ? WHERE seq = ? AND state = ?",
                [(state, now, reason, int(seq), PENDING) for seq, reason in reasons.items()],
            )
            return db.total_changes - before

    def rejected(self, limit: int = 100) -> list[tuple[int, str, str]]:
        """The oldest ``limit`` rejected records as ``(seq, record_id, reason)``."""
        rows = self._query(
            "SELECT seq, record_id, reason FROM spool WHERE state = ? ORDER BY seq LIMIT ?",
            (REJECTED, limit),
        )
        return [(int(s), str(i), str(r)) for s, i, r in rows]

    def requeue_rejected(self) -> int:
        """Make every rejected record pending again (after the collector was fixed or upgraded)."""
        with self._tx() as db:
            return db.execute(
                "UPDATE spool SET state = ?, done_at = NULL, reason = '' WHERE state = ?",
                (PENDING, REJECTED),
            ).rowcount

    def purge_sent(self, older_than_s: float = 0.0) -> int:
        """Delete records the collector committed more than ``older_than_s`` seconds ago."""
        with self._tx() as db:
            return db.execute(
                "DELETE FROM spool WHERE state = ? AND done_at <= ?",
                (SENT, time.time() - older_than_s),
            ).rowcount

    def counts(self) -> dict[str, int]:
        """How many records are ``pending``, ``sent`` and ``rejected``."""
        out = dict.fromkeys((PENDING, SENT, REJECTED), 0)
        for state, n in self._query("SELECT state, COUNT(*) FROM spool GROUP BY state"):
            out[str(state)] = int(n)
        return out


class Shipper:
    """Drains a :class:`Spool` to a :class:`Collector` from a background thread.

    Args:
        spool: the records to send.
        url: the collector's base URL, e.g. ``https://collector.example:8470``; ``http://``
            only to a loopback address (the token would cross the network in clear).
        token: the collector's bearer token.
        batch_size: the most records per request (halved on every 413).
        timeout_s: the timeout of each HTTP request.
        backoff_s: the first wait after a failed attempt; doubled on each further failure ...
        max_backoff_s: ... up to this; each wait is drawn in [50 %, 100 %] of it (jitter, so that
            sites do not all come back at the same instant).
        poll_s: how often an idle shipper looks at the spool without :meth:`wake` (records added
            by another process).
        tls_ca: PEM CA bundle the collector's certificate must chain to (None: the system's).
        tls_cert: PEM client certificate, for a collector that requires one.
        tls_key: its private key.

    Raises:
        CollectorAddressError: ``url`` is not http(s), or plain ``http://`` to another machine.
    """

    def __init__(
        self,
        spool: Spool,
        url: str,
        token: str,
        *,
        batch_size: int = 500,
        timeout_s: float = 10.0,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        poll_s: float = 5.0,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        if not token:
            raise ValueError("Shipper: the collector's token is empty; pass the site's token")
        self._tls = _client_tls(url, tls_ca, tls_cert, tls_key)
        if batch_size < 1:
            raise ValueError(f"Shipper: batch_size must be at least 1, got {batch_size}")
        self.spool = spool
        self.endpoint = url.rstrip("/") + RECORDS_ROUTE
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.poll_s = poll_s
        #: what went wrong on the last attempt (None after a success)
        self.last_error: str | None = None
        self._token = token
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the background thread (once)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="shiftguard-shipper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop after the request in flight, if any (bounded by ``timeout_s``)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s + 5)
            self._thread = None

    def wake(self) -> None:
        """Ship now (new records were added) instead of at the next poll; a backoff wait after a
        failure is not cut short."""
        self._wake.set()

    def flush(self, timeout: float) -> bool:
        """Wait until no record is pending (all sent or rejected); False after ``timeout`` s."""
        self.wake()
        deadline = time.monotonic() + timeout
        while self.spool.counts()[PENDING]:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    # ---------------------------------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                batch = self.spool.pending(self.batch_size)
                if not batch:
                    self._wake.wait(self.poll_s)
                    self._wake.clear()
                    continue
                retry = self._ship(batch)
            except Exception as exc:  # a bug or a broken spool: keep the thread, say why
                log.exception("shipper: unexpected error, retrying later")
                self.last_error = f"unexpected error: {exc!r}"
                retry = True
            if retry:
                failures = min(failures + 1, 32)
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** (failures - 1))
                self._stop.wait(delay * random.uniform(0.5, 1.0))
            else:
                failures = 0

    def _ship(self, batch: list[tuple[int, dict[str, Any]]]) -> bool:
        """Send one batch and record the outcome in the spool; True to back off and retry."""
        seqs = [seq for seq, _ in batch]
        try:
            status, answer = self._post([record for _, record in batch])
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            self.last_error = f"cannot reach {self.endpoint}: {reason}"
            log.warning("shipper: %s; %d records stay pending", self.last_error, len(seqs))
            return True
        message = str(answer.get("error") or answer or "(no message)")
        if 200 <= status < 300:
            self.spool.mark_sent(seqs)
            self.last_error = None
            log.debug("shipper: %d records sent (%s)", len(seqs), answer)
            return False
        self.last_error = f"{self.endpoint} answered {status}: {message}"
        if status == 413 and len(seqs) > 1:
            self.batch_size = max(1, len(seqs) // 2)
            log.warning("shipper: %s; sending batches of %d", self.last_error, self.batch_size)
            return False
        if status == 413:
            self.spool.mark_rejected({seqs[0]: f"too large for the collector (413): {message}"})
            log.warning("shipper: record %d rejected: %s", seqs[0], self.last_error)
            return False
        if status in (401, 403, 404, 405):
            log.error(
                "shipper: %s; check the collector URL and token; %d records stay pending",
                self.last_error,
                len(seqs),
            )
            return True
        if status in (408, 429) or not 400 <= status < 500:
            log.warning("shipper: %s; %d records stay pending", self.last_error, len(seqs))
            return True
        reasons = _named_problems(answer.get("problems"), seqs)
        if not reasons:  # nothing named: the whole batch is refused
            reasons = {seq: f"{status}: {message}" for seq in seqs}
        self.spool.mark_rejected(reasons)
        log.warning(
            "shipper: %s; %d of %d records rejected, the others are sent again",
            self.last_error,
            len(reasons),
            len(seqs),
        )
        return False

    def _post(self, records: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
        body = json.dumps({"records": records}, allow_nan=False, separators=(",", ":")).encode()
        request = urllib.request.Request(
            self.endpoint,
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {self._token}",
            },
        )
        try:
            with urllib.request.urlopen(
                request, timeout=self.timeout_s, context=self._tls
            ) as response:
                return int(response.status), _json_object(response.read(MAX_ANSWER_BYTES))
        except urllib.error.HTTPError as exc:
            with exc:
                return int(exc.code), _json_object(exc.read(MAX_ANSWER_BYTES))


class CollectorAddressError(ShiftGuardError, ValueError):
    """A collector URL a shipper must not use (not http(s), or plain HTTP across the network)."""


def _client_tls(
    url: str, ca: str | None, cert: str | None, key: str | None
) -> ssl.SSLContext | None:
    """The TLS context for ``url`` (None for plain HTTP to loopback)."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        return client_context(ca, cert, key)
    if parts.scheme != "http" or not parts.hostname:
        raise CollectorAddressError(
            f"collector URL {url!r}: expected https://host:port (http:// on loopback only)"
        )
    host = parts.hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise CollectorAddressError(
            f"collector URL {url}: plain HTTP would send the bearer token across the network in "
            f"clear; serve the collector over TLS (monitor.collector.tls_cert/tls_key) and use "
            f"https://{parts.netloc}"
        )
    return None


def _named_problems(problems: Any, seqs: Sequence[int]) -> dict[int, str]:
    """The spool seqs of the records a 400 answer's ``problems`` names, with their problems."""
    if not isinstance(problems, Mapping):
        return {}
    out = {}
    for key, items in problems.items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            continue
        if 0 <= index < len(seqs):
            text = "; ".join(map(str, items)) if isinstance(items, list) else str(items)
            out[seqs[index]] = text
    return out


def _json_object(payload: bytes) -> dict[str, Any]:
    try:
        value = json.loads(payload)
    except ValueError:
        text = payload.decode("utf-8", "replace").strip()[:200]
        return {"error": text} if text else {}
    return value if isinstance(value, dict) else {"error": str(value)[:200]}


# ------------------------------------------------------------------------------------------------
# central side: the store and the collector
# ------------------------------------------------------------------------------------------------


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


class RecordStore(_Database):
    """The collector's records from every site (see the module docstring).

    Args:
        path: the SQLite file (created with its folder when missing). A store written before a
            feature was added gains the column (empty for the earlier records).
    """

    COLUMNS = (*ENVELOPE, *FEATURE_NAMES, "seq", "received_at")

    def __init__(self, path: Path | str) -> None:
        super().__init__(path, _store_schema())
        present = {row[1] for row in self._query("PRAGMA table_info(records)")}
        with self._tx() as db:
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
        _check(records, "records for the store")
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
        with self._tx() as db:
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
        rows = self._query(
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
            return int(self._query("SELECT COUNT(*) FROM records")[0][0])
        return int(self._query("SELECT COUNT(*) FROM records WHERE site = ?", (site,))[0][0])

    def sites(self) -> list[str]:
        """The sites that reported, sorted."""
        return [str(s) for (s,) in self._query("SELECT DISTINCT site FROM records ORDER BY site")]


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
