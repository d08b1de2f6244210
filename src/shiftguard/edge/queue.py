"""The edge service's durable work queue: SQLite in WAL mode, one file beside the received studies.

Everything the service has accepted is in here before the sender hears "success", and every state
change is one transaction, so a service killed at any point (SIGKILL, power) resumes where it was:

* ``instances``: every received SOP instance (its file, study, series, the calling AE title);
* ``studies``: ``receiving`` -> ``ready`` (association released, or no new instance for the
  stability time) -> ``processing`` -> ``done`` (or ``failed`` with the reason); a study being
  processed when the service died goes back to ``ready`` on restart, and an instance arriving for a
  finished study reopens it. A new instance for a ``done`` study, or for one being processed, starts
  its next ``revision`` (a resend of instances it already has changes nothing): the results were
  computed without that instance, so the study is processed again (a study being processed goes
  back to ``receiving``, or ``ready`` if the new instances' association was released meanwhile,
  when its processing finishes) and its next results are new objects (new instance UIDs in the same
  result series), not a resend of the old ones that a PACS would take for a duplicate and drop;
* ``deliveries``: one row per (destination, result object), ``pending`` until the destination
  acknowledged it (C-STORE success, STOW-RS stored, HL7 accept acknowledgement, FHIR 2xx),
  retried with backoff; unique per destination and object key (a SOP instance UID, or an EHR
  message's key), so a result is queued once however often its study is processed (results have
  deterministic UIDs); a study's pending deliveries that its latest processing did not produce
  again (an earlier revision's) are ``superseded``; ``urgent`` ones go first;
* ``results``: the shadow log, one row per (study, series, bundle): probability, decision, role
  (champion or challenger) and the segments the evaluation slices by (sex, age, site, institution,
  scanner vendor and model), for later comparison with the radiologist's verified diagnosis
  (``shiftguard shadow evaluate``). A queue written by an older release gains the segment columns,
  empty for its earlier rows, when it is opened.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shiftguard.store import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_uid);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    ready_at REAL,
    done_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    revision INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS studies_state ON studies (state);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY,
    study_uid TEXT NOT NULL,
    destination TEXT NOT NULL,
    sop_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    queued_at REAL NOT NULL,
    sent_at REAL,
    urgent INTEGER NOT NULL DEFAULT 0,
    UNIQUE (destination, sop_uid)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (destination, state, next_try);
CREATE TABLE IF NOT EXISTS results (
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    bundle TEXT NOT NULL,
    role TEXT NOT NULL,
    probability REAL NOT NULL,
    threshold REAL NOT NULL,
    result TEXT NOT NULL,
    routed TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (study_uid, series_uid, bundle)
);
"""
#: the shadow log's columns added after the first release (see ``_migrate``): the segments, and
#: the network's probability before the bundle's calibration map (a site recalibration fits on it)
SEGMENT_COLUMNS = {
    "model": "TEXT NOT NULL DEFAULT ''",
    "model_version": "TEXT NOT NULL DEFAULT ''",
    "site": "TEXT NOT NULL DEFAULT ''",
    "institution": "TEXT NOT NULL DEFAULT ''",
    "manufacturer": "TEXT NOT NULL DEFAULT ''",
    "scanner_model": "TEXT NOT NULL DEFAULT ''",
    "sex": "TEXT NOT NULL DEFAULT ''",
    "age_band": "TEXT NOT NULL DEFAULT ''",
    "patient_age": "REAL",
    "raw_probability": "REAL",
}
RESULT_FIELDS = (
    "study_uid", "series_uid", "bundle", "role", "probability", "threshold", "result", "routed",
    "created_at", *SEGMENT_COLUMNS,
)  # fmt: skip

RECEIVING, READY, PROCESSING, DONE, FAILED = "receiving", "ready", "processing", "done", "failed"
PENDING, SENT, GAVE_UP, SUPERSEDED = "pending", "sent", "gave_up", "superseded"


@dataclass(frozen=True)
class Delivery:
    """A result object waiting for (or done with) one destination."""

    id: int
    study_uid: str
    destination: str
    sop_uid: str
    path: str
    attempts: int
    urgent: bool = False


