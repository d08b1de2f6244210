"""SQLite files shared by the threads of one process: the edge's work queue, the record spool, the
central record store and the monitor's window state each hold one :class:`Database`.

One connection per file in autocommit mode, WAL journal, ``synchronous=FULL`` (a commit is on disk
when it returns), guarded by one re-entrant lock; every write is one :func:`transaction`. Standard
library only: the edge runtime uses it.

>>> import tempfile, pathlib
>>> db = Database(pathlib.Path(tempfile.mkdtemp()) / "x.db", "CREATE TABLE t (v INTEGER);")
>>> with db.tx() as conn:
...     _ = conn.execute("INSERT INTO t VALUES (1)")
>>> db.query("SELECT v FROM t")
[(1,)]
>>> db.close()
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def transaction(db: sqlite3.Connection, lock: threading.RLock) -> Iterator[sqlite3.Connection]:
    """One write transaction on an autocommit connection shared by threads: taken under ``lock``,
    ``BEGIN IMMEDIATE`` (the write lock at once, so it cannot fail halfway on a busy database),
    committed at the end, rolled back on any exception."""
    with lock:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


class Database:
    """One SQLite file: its schema applied on opening (``CREATE ... IF NOT EXISTS``), then
    :meth:`_migrate` (a subclass adds the columns a later release introduced), under the lock.

    ``rows``: rows come back as :class:`sqlite3.Row` (by name) instead of tuples.
    """

    def __init__(self, path: Path | str, schema: str, *, rows: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            str(self.path), isolation_level=None, check_same_thread=False, timeout=30.0
        )
        if rows:
            self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        with self._lock:
            self._db.executescript(schema)  # runs in its own transaction
            self._migrate()

    def _migrate(self) -> None:
        """Bring a file written by an older release up to the schema (nothing by default)."""

    def tx(self) -> AbstractContextManager[sqlite3.Connection]:
        """One write transaction (:func:`transaction`)."""
        return transaction(self._db, self._lock)

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        """All rows of one read, under the lock."""
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def sync(self) -> None:
        """Put every committed record on disk (fsync of the write-ahead log)."""
        with self._lock:
            wal = self.path.with_name(self.path.name + "-wal")
            if wal.exists():
                fd = os.open(wal, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def close(self) -> None:
        with self._lock:
            self._db.close()
