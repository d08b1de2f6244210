"""Results delivered by DICOMweb STOW-RS to a real Orthanc with its DICOMweb plugin: the SR and
the key image arrive in the study, a server that is down is retried from the durable queue until it
takes them (each stored once), and a destination that could send a token in clear is refused at
start."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydantic import ValidationError

from shiftguard.config import EdgeConfig
from shiftguard.edge.service import Service
from shiftguard.errors import CollectorAddressError
from shiftguard.peers import Orthanc, storescu

from .conftest import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.peers("Orthanc", "storescu")]


def _settings(tmp_path: Path, bundle: Path, url: str, **dest: Any) -> EdgeConfig:
    return EdgeConfig(
        bundle=str(bundle),
        storage=str(tmp_path / "edge"),
        port=0,
        http_port=0,
        calling_ae_titles=["MODALITY"],
        destinations=[{"name": "vna", "kind": "stow-rs", "url": url, **dest}],
        shadow=False,
        retry_base_s=0.2,
        retry_max_s=0.5,
    )


def _study(cohort: Path) -> tuple[Path, str]:
    study = sorted(next(cohort.iterdir()).iterdir())[0]
    uid = pydicom.dcmread(next(study.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
    return study, str(uid)


def _send_through(settings: EdgeConfig, files: list[Path]) -> Service:
    """Start a service with ``settings``, send it ``files`` by storescu, and wait until its
    results were delivered (``sent == 2``) or refused twice; returns the stopped service."""
    service = Service(settings)
    service.start()
    try:
        assert storescu(service.receiver.port, files).returncode == 0
        wait_until(lambda: service.count("sent") == 2 or service.count("send_failures") >= 2)
    finally:
        service.stop()
    return service


def test_results_go_to_a_vna_by_stow_rs(tmp_path: Path, bundle_path: Path, cohort: Path) -> None:
    vna = Orthanc(tmp_path / "vna", dicomweb=True)
    vna.start()
    service = Service(_settings(tmp_path, bundle_path, vna.dicomweb_url))
    service.start()
    try:
        study, uid = _study(cohort)
        proc = storescu(service.receiver.port, sorted(study.rglob("*.dcm")))
        assert proc.returncode == 0, proc.stderr
        wait_until(lambda: service.count("sent") == 2)
        assert vna.studies() == {uid: 2}  # the SR and the key image, in the source study
        classes = {
            vna.get(f"/instances/{i}/simplified-tags")["SOPClassUID"] for i in vna.get("/instances")
        }
        assert classes == {"1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7"}
        assert service.count("send_failures") == 0
    finally:
        service.stop()
        vna.stop()


def test_a_vna_that_is_down_gets_every_result_once_it_is_back(
    tmp_path: Path, bundle_path: Path, cohort: Path
) -> None:
    vna = Orthanc(tmp_path / "vna", dicomweb=True)  # its ports chosen, not started yet
    service = Service(_settings(tmp_path, bundle_path, vna.dicomweb_url))
    service.start()
    try:
        study, uid = _study(cohort)
        assert storescu(service.receiver.port, sorted(study.rglob("*.dcm"))).returncode == 0
        wait_until(lambda: service.count("send_failures") >= 2)  # refused connections, backed off
        assert service.count("sent") == 0
        vna.start()
        wait_until(lambda: service.count("sent") == 2)
        assert vna.studies() == {uid: 2}
        time.sleep(1.0)  # a second delivery of either would show here
        assert vna.studies() == {uid: 2} and service.count("sent") == 2
    finally:
        service.stop()
        vna.stop()


def test_a_destination_that_would_send_a_token_in_clear_is_refused(
    tmp_path: Path, bundle_path: Path
) -> None:
    settings = _settings(tmp_path, bundle_path, "http://10.20.0.5/dicom-web", token_env="VNA_TOKEN")
    with pytest.raises(CollectorAddressError, match="in clear"):
        Service(settings)


@pytest.mark.parametrize(
    ("destination", "message"),
    [
        ({"name": "vna", "kind": "stow-rs"}, "needs url"),
        ({"name": "vna", "kind": "stow-rs", "url": "vna.example/dicom-web"}, "needs url"),
        ({"name": "pacs", "port": 4242}, "needs its ae_title"),
        ({"name": "pacs", "ae_title": "PACS", "url": "https://x/dicom-web"}, "url is for"),
        ({"name": "vna", "kind": "stow-rs", "url": "https://x", "cert": "c.pem"}, "go together"),
    ],
)
def test_a_destination_missing_what_its_kind_needs_is_a_config_error(
    destination: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        EdgeConfig(destinations=[destination])


@pytest.mark.peers("openssl")
def test_a_vna_that_wants_a_client_certificate_gets_one(
    tmp_path: Path, bundle_path: Path, cohort: Path
) -> None:
    """HTTPS requiring client certificates in front of Orthanc: the destination with ``ca``,
    ``cert`` and ``key`` delivers; the same without its certificate is refused in the handshake,
    retried, and nothing is stored."""
    from tls_certs import TlsFront, self_signed

    server = self_signed(tmp_path, "server")
    client = self_signed(tmp_path, "client")
    vna = Orthanc(tmp_path / "vna", dicomweb=True)
    vna.start()
    front = TlsFront(vna.http, server, client[0])
    url = f"https://127.0.0.1:{front.port}/dicom-web"
    study, uid = _study(cohort)
    files = sorted(study.rglob("*.dcm"))
    try:
        anonymous = _send_through(
            _settings(tmp_path / "a", bundle_path, url, ca=str(server[0])), files
        )
        assert anonymous.count("sent") == 0 and vna.studies() == {} and front.refused >= 2
        settings = _settings(
            tmp_path / "b", bundle_path, url,
            ca=str(server[0]), cert=str(client[0]), key=str(client[1]),
        )  # fmt: skip
        assert _send_through(settings, files).count("sent") == 2
        assert vna.studies() == {uid: 2}
    finally:
        front.close()
        vna.stop()


TOKEN_FILTER = """
function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  if string.sub(uri, 1, 11) == '/dicom-web/' then
    return httpHeaders['authorization'] == 'Bearer s3cret-token'
  end
  return true
