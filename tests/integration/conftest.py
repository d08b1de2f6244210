"""Fixtures for the team tracking set-up: a throwaway PostgreSQL server and an ``mlflow server`` on it.

Both listen on 127.0.0.1 only, on ports picked free at start, with their data in temporary folders,
and both are stopped in teardown whatever the test did: a polite signal first, then, after a bounded
wait, SIGKILL to whatever is left of the process tree, so no process outlives the fixture.

PostgreSQL refuses to run as root; when the tests run as root, ``initdb`` and ``postgres`` run as an
unprivileged account (``postgres``, which Debian's package creates, else ``nobody``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from peers_plugin import peer_missing

log = logging.getLogger(__name__)

PG_SUPERUSER = "shiftguard"
PG_DATABASE = "mlflow"
UNPRIVILEGED_ACCOUNTS = ("postgres", "nobody")
START_ATTEMPTS = 3  # a port picked free can be taken before the server binds it
PG_START_TIMEOUT_S = 30.0
# MLflow's schema migrations run before the server starts (minutes on a loaded 2-core host); the
# server itself then only has to import and bind.
MLFLOW_MIGRATE_TIMEOUT_S = 600.0
MLFLOW_START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0
# A throwaway cluster: durability off makes start-up and MLflow's schema migrations quick.
PG_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")
PG_BIN_HINT = "install the `postgresql` Debian package (scripts/setup.sh does)"


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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))


def postgres_bindir() -> Path | None:
    """The folder holding ``initdb`` and ``postgres``: Debian's newest ``/usr/lib/postgresql/<ver>/bin``,
    else wherever ``$PATH`` finds them (other distributions, Homebrew)."""
    tools = ("initdb", "postgres")
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    found = shutil.which("initdb")
    if found:
        candidates.append(Path(found).resolve().parent)
    for bindir in candidates:
        if all(os.access(bindir / tool, os.X_OK) for tool in tools):
            return bindir
    return None


def _unprivileged_account() -> pwd.struct_passwd | None:
    for name in UNPRIVILEGED_ACCOUNTS:
        with contextlib.suppress(KeyError):
            account = pwd.getpwnam(name)
            if account.pw_uid != 0:
                return account
    return None


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def _port_taken(path: Path) -> bool:
    return "address already in use" in _log_tail(path, 200).lower()


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """``(parent pid, start time)`` of ``pid`` from ``/proc``, or None once it has gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[19]


def _descendants(pid: int) -> dict[int, str]:
    """Every live descendant of ``pid`` with its start time (which tells a reused pid apart)."""
    stats = {
        int(p.name): _proc_stat(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit()
    }
    found: dict[int, str] = {}
    parents = {pid}
    while parents:
        children = {c: st for c, st in stats.items() if st and st[0] in parents and c not in found}
        found.update({c: st[1] for c, st in children.items() if st})
        parents = set(children)
    return found


def stop_process_tree(proc: subprocess.Popen[bytes], first: signal.Signals) -> None:
    """Send ``first`` to ``proc``, wait a bounded time, then SIGKILL whatever is left of its tree.

    ``proc`` must have been started with ``start_new_session=True``: its process group is killed
    whole, and so is every descendant seen before the first signal (PostgreSQL's backends call
    ``setsid`` and so leave the group).
    """
    tree = _descendants(proc.pid) if Path("/proc").is_dir() else {}
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(first)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning(
                "pid %d ignored %s for %.0f s; killing it", proc.pid, first.name, STOP_TIMEOUT_S
            )
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid, started in tree.items():
        stat = _proc_stat(pid)
        if stat and stat[1] == started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=STOP_TIMEOUT_S)


def _start_postgres(
    bindir: Path, base: Path, as_user: dict[str, Any]
) -> tuple[subprocess.Popen[bytes], Postgres]:
    import psycopg2

    data, sockets = base / "data", base / "sockets"
    run = {"cwd": base, "stdin": subprocess.DEVNULL, **as_user}
    initdb = [bindir / "initdb", "-D", data, "-U", PG_SUPERUSER]
    initdb += ["--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync"]
    init = subprocess.run(
        initdb,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        **run,
    )
    if init.returncode != 0:
        pytest.fail(f"initdb failed ({init.returncode}):\n{init.stdout}\n{init.stderr}")

    for attempt in range(1, START_ATTEMPTS + 1):
        port = free_port()
        logfile = base / f"postgres-{attempt}.log"
        with logfile.open("wb") as out:
            proc = subprocess.Popen(
                [bindir / "postgres", "-D", data, "-h", "127.0.0.1", "-p", str(port), "-k", sockets]
                + [arg for opt in PG_SETTINGS for arg in ("-c", opt)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **run,
            )
        server = Postgres("127.0.0.1", port, PG_SUPERUSER)
        deadline = time.monotonic() + PG_START_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                server.connect(connect_timeout=2).close()
                return proc, server
            except psycopg2.OperationalError:
                time.sleep(0.2)
        stop_process_tree(proc, signal.SIGINT)
        if not _port_taken(logfile):
            break
    pytest.fail(f"PostgreSQL did not accept connections on port {port}:\n{_log_tail(logfile)}")


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A fresh PostgreSQL cluster on 127.0.0.1, superuser ``shiftguard`` with trust auth.

    Skips (fails where peers are required: ``peers_plugin``) when the server binaries or psycopg2
    are not installed or, running as root, no unprivileged account exists to run them; fails with
    the server's log when it is installed but does not start.
    """
    if importlib.util.find_spec("psycopg2") is None:
        peer_missing("psycopg2 missing: pip install -e '.[dev]'")
    bindir = postgres_bindir()
    if bindir is None:
        peer_missing(f"PostgreSQL server binaries (initdb, postgres) not found: {PG_BIN_HINT}")
    as_user: dict[str, Any] = {}
    # A short path: the Unix socket's full name must fit in 107 bytes. Not pytest's tmp_path, whose
    # parent folder is private to root and so not traversable by the account postgres runs as.
    base = Path(tempfile.mkdtemp(prefix="shiftguard-pg-"))
    try:
        (base / "sockets").mkdir()
        if os.geteuid() == 0:
            account = _unprivileged_account()
            if account is None:
                peer_missing(
                    f"running as root and none of {UNPRIVILEGED_ACCOUNTS} exists to run PostgreSQL"
                )
            for path in (base, base / "sockets"):
                os.chown(path, account.pw_uid, account.pw_gid)
            base.chmod(0o755)
            as_user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        proc, server = _start_postgres(bindir, base, as_user)
        try:
            yield server
        finally:
            stop_process_tree(proc, signal.SIGINT)  # SIGINT: PostgreSQL's fast shutdown
    finally:
        shutil.rmtree(base, ignore_errors=True)


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
                f"{_log_tail(logfile)}"
            )
    if done.returncode != 0:
        pytest.fail(f"MLflow's schema migration failed ({done.returncode}):\n{_log_tail(logfile)}")


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
        if not _port_taken(logfile):
            break
    pytest.fail(f"mlflow server did not answer {url}/health:\n{_log_tail(logfile)}")
