"""Real peers for the tests and benchmarks: a throwaway Orthanc PACS on loopback, dcmtk's
``storescu`` as the sending modality, copies of a study under new UIDs, and a throwaway PostgreSQL
cluster (:class:`PostgresServer`: the collector's store, the tracking server's backend).

Orthanc (Debian package ``orthanc``, installed by ``scripts/setup.sh``) runs from a temporary JSON
configuration: its own storage and index folders, free ports, HTTP restricted to local clients.
Orthanc 1.10 has no option to bind its DICOM port to one address; the tests only ever connect to
127.0.0.1.

:func:`find_tool` finds a peer's program where Debian installs it, not only on ``$PATH``: Debian puts
``Orthanc`` in ``/usr/sbin``, which a normal user's ``$PATH`` lacks, and PostgreSQL's server programs
in ``/usr/lib/postgresql/<version>/bin``, which no ``$PATH`` has.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shiftguard.errors import PeerMissingError

log = logging.getLogger(__name__)

#: the Debian package that installs each peer program (what a missing one's message names)
PACKAGES = {
    "Orthanc": "orthanc",
    "storescu": "dcmtk",
    "storescp": "dcmtk",
    "findscu": "dcmtk",
    "movescu": "dcmtk",
    "dcmqrscp": "dcmtk",
    "echoscu": "dcmtk",
    "dciodvfy": "dicom3tools",
    "dcm2niix": "dcm2niix",
    "openssl": "openssl",
    "initdb": "postgresql",
    "postgres": "postgresql",
    "pg_ctl": "postgresql",
    "prometheus": "prometheus",
    "promtool": "prometheus",
}
#: folders searched after ``$PATH``: the system programs' folders a normal user's ``$PATH`` lacks
SYSTEM_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")
#: PostgreSQL's server programs, newest version first
POSTGRES_DIRS = "/usr/lib/postgresql/*/bin"


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(p) for p in path.parent.name.split(".") if p.isdigit())


def _python_scripts() -> set[Path]:
    """The folders Python packages install their programs in (this environment's)."""
    folders = {Path(sys.executable).parent, Path(sys.prefix) / "bin"}
    scripts = sysconfig.get_path("scripts")
    if scripts:
        folders.add(Path(scripts))
    return {f.resolve() for f in folders}


def _is_python_program(path: Path) -> bool:
    """Whether ``path`` is a script run by Python (a console script a package installed)."""
    try:
        with path.open("rb") as fh:
            first = fh.readline(256)
    except OSError:
        return False
    return first.startswith(b"#!") and b"python" in first


def find_tool(name: str) -> str | None:
    """The path of the program ``name``: on ``$PATH``, else in :data:`SYSTEM_DIRS`, else (for
    PostgreSQL's programs) in the newest ``/usr/lib/postgresql/<version>/bin``; ``None`` when it is
    nowhere.

    A peer in :data:`PACKAGES` is never taken from the Python environment's own program folder,
    nor is it ever a Python program: pynetdicom installs its own ``storescu``, ``findscu``,
    ``echoscu``... in every environment it is installed in (with other exit statuses than dcmtk's),
    and an activated environment, this one or another, puts them before dcmtk's on ``$PATH``.

    >>> find_tool("no-such-program-here") is None
    True
    """
    skip = _python_scripts() if name in PACKAGES else set()
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        if not entry or Path(entry).resolve() in skip:
            continue
        found = shutil.which(name, path=entry)
        if found and not (name in PACKAGES and _is_python_program(Path(found))):
            return found
    folders = [Path(d) for d in SYSTEM_DIRS]
    folders += sorted(Path("/").glob(POSTGRES_DIRS.lstrip("/")), key=_version_key, reverse=True)
    for folder in folders:
        candidate = folder / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def tool(name: str) -> str:
    """:func:`find_tool`, or :class:`PeerMissingError` naming the package to install."""
    found = find_tool(name)
    if found is None:
        package = PACKAGES.get(name, name)
        raise PeerMissingError(
            f"{name}: not installed (looked on $PATH and in {', '.join(SYSTEM_DIRS)}); install "
            f"the Debian package {package} (scripts/setup.sh does)"
        )
    return found


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Orthanc:
    """An Orthanc server in ``root`` (AE ``ORTHANC``); ``start``/``stop`` keep its ports and data.

    ``modalities`` maps the AE titles Orthanc knows to their ``(host, port)``: Orthanc answers
    C-FIND, C-GET and C-MOVE only from those AEs, and sends C-MOVE results only to them.
    ``dicomweb``: load the DICOMweb plugin (Debian ``orthanc-dicomweb``), whose root is
    :attr:`dicomweb_url` (STOW-RS, QIDO-RS, WADO-RS). ``lua``: a Lua script Orthanc runs (e.g. an
    ``IncomingHttpRequestFilter`` that checks a bearer token). (Debian's Orthanc 1.10.1 crashes on
    the first request when serving HTTPS, so TLS is put in front of it rather than turned on.)
    """

    def __init__(
        self,
        root: Path,
        ae_title: str = "ORTHANC",
        modalities: Mapping[str, tuple[str, int]] | None = None,
        dicomweb: bool = False,
        lua: str | None = None,
    ) -> None:
        self.root = Path(root)
        self.ae_title = ae_title
        self.modalities = dict(modalities or {})
        self.plugins = [dicomweb_plugin()] if dicomweb else []
        self.lua = lua
        self.http = free_port()
        self.dicom = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "shiftguard-peer",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "HttpPort": self.http,
            "DicomPort": self.dicom,
            "DicomAet": self.ae_title,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {
                aet: [aet, host, port] for aet, (host, port) in self.modalities.items()
            },
            "Plugins": self.plugins,
            "DicomWeb": {"Enable": bool(self.plugins), "Root": "/dicom-web/"},
        }
        if self.lua is not None:
            script = self.root / "filter.lua"
            script.write_text(self.lua)
            config["LuaScripts"] = [str(script)]
        path = self.root / "orthanc.json"
        path.write_text(json.dumps(config))
        log = (self.root / "orthanc.log").open("ab")
        self.proc = subprocess.Popen(
            [tool("Orthanc"), str(path)],
            stdout=log,
            stderr=log,
            env={**os.environ, "TCP_NODELAY": "1"},  # dcmtk (inside Orthanc) reads it too
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.get("/system")
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"Orthanc did not start: {(self.root / 'orthanc.log').read_text()[-2000:]}"
        )

    @property
    def url(self) -> str:
        """The REST API's root."""
        return f"http://127.0.0.1:{self.http}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb plugin's root (with ``dicomweb=True``)."""
        return f"{self.url}/dicom-web"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None

    def get(self, route: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{route}", timeout=10) as r:
            return json.loads(r.read())

    def studies(self) -> dict[str, int]:
        """Instances stored per StudyInstanceUID."""
        counts: dict[str, int] = {}
        for instance in self.get("/instances"):
            uid = self.get(f"/instances/{instance}/simplified-tags")["StudyInstanceUID"]
            counts[uid] = counts.get(uid, 0) + 1
        return counts


#: where Debian's orthanc-dicomweb puts the plugin
DICOMWEB_PLUGINS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
                    "/usr/lib/orthanc/plugins/libOrthancDicomWeb.so")  # fmt: skip