INSERT_RESULT = (
    f"INSERT OR REPLACE INTO results ({', '.join(RESULT_FIELDS)}) "
    f"VALUES ({', '.join(':' + f for f in RESULT_FIELDS)})"
)


def _result_row(row: dict[str, Any], now: float) -> dict[str, Any]:
    """A shadow-log row with every column (segments the caller did not give are empty)."""
    return {
        **dict.fromkeys(SEGMENT_COLUMNS, ""),
        "patient_age": None,
        "raw_probability": None,
        **row,
        "created_at": now,
    }


class WorkQueue(Database):
    """The queue (see the module docstring). Safe to share between the receiving and worker threads
    of one process: every call takes a lock and runs in its own transaction."""

    def __init__(self, path: Path | str) -> None:
        super().__init__(path, SCHEMA, rows=True)  # a released association survives power loss

    def _migrate(self) -> None:
        have = {r["name"] for r in self._db.execute("PRAGMA table_info(results)")}
        for name, kind in SEGMENT_COLUMNS.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE results ADD COLUMN {name} {kind}")
        if "revision" not in {r["name"] for r in self._db.execute("PRAGMA table_info(studies)")}:
            self._db.execute("ALTER TABLE studies ADD COLUMN revision INTEGER NOT NULL DEFAULT 0")
        if "urgent" not in {r["name"] for r in self._db.execute("PRAGMA table_info(deliveries)")}:
            self._db.execute("ALTER TABLE deliveries ADD COLUMN urgent INTEGER NOT NULL DEFAULT 0")

    @contextmanager
    def _synchronous(self, sync: bool) -> Iterator[None]:
        if sync:
            yield
            return
        self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            yield
        finally:
            self._db.execute("PRAGMA synchronous=FULL")

    # ---------------------------------------------------------------------------------------------
    # receiving
    # ---------------------------------------------------------------------------------------------

    def record_instance(
        self,
        sop_uid: str,
        study_uid: str,
        series_uid: str,
        path: str,
        calling_ae: str,
        now: float | None = None,
        sync: bool = True,
    ) -> bool:
        """Record a received instance (its file already on disk). Returns False for a duplicate
        SOP instance UID (the file is replaced, the queue unchanged). Reopens a finished study (a
        ``done`` one as its next revision).

        ``sync=False`` commits without waiting for the disk (WAL, ``synchronous=NORMAL``): the record
        survives the process being killed, and the next synchronous commit (for example
        :meth:`mark_ready`) makes it survive power loss too."""
        now = time.time() if now is None else now
        row = (sop_uid, study_uid, series_uid, path, calling_ae, now)
        return self.record_instances([row], sync=sync)[0]

    def record_instances(
        self, rows: Sequence[tuple[str, str, str, str, str, float]], sync: bool = True
    ) -> list[bool]:
        """:meth:`record_instance` for many (sop, study, series, path, calling AE, time) rows in
        one transaction; True for each new instance."""
        out = []
        with self._lock, self._synchronous(sync), self.tx() as db:
            for sop_uid, study_uid, series_uid, path, calling_ae, now in rows:
                new = (
                    db.execute(
                        "INSERT OR IGNORE INTO instances VALUES (?, ?, ?, ?, ?, ?)",
                        (sop_uid, study_uid, series_uid, path, calling_ae, now),
                    ).rowcount
                    == 1
                )
                state = db.execute(
                    "SELECT state FROM studies WHERE study_uid = ?", (study_uid,)
                ).fetchone()
                if state is None:
                    db.execute(
                        "INSERT INTO studies (study_uid, state, calling_ae, first_received, "
                        "last_received) VALUES (?, ?, ?, ?, ?)",
                        (study_uid, RECEIVING, calling_ae, now, now),
                    )
                elif new:
                    reopened = RECEIVING if state["state"] in (DONE, FAILED, READY) else None
                    revised = int(state["state"] in (DONE, PROCESSING))  # results lack it
                    db.execute(
                        "UPDATE studies SET state = ?, last_received = ?, "
                        "revision = revision + ? WHERE study_uid = ?",
                        (reopened or state["state"], now, revised, study_uid),
                    )
                out.append(new)
        return out

    def instance_paths(self) -> set[str]:
        """The files of every recorded instance (to find files a crash left unrecorded)."""
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT path FROM instances").fetchall()}

    def mark_ready(self, study_uids: Iterable[str], now: float | None = None) -> int:
        """Studies whose association was released: ready to process. Returns how many changed.
        A study being processed keeps its state and notes the release (see :meth:`finish_study`)."""
        now = time.time() if now is None else now
        changed = 0
        with self.tx() as db:
            for uid in set(study_uids):
                changed += db.execute(
                    "UPDATE studies SET state = ?, ready_at = ? WHERE study_uid = ? AND state = ?",
                    (READY, now, uid, RECEIVING),
                ).rowcount
                db.execute(
                    "UPDATE studies SET ready_at = ? WHERE study_uid = ? AND state = ?",
                    (now, uid, PROCESSING),
                )
        return changed

    def mark_stable(self, stability_s: float, now: float | None = None) -> list[str]:
        """The fallback: studies with no new instance for ``stability_s`` become ready."""
        now = time.time() if now is None else now
        with self.tx() as db:
            rows = db.execute(
                "SELECT study_uid FROM studies WHERE state = ? AND last_received <= ?",
                (RECEIVING, now - stability_s),
            ).fetchall()
            uids = [r["study_uid"] for r in rows]
            db.executemany(
                "UPDATE studies SET state = ?, ready_at = ? WHERE study_uid = ?",
                [(READY, now, u) for u in uids],
            )
        return uids

    # ---------------------------------------------------------------------------------------------
    # processing
    # ---------------------------------------------------------------------------------------------

    def recover(self) -> int:
        """After a restart: studies left ``processing`` go back to ``ready``. Returns how many."""
        with self.tx() as db:
            return db.execute(
                "UPDATE studies SET state = ? WHERE state = ?", (READY, PROCESSING)
            ).rowcount

    def claim_study(self) -> str | None:
        """Atomically take the oldest ready study for processing."""
        with self.tx() as db:
            row = db.execute(
                "SELECT study_uid FROM studies WHERE state = ? ORDER BY ready_at, study_uid LIMIT 1",
                (READY,),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE studies SET state = ?, attempts = attempts + 1 WHERE study_uid = ?",
                (PROCESSING, row["study_uid"]),
            )
            return str(row["study_uid"])

    def study_revision(self, study_uid: str) -> int:
        """How many times new instances reopened the study after it was done (0 for none, or for
        a study the queue does not know): its results' revision."""
        with self._lock:
            row = self._db.execute(
                "SELECT revision FROM studies WHERE study_uid = ?", (study_uid,)
            ).fetchone()
        return 0 if row is None else int(row["revision"])

    def study_files(self, study_uid: str) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT path FROM instances WHERE study_uid = ? ORDER BY path", (study_uid,)
            ).fetchall()
        return [r["path"] for r in rows]

    def finish_study(
        self,
        study_uid: str,
        deliveries: Sequence[tuple[str, str, str] | tuple[str, str, str, bool]] = (),
        results: Sequence[dict[str, Any]] = (),
        now: float | None = None,
        note: str = "",
        revision: int | None = None,
    ) -> None:
        """Processing done: queue ``(destination, key, path[, urgent])`` deliveries (once each, ever) and
        log ``results`` rows, in the same transaction that marks the study done. The study's
        pending deliveries not among ``deliveries`` (an earlier revision's, not sent yet) are
        superseded. ``note`` records why parts of the study were skipped (kept in the ``error``
        column). ``revision``: the study's revision when its processing began; if new instances
        came meanwhile, the study is not done but waits to be processed again: ``ready`` if their
        association was released, else ``receiving``."""
        now = time.time() if now is None else now
        with self.tx() as db:
            db.executemany(
                "INSERT OR IGNORE INTO deliveries (study_uid, destination, sop_uid, path, state, "
                "next_try, queued_at, urgent) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(study_uid, *d[:3], PENDING, now, now, int(any(d[3:]))) for d in deliveries],
            )
            keep = {(d[0], d[1]) for d in deliveries}
            stale = [
                (SUPERSEDED, r["id"])
                for r in db.execute(
                    "SELECT id, destination, sop_uid FROM deliveries "
                    "WHERE study_uid = ? AND state = ?",
                    (study_uid, PENDING),
                )
                if (r["destination"], r["sop_uid"]) not in keep
            ]
            db.executemany("UPDATE deliveries SET state = ? WHERE id = ?", stale)
            db.executemany(INSERT_RESULT, [_result_row(r, now) for r in results])
            row = db.execute(
                "SELECT revision, ready_at >= last_received AS released FROM studies "
                "WHERE study_uid = ?",
                (study_uid,),
            ).fetchone()
            state = DONE
            if revision is not None and row is not None and row["revision"] != revision:
                state = READY if row["released"] else RECEIVING
            db.execute(
                "UPDATE studies SET state = ?, done_at = ?, error = ? "
                "WHERE study_uid = ? AND state = ?",
                (state, now, note[:2000], study_uid, PROCESSING),
            )

    def log_results(self, results: Sequence[dict[str, Any]], now: float | None = None) -> None:
        """Add rows to the shadow log (a challenger's, after its study was finished)."""
        now = time.time() if now is None else now
        with self.tx() as db:
            db.executemany(INSERT_RESULT, [_result_row(r, now) for r in results])

    def fail_study(self, study_uid: str, error: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self.tx() as db:
            db.execute(
                "UPDATE studies SET state = ?, done_at = ?, error = ? WHERE study_uid = ?",
                (FAILED, now, error[:2000], study_uid),
            )

    # ---------------------------------------------------------------------------------------------
    # delivery
    # ---------------------------------------------------------------------------------------------

    def due(self, destination: str, now: float | None = None, limit: int = 64) -> list[Delivery]:
        """Pending deliveries to ``destination`` whose next try has come, urgent ones first."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT id, study_uid, destination, sop_uid, path, attempts, urgent FROM "
                "deliveries WHERE destination = ? AND state = ? AND next_try <= ? "
                "ORDER BY urgent DESC, id LIMIT ?",
                (destination, PENDING, now, limit),
            ).fetchall()
        return [Delivery(**{**dict(r), "urgent": bool(r["urgent"])}) for r in rows]

    def delivered(self, delivery_id: int, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self.tx() as db:
            db.execute(
                "UPDATE deliveries SET state = ?, sent_at = ?, attempts = attempts + 1 WHERE id = ?",
                (SENT, now, delivery_id),
            )

    def retry_later(
        self,
        delivery_id: int,
        error: str,
        delay_s: float,
        give_up: bool = False,
        now: float | None = None,
    ) -> None:
        """A failed attempt: try again after ``delay_s`` (or give up, keeping the reason)."""
        now = time.time() if now is None else now
        with self.tx() as db:
            db.execute(
                "UPDATE deliveries SET state = ?, attempts = attempts + 1, next_try = ?, "
                "last_error = ? WHERE id = ?",
                (GAVE_UP if give_up else PENDING, now + delay_s, error[:2000], delivery_id),
            )

    # ---------------------------------------------------------------------------------------------
    # reading
    # ---------------------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Studies by state and deliveries by state, for ``/metrics``."""
        with self._lock:
            out = {
                f"studies_{r[0]}": int(r[1])
                for r in self._db.execute("SELECT state, COUNT(*) FROM studies GROUP BY state")
            }
            out.update(
                {
                    f"deliveries_{r[0]}": int(r[1])
                    for r in self._db.execute(
                        "SELECT state, COUNT(*) FROM deliveries GROUP BY state"
                    )
                }
            )
            out["instances"] = int(self._db.execute("SELECT COUNT(*) FROM instances").fetchone()[0])
        return out

    def studies_by(self, model_version: str, role: str = "champion") -> int:
        """Studies with results of the bundle version ``model_version`` in ``role``."""
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(DISTINCT study_uid) FROM results WHERE model_version = ? AND role = ?",
                (model_version, role),
            ).fetchone()
        return int(row[0])

    def study_note(self, study_uid: str) -> str:
        """Why a study failed, or which of its series were skipped and why."""
        with self._lock:
            row = self._db.execute(
                "SELECT error FROM studies WHERE study_uid = ?", (study_uid,)
            ).fetchone()
        return "" if row is None else str(row["error"])

    def study_state(self, study_uid: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT state FROM studies WHERE study_uid = ?", (study_uid,)
            ).fetchone()
        return None if row is None else str(row["state"])

    def shadow_log(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM results ORDER BY created_at, study_uid"
            ).fetchall()
        return [dict(r) for r in rows]