end
"""


def test_a_vna_that_wants_a_bearer_token_gets_the_one_in_token_env(
    tmp_path: Path, bundle_path: Path, cohort: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Orthanc refusing DICOMweb requests without the right bearer token (its HTTP filter):
    a wrong token is refused and retried, the right one from ``token_env`` delivers."""
    vna = Orthanc(tmp_path / "vna", dicomweb=True, lua=TOKEN_FILTER)
    vna.start()
    study, uid = _study(cohort)
    files = sorted(study.rglob("*.dcm"))
    try:
        settings = _settings(tmp_path / "a", bundle_path, vna.dicomweb_url, token_env="VNA_TOKEN")
        monkeypatch.setenv("VNA_TOKEN", "wrong")
        assert _send_through(settings, files).count("sent") == 0 and vna.studies() == {}
        monkeypatch.setenv("VNA_TOKEN", "s3cret-token")
        settings = _settings(tmp_path / "b", bundle_path, vna.dicomweb_url, token_env="VNA_TOKEN")
        assert _send_through(settings, files).count("sent") == 2
        assert vna.studies() == {uid: 2}
    finally:
        vna.stop()


def test_edge_predict_fetches_a_study_from_a_vna_by_qido_and_wado_rs(
    tmp_path: Path, bundle_path: Path, cohort: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`edge predict --dicomweb URL --study UID`: the study is found by QIDO-RS, fetched by WADO-RS
    and predicted as if it were a local folder (the same probability); a study the server does not
    have is a clear error (exit 2)."""
    import csv

    from shiftguard.cli import main

    vna = Orthanc(tmp_path / "vna", dicomweb=True)
    vna.start()
    try:
        study, uid = _study(cohort)
        assert storescu(vna.dicom, sorted(study.rglob("*.dcm")), called="ORTHANC").returncode == 0
        base = ["edge", "predict", "--bundle", str(bundle_path), "--shadow"]
        assert main([*base, str(study), "--out", str(tmp_path / "local")]) == 0
        remote = ["--dicomweb", vna.dicomweb_url, "--study", uid, "--out", str(tmp_path / "vna")]
        assert main([*base, *remote]) == 0
        rows = {}
        for name in ("local", "vna"):
            with (tmp_path / name / "results.csv").open(newline="") as fh:
                [rows[name]] = list(csv.DictReader(fh))
        assert rows["vna"]["study_uid"] == uid
        assert float(rows["vna"]["probability"]) == pytest.approx(
            float(rows["local"]["probability"]), abs=1e-6
        )
        capsys.readouterr()
        missing = ["--dicomweb", vna.dicomweb_url, "--study", "1.2.3.4", "--out", str(tmp_path)]
        assert main([*base, *missing]) == 2
        assert "no study 1.2.3.4" in capsys.readouterr().err
    finally:
        vna.stop()