def dicomweb_plugin() -> str:
    """The Orthanc DICOMweb plugin's file, or :class:`PeerMissingError` naming its package."""
    for candidate in DICOMWEB_PLUGINS:
        if Path(candidate).is_file():
            return candidate
    raise PeerMissingError(
        f"Orthanc's DICOMweb plugin: not installed (looked for {', '.join(DICOMWEB_PLUGINS)}); "
        "install the Debian package orthanc-dicomweb (scripts/setup.sh does)"
    )


def storescu(
    port: int,
    files: list[str] | list[Path],
    called: str = "SHIFTGUARD",
    calling: str = "MODALITY",
    host: str = "127.0.0.1",
) -> subprocess.CompletedProcess[str]:
    """Send ``files`` to ``host:port`` over one association with dcmtk's ``storescu`` (with
    ``TCP_NODELAY``, as a modality tuned for throughput would)."""
    return subprocess.run(
        [
            tool("storescu"),
            "-aet",
            calling,
            "-aec",
            called,
            host,
            str(port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TCP_NODELAY": "1"},
    )


def copy_study(study: Path, dest: Path, n: int) -> list[Path]:
    """``n`` copies of the study folder ``study`` as distinct studies under ``dest`` (new study,
    series and instance UIDs; pixels untouched)."""
    import pydicom
    from pydicom.uid import generate_uid

    files = sorted(Path(study).rglob("*.dcm"))
    out = []
    for i in range(n):
        folder = Path(dest) / f"study{i:03d}"
        folder.mkdir(parents=True)
        study_uid, series_uid = generate_uid(), generate_uid()
        for j, path in enumerate(files):
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(folder / f"{j:04d}.dcm")
        out.append(folder)
    return out


# PostgreSQL ----------------------------------------------------------------------------------------

PG_SUPERUSER = "shiftguard"
#: who runs PostgreSQL when we are root (it refuses to run as root): Debian's account, else nobody
UNPRIVILEGED_ACCOUNTS = ("postgres", "nobody")
#: a throwaway cluster: durability off makes start-up and schema migrations quick
PG_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")
PG_START_ATTEMPTS = 3  # a port picked free can be taken before the server binds it
PG_START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` of a peer's log file (what an error about it quotes)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def port_taken(logfile: Path) -> bool:
    """Whether a server's log says its port was taken (then it is started again on another)."""
    return "address already in use" in log_tail(logfile, 200).lower()


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


def _unprivileged_account() -> pwd.struct_passwd | None:
    for name in UNPRIVILEGED_ACCOUNTS:
        with contextlib.suppress(KeyError):
            account = pwd.getpwnam(name)
            if account.pw_uid != 0:
                return account
    return None


class PostgresServer:
    """A fresh PostgreSQL cluster on 127.0.0.1, superuser :data:`PG_SUPERUSER` with trust
    authentication, its data in a temporary folder removed by :meth:`stop`.

    Raises (from :meth:`start`):
        PeerMissingError: the server programs are not installed, or, running as root, no
            unprivileged account exists to run them.
        RuntimeError: installed but it does not start (with its log).
    """

    def __init__(self) -> None:
        self.host, self.user = "127.0.0.1", PG_SUPERUSER
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._base: Path | None = None

    def url(self, database: str = "postgres") -> str:
        """A libpq URL of ``database`` (what psycopg and the collector's store take)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def _ready(self) -> bool:
        import psycopg

        try:
            psycopg.connect(self.url(), connect_timeout=2).close()
        except psycopg.OperationalError:
            return False
        return True

    def create_database(self, name: str) -> str:
        """Create database ``name``; its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def start(self) -> None:
        initdb, postgres = find_tool("initdb"), find_tool("postgres")
        if initdb is None or postgres is None:
            raise PeerMissingError(
                "PostgreSQL server programs (initdb, postgres) not found: install the Debian "
                "package postgresql (scripts/setup.sh does)"
            )
        # a short path: the Unix socket's name must fit in 107 bytes, and the folder must be
        # traversable by the account postgres runs as (pytest's tmp_path is private to root)
        base = self._base = Path(tempfile.mkdtemp(prefix="shiftguard-pg-"))
        (base / "sockets").mkdir()
        as_user: dict[str, Any] = {}
        if os.geteuid() == 0:
            account = _unprivileged_account()
            if account is None:
                self.stop()
                raise PeerMissingError(
                    f"running as root and none of {UNPRIVILEGED_ACCOUNTS} exists to run PostgreSQL"
                )
            for path in (base, base / "sockets"):
                os.chown(path, account.pw_uid, account.pw_gid)
            base.chmod(0o755)
            as_user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        data = base / "data"
        run: dict[str, Any] = {"cwd": base, "stdin": subprocess.DEVNULL, **as_user}
        init = subprocess.run(
            [initdb, "-D", data, "-U", self.user, "--auth=trust", "--encoding=UTF8",
             "--no-locale", "--no-sync"],
            capture_output=True, text=True, timeout=60, check=False, **run,
        )  # fmt: skip
        if init.returncode != 0:
            self.stop()
            raise RuntimeError(f"initdb failed ({init.returncode}):\n{init.stdout}\n{init.stderr}")
        for attempt in range(1, PG_START_ATTEMPTS + 1):
            self.port = free_port()
            logfile = base / f"postgres-{attempt}.log"
            with logfile.open("wb") as out:
                self._proc = subprocess.Popen(
                    [postgres, "-D", data, "-h", self.host, "-p", str(self.port), "-k",
                     base / "sockets", *(a for opt in PG_SETTINGS for a in ("-c", opt))],
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **run,
                )  # fmt: skip
            deadline = time.monotonic() + PG_START_TIMEOUT_S
            while self._proc.poll() is None and time.monotonic() < deadline:
                if self._ready():
                    return
                time.sleep(0.2)
            stop_process_tree(self._proc, signal.SIGINT)
            self._proc = None
            if not port_taken(logfile):
                break
        tail = log_tail(logfile)
        self.stop()
        raise RuntimeError(f"PostgreSQL did not accept connections on port {self.port}:\n{tail}")

    def stop(self) -> None:
        """Stop the server (SIGINT: PostgreSQL's fast shutdown) and remove its data."""
        if self._proc is not None:
            stop_process_tree(self._proc, signal.SIGINT)
            self._proc = None
        if self._base is not None:
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
