"""Fixtures for the team tracking set-up: a throwaway PostgreSQL server and an ``mlflow server`` on it.

Both listen on 127.0.0.1 only, on ports picked free at start, with their data in temporary folders,
and both are stopped in teardown whatever the test did: a polite signal first, then, after a bounded
wait, SIGKILL to whatever is left of the process tree, so no process outlives the fixture.

PostgreSQL refuses to run as root; when the tests run as root, ``initdb`` and ``postgres`` run as an
unprivileged account (``postgres``, which Debian's package creates, else ``nobody``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from peers_plugin import peer_missing

from shiftguard.errors import PeerMissingError
from shiftguard.peers import (
    PostgresServer,
    free_port,
    log_tail,
    port_taken,
    stop_process_tree,
)

log = logging.getLogger(__name__)

PG_DATABASE = "mlflow"
START_ATTEMPTS = 3  # a port picked free can be taken before the server binds it
# MLflow's schema migrations run before the server starts (minutes on a loaded 2-core host); the
# server itself then only has to import and bind.
MLFLOW_MIGRATE_TIMEOUT_S = 600.0
MLFLOW_START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Postgres:
    """A running PostgreSQL server: connect as ``user`` (trust auth) on ``host``:``port``."""

    host: str
    port: int
    user: str

    def uri(self, database: str) -> str:
        """SQLAlchemy URI naming the driver: SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3."""
        return f"postgresql+psycopg2://{self.user}@{self.host}:{self.port}/{database}"

    def connect(self, database: str = "postgres", **kwargs: Any) -> Any:
        import psycopg2

        return psycopg2.connect(
            host=self.host, port=self.port, user=self.user, dbname=database, **kwargs
        )


@dataclass(frozen=True)
class MlflowServer:
    """A running ``mlflow server``: its URL, backend store URI and artifact folder."""

    url: str
    backend_store_uri: str
    artifacts: Path
    postgres: Postgres


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A fresh PostgreSQL cluster on 127.0.0.1 (:class:`shiftguard.peers.PostgresServer`),
    superuser ``shiftguard`` with trust auth.

    Skips (fails where peers are required: ``peers_plugin``) when the server programs or psycopg2
    are not installed or, running as root, no unprivileged account exists to run them; fails with
    the server's log when it is installed but does not start.
    """
    if importlib.util.find_spec("psycopg2") is None:
        peer_missing("psycopg2 missing: pip install -e '.[dev]'")
    server = PostgresServer()
    try:
        server.start()
    except PeerMissingError as exc:
        peer_missing(str(exc))
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield Postgres(server.host, server.port, server.user)
    finally:
        server.stop()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _migrate_mlflow_schema(backend: str, env: dict[str, str], logfile: Path) -> None:
    """Create MLflow's tables and run its migrations, so the server's start-up only binds."""
    code = (
        "import sys, sqlalchemy\n"
        "from mlflow.store.db.utils import _initialize_tables\n"
        "engine = sqlalchemy.create_engine(sys.argv[1])\n"
        "_initialize_tables(engine)\n"
        "engine.dispose()\n"
    )
    with logfile.open("wb") as out:
        try:
            done = subprocess.run(
                [sys.executable, "-c", code, backend],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=MLFLOW_MIGRATE_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"MLflow's schema migration took over {MLFLOW_MIGRATE_TIMEOUT_S:g} s:\n"
                f"{log_tail(logfile)}"
            )
    if done.returncode != 0:
        pytest.fail(f"MLflow's schema migration failed ({done.returncode}):\n{log_tail(logfile)}")


@pytest.fixture(scope="module")
def mlflow_server(
    postgres: Postgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    """``mlflow server`` on a new PostgreSQL database, proxying artifacts to a local folder."""
    conn = postgres.connect(connect_timeout=5)
    try:
        conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {PG_DATABASE}")
    finally:
        conn.close()

    base = tmp_path_factory.mktemp("mlflow-server")
    artifacts = base / "artifacts"
    artifacts.mkdir()
    backend = postgres.uri(PG_DATABASE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # The background job runner (GenAI scorers; seven huey consumers) is not part of tracking.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    _migrate_mlflow_schema(backend, env, base / "mlflow-migrate.log")
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend]
    command += ["--artifacts-destination", artifacts.as_uri(), "--workers", "1"]
    for attempt in range(1, START_ATTEMPTS + 1):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        logfile = base / f"mlflow-{attempt}.log"
        with logfile.open("wb") as out:
            proc = subprocess.Popen(
                [*command, "--host", "127.0.0.1", "--port", str(port)],
                cwd=base,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + MLFLOW_START_TIMEOUT_S
            while proc.poll() is None and time.monotonic() < deadline:
                if _healthy(url):
                    yield MlflowServer(url, backend, artifacts, postgres)
                    return
                time.sleep(0.25)
        finally:
            stop_process_tree(proc, signal.SIGTERM)
        if not port_taken(logfile):
            break
    pytest.fail(f"mlflow server did not answer {url}/health:\n{log_tail(logfile)}")
