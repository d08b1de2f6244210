"""The edge side of record collection: the spool on disk and the shipper that sends it.

* :class:`Spool`: the runner appends each record to a SQLite queue (WAL, ``synchronous=FULL``) and
  it is on disk when :meth:`Spool.add` returns; a record stays there as ``pending`` until the
  collector has committed it (``sent``) or refused it (``rejected``, with the reason, kept for
  inspection and :meth:`Spool.requeue_rejected`).
* :class:`Shipper`: a background thread that posts pending records in batches to the collector
  (:mod:`shiftguard.monitor.collect`) with a bearer token. A collector that is down, slow or failing
  (connection errors, timeouts, 408, 429, 5xx) is retried with exponential backoff and jitter, so
  nothing is lost; a wrong token or URL (401, 403, 404, 405) is logged and retried the same way, the
  records stay pending until the configuration is fixed; a 413 halves the batch; any other refusal
  (400) rejects only the records the collector named, and the others are sent again at once.

Standard library only.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

# raised by the URL check (shiftguard.tls.url_context); importable from here as it always was
from shiftguard.errors import CollectorAddressError as CollectorAddressError
from shiftguard.records.contract import HEARTBEATS_ROUTE, RECORDS_ROUTE, check_records
from shiftguard.store import Database
from shiftguard.tls import url_context

log = logging.getLogger(__name__)

PENDING, SENT, REJECTED = "pending", "sent", "rejected"
#: the most bytes of an answer the shipper reads
MAX_ANSWER_BYTES = 1 << 20


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


class Spool(Database):
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
        check_records(records, "records for the spool")
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
        with self.tx() as db:
            db.executemany(
                "INSERT INTO spool (record_id, body, state, added_at) VALUES (?, ?, ?, ?)", rows
            )
        return len(rows)

    def pending(self, limit: int = 500) -> list[tuple[int, dict[str, Any]]]:
        """The oldest ``limit`` pending records as ``(seq, record)`` pairs, in the order added."""
        rows = self.query(
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
        with self.tx() as db:
            before = db.total_changes
            db.executemany(
                "UPDATE spool SET state = ?, done_at = ?, reason = ? WHERE seq = ? AND state = ?",
                [(state, now, reason, int(seq), PENDING) for seq, reason in reasons.items()],
            )
            return db.total_changes - before

    def rejected(self, limit: int = 100) -> list[tuple[int, str, str]]:
        """The oldest ``limit`` rejected records as ``(seq, record_id, reason)``."""
        rows = self.query(
            "SELECT seq, record_id, reason FROM spool WHERE state = ? ORDER BY seq LIMIT ?",
            (REJECTED, limit),
        )
        return [(int(s), str(i), str(r)) for s, i, r in rows]

    def requeue_rejected(self) -> int:
        """Make every rejected record pending again (after the collector was fixed or upgraded)."""
        with self.tx() as db:
            return db.execute(
                "UPDATE spool SET state = ?, done_at = NULL, reason = '' WHERE state = ?",
                (PENDING, REJECTED),
            ).rowcount

    def purge_sent(self, older_than_s: float = 0.0) -> int:
        """Delete records the collector committed more than ``older_than_s`` seconds ago."""
        with self.tx() as db:
            return db.execute(
                "DELETE FROM spool WHERE state = ? AND done_at <= ?",
                (SENT, time.time() - older_than_s),
            ).rowcount

    def counts(self) -> dict[str, int]:
        """How many records are ``pending``, ``sent`` and ``rejected``."""
        out = dict.fromkeys((PENDING, SENT, REJECTED), 0)
        for state, n in self.query("SELECT state, COUNT(*) FROM spool GROUP BY state"):
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
        heartbeat: returns the site's state (:meth:`~shiftguard.edge.service.Service.heartbeat`),
            POSTed to ``/v1/heartbeats`` every ``heartbeat_s`` seconds; None: no heartbeats.
            A heartbeat that fails is not kept: the next one says the same, newer.
        heartbeat_s: the interval.

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
        heartbeat: Callable[[], Mapping[str, Any]] | None = None,
        heartbeat_s: float = 60.0,
    ) -> None:
        if not token:
            raise ValueError("Shipper: the collector's token is empty; pass the site's token")
        self._tls = url_context(url, tls_ca, tls_cert, tls_key, "collector URL")
        if batch_size < 1:
            raise ValueError(f"Shipper: batch_size must be at least 1, got {batch_size}")
        self.spool = spool
        self.endpoint = url.rstrip("/") + RECORDS_ROUTE
        self.heartbeat_endpoint = url.rstrip("/") + HEARTBEATS_ROUTE
        self.heartbeat, self.heartbeat_s = heartbeat, heartbeat_s
        self._next_beat = 0.0
        #: the ``sent_at`` of the last heartbeat the collector accepted
        self.last_heartbeat: str | None = None
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
            self._beat()
            try:
                batch = self.spool.pending(self.batch_size)
                if not batch:
                    wait = self.poll_s
                    if self.heartbeat is not None:
                        wait = min(wait, max(self._next_beat - time.monotonic(), 0.0))
                    self._wake.wait(wait)
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

    def _beat(self) -> None:
        """Send a heartbeat when one is due; a failure is logged and waits for the next."""
        if self.heartbeat is None or time.monotonic() < self._next_beat:
            return
        self._next_beat = time.monotonic() + self.heartbeat_s
        try:
            payload = dict(self.heartbeat())
            status, answer = self._post(self.heartbeat_endpoint, payload)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            log.warning("shipper: heartbeat to %s failed: %s", self.heartbeat_endpoint,
                        getattr(exc, "reason", exc))  # fmt: skip
            return
        except Exception:  # the service's state could not be read: say so, keep shipping
            log.exception("shipper: the heartbeat could not be made")
            return
        if 200 <= status < 300:
            self.last_heartbeat = str(payload.get("sent_at"))
        else:
            log.warning("shipper: heartbeat answered %s: %s", status, answer.get("error", answer))

    def _ship(self, batch: list[tuple[int, dict[str, Any]]]) -> bool:
        """Send one batch and record the outcome in the spool; True to back off and retry."""
        seqs = [seq for seq, _ in batch]
        try:
            status, answer = self._post(self.endpoint, {"records": [r for _, r in batch]})
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

    def _post(self, endpoint: str, payload: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        body = json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()
        request = urllib.request.Request(
            endpoint,
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
