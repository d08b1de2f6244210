"""``edge serve`` end to end: dcmtk's storescu sends a study, the service infers, a real Orthanc
(started here, HTTP on loopback) receives the SR and key image."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from shiftguard.edge.queue import DONE
from shiftguard.edge.receiver import ReceiverSettings
from shiftguard.edge.service import Destination, Service, ServiceSettings

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("Orthanc") is None or shutil.which("storescu") is None,
        reason="Orthanc and dcmtk are installed by scripts/setup.sh",
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Orthanc:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.http = free_port()
        self.dicom = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        config = {
            "Name": "shiftguard-test",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "HttpPort": self.http,
            "DicomPort": self.dicom,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True,
            "Plugins": [],
        }
        path = self.root / "orthanc.json"
        path.write_text(json.dumps(config))
        log = (self.root / "orthanc.log").open("ab")
        self.proc = subprocess.Popen(["Orthanc", str(path)], stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                self.get("/system")
                return
            except OSError:
                time.sleep(0.2)
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


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path / "orthanc")
    server.root.mkdir()
    server.start()
    yield server
    server.stop()


def _service(tmp_path: Path, bundle: Path, orthanc: Orthanc, shadow: bool) -> Service:
    settings = ServiceSettings(
        bundle=str(bundle),
        storage=str(tmp_path / "edge"),
        receiver=ReceiverSettings(port=0, calling_ae_titles=("MODALITY",)),
        destinations=(Destination("pacs", "ORTHANC", "127.0.0.1", orthanc.dicom, "clinical"),),
        shadow=shadow,
        stability_s=30.0,
        retry_base_s=0.2,
        http_port=0,
    )
    service = Service(settings)
    service.start()
    return service


def _send(port: int, study: Path) -> None:
    files = sorted(map(str, study.rglob("*.dcm")))
    proc = subprocess.run(
        ["storescu", "-aet", "MODALITY", "-aec", "SHIFTGUARD", "127.0.0.1", str(port), *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


def _wait(predicate: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_a_study_in_gives_an_sr_and_a_key_image_in_the_pacs(
    tmp_path: Path, bundle_path: Path, cohort: Path, orthanc: Orthanc
) -> None:
    service = _service(tmp_path, bundle_path, orthanc, shadow=False)
    try:
        study = sorted(next(cohort.iterdir()).iterdir())[0]
        uid = pydicom.dcmread(next(study.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
        _send(service.receiver.port, study)
        _wait(lambda: len(orthanc.get("/instances")) == 2)
        classes = sorted(
            orthanc.get(f"/instances/{i}/simplified-tags")["SOPClassUID"]
            for i in orthanc.get("/instances")
        )
        # Comprehensive 3D SR and Secondary Capture, nothing else
        assert classes == ["1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88.34"]
        for instance in orthanc.get("/instances"):
            tags = orthanc.get(f"/instances/{instance}/simplified-tags")
            assert tags["StudyInstanceUID"] == uid  # joined the source study
        assert service.queue.study_state(uid) == DONE
        with urllib.request.urlopen(f"http://127.0.0.1:{service.http_port}/metrics") as r:
            metrics = r.read().decode()
        assert "shiftguard_edge_sent_total 2" in metrics
        assert 'shiftguard_edge_latency_seconds_count{stage="ready_to_sent"} 1' in metrics
        with urllib.request.urlopen(f"http://127.0.0.1:{service.http_port}/healthz") as r:
            assert json.loads(r.read())["status"] == "ok"
    finally:
        service.stop()


def test_shadow_mode_sends_nothing_clinical_and_logs_the_result(
    tmp_path: Path, bundle_path: Path, cohort: Path, orthanc: Orthanc
) -> None:
    service = _service(tmp_path, bundle_path, orthanc, shadow=True)
    try:
        study = sorted(next(cohort.iterdir()).iterdir())[0]
        uid = pydicom.dcmread(next(study.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
        _send(service.receiver.port, study)
        _wait(lambda: service.queue.study_state(uid) == DONE)
        time.sleep(1.0)  # a sender would have had time to deliver
        assert orthanc.get("/instances") == []
        [row] = service.queue.shadow_log()
        assert row["study_uid"] == uid and row["role"] == "champion"
        assert row["routed"] == "shadow log only"
    finally:
        service.stop()
