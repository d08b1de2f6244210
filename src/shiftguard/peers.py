"""Real DICOM peers for the edge service's tests and benchmarks: a throwaway Orthanc PACS on
loopback, dcmtk's ``storescu`` as the sending modality, and copies of a study under new UIDs.

Orthanc (Debian package ``orthanc``, installed by ``scripts/setup.sh``) runs from a temporary JSON
configuration: its own storage and index folders, free ports, HTTP restricted to local clients.
Orthanc 1.10 has no option to bind its DICOM port to one address; the tests only ever connect to
127.0.0.1.

:func:`find_tool` finds a peer's program where Debian installs it, not only on ``$PATH``: Debian puts
``Orthanc`` in ``/usr/sbin``, which a normal user's ``$PATH`` lacks, and PostgreSQL's server programs
in ``/usr/lib/postgresql/<version>/bin``, which no ``$PATH`` has.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shiftguard.errors import PeerMissingError

#: the Debian package that installs each peer program (what a missing one's message names)
PACKAGES = {
    "Orthanc": "orthanc",
    "storescu": "dcmtk",
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
    """

    def __init__(
        self,
        root: Path,
        ae_title: str = "ORTHANC",
        modalities: Mapping[str, tuple[str, int]] | None = None,
    ) -> None:
        self.root = Path(root)
        self.ae_title = ae_title
        self.modalities = dict(modalities or {})
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
            "Plugins": [],
        }
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

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None

    def get(self, route: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{route}", timeout=10) as r:
            return json.loads(r.read())

    def studies(self) -> dict[str, int]:
        """Instances stored per StudyInstanceUID."""
        counts: dict[str, int] = {}
        for instance in self.get("/instances"):
            uid = self.get(f"/instances/{instance}/simplified-tags")["StudyInstanceUID"]
            counts[uid] = counts.get(uid, 0) + 1
        return counts


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
