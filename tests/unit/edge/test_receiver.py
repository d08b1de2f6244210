"""The Storage SCP against dcmtk's storescu (a real modality-side sender) on loopback."""

from __future__ import annotations

import subprocess
import time
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from tls_certs import self_signed

from shiftguard.config import EdgeConfig
from shiftguard.edge.queue import READY, WorkQueue
from shiftguard.edge.receiver import Receiver, address_allowed
from shiftguard.peers import tool

pytestmark = pytest.mark.peers("storescu")


@pytest.fixture(params=["asyncio", "pynetdicom"])
def engine(request) -> str:
    return str(request.param)


@pytest.fixture
def receiver(tmp_path: Path, engine: str):
    queue = WorkQueue(tmp_path / "queue.db")
    ready: list[str] = []
    rx = Receiver(
        EdgeConfig(port=0, calling_ae_titles=["MODALITY"], engine=engine),
        queue,
        tmp_path / "inbox",
        on_ready=ready.extend,
    )
    rx.start()
    yield rx, queue, ready
    rx.stop()
    queue.close()


def storescu(
    port: int, files: list[Path], aet: str = "MODALITY"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            tool("storescu"),
            "-aet",
            aet,
            "-aec",
            "SHIFTGUARD",
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _wait_for_instances(queue: WorkQueue, n: int, timeout: float = 10.0) -> None:
    """pynetdicom's engine records an association's instances on its release event, which may
    run just after storescu has returned."""
    deadline = time.monotonic() + timeout
    while queue.counts()["instances"] != n and time.monotonic() < deadline:
        time.sleep(0.02)
    assert queue.counts()["instances"] == n


def test_a_study_is_stored_queued_and_ready_on_release(receiver, cohort: Path) -> None:
    rx, queue, ready = receiver
    study = sorted(next(cohort.iterdir()).iterdir())[0]
    files = sorted(study.rglob("*.dcm"))
    proc = storescu(rx.port, files)
    assert proc.returncode == 0, proc.stderr
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    deadline = time.monotonic() + 10  # the release event runs on the SCP's thread, after storescu
    while queue.study_state(uid) != READY and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ready == [uid] and queue.study_state(uid) == READY
    stored = queue.study_files(uid)
    assert len(stored) == len(files) == rx.stats.received
    # the bytes written are the bytes sent: no decode, no re-encode (only the file meta may differ)
    sent = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f).PixelData for f in files}
    for path in stored:
        ds = pydicom.dcmread(path)
        assert ds.PixelData == sent[ds.SOPInstanceUID]
    # sending the study again adds nothing (duplicates are counted when the association's records
    # are committed, at its release, which runs on the SCP's thread after storescu returns)
    assert storescu(rx.port, files).returncode == 0
    deadline = time.monotonic() + 10
    while rx.stats.duplicates < len(files) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(queue.study_files(uid)) == len(files) and rx.stats.duplicates == len(files)


def test_an_unknown_calling_ae_title_is_refused(receiver, cohort: Path) -> None:
    rx, queue, _ = receiver
    files = sorted(cohort.rglob("*.dcm"))[:1]
    proc = storescu(rx.port, files, aet="INTRUDER")
    assert proc.returncode != 0
    assert "Association Rejected" in proc.stdout + proc.stderr
    assert queue.counts()["instances"] == 0


def test_an_object_without_study_uid_is_refused_and_the_service_keeps_serving(
    receiver, cohort: Path
) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import MRImageStorage

    rx, queue, _ = receiver
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID = "X"
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", rx.port, ae_title="SHIFTGUARD")
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0xC210 and rx.stats.rejected == 1
    assert queue.counts()["instances"] == 0
    files = sorted(cohort.rglob("*.dcm"))[:2]
    assert storescu(rx.port, files).returncode == 0
    _wait_for_instances(queue, 2)


@pytest.mark.parametrize(
    ("study_uid", "sop_uid"),
    [
        ("..", None),  # the study's folder would be the inbox's parent
        ("1.2.3", ".."),
        ("1.2..3", None),  # an empty component
        ("1.02.3", None),  # a leading zero
        ("1.2.3/../../4", None),
        ("1." + "2" * 63, None),  # 65 characters
    ],
)
def test_an_object_whose_uids_break_the_dicom_rules_is_refused_before_any_path(
    receiver, cohort: Path, tmp_path: Path, study_uid: str, sop_uid: str | None
) -> None:
    """UIDs come from anyone on the network: each is checked against PS3.5's UI rules (digits,
    no leading zero, single dots, at most 64 characters) before a file name is made of it."""
    from pydicom import config
    from pynetdicom import AE

    rx, queue, _ = receiver
    ds = pydicom.dcmread(sorted(cohort.rglob("*.dcm"))[0])
    with warnings.catch_warnings():  # pydicom warns of the invalid values it is given
        warnings.simplefilter("ignore")
        ds.StudyInstanceUID = study_uid
        if sop_uid is not None:
            ds.SOPInstanceUID = sop_uid
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", rx.port, ae_title="SHIFTGUARD")
    assert assoc.is_established
    validation = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE  # send it as a careless modality would
    try:
        status = assoc.send_c_store(ds)
    finally:
        config.settings.writing_validation_mode = validation
    assoc.release()
    assert status.Status == 0xC210 and rx.stats.rejected == 1
    assert queue.counts()["instances"] == 0
    written = {p for p in tmp_path.rglob("*") if p.is_file()} - before
    assert not [p for p in written if p.suffix == ".dcm"], written
    files = sorted(cohort.rglob("*.dcm"))[:2]
    assert storescu(rx.port, files).returncode == 0  # and it keeps serving
    _wait_for_instances(queue, 2)


def test_address_allow_list() -> None:
    allowed = EdgeConfig(allowed_addresses=["10.0.0.0/8", "127.0.0.1"]).allowed_addresses
    assert address_allowed(allowed, "10.2.3.4") and address_allowed(allowed, "127.0.0.1")
    assert not address_allowed(allowed, "192.168.1.5")
    assert address_allowed(EdgeConfig().allowed_addresses, "192.168.1.5")  # empty: any


@pytest.mark.peers("openssl")
def test_tls_only_lets_clients_with_a_trusted_certificate_in(
    tmp_path: Path, cohort: Path, engine: str
) -> None:
    import ssl

    from pynetdicom import AE
    from pynetdicom.sop_class import MRImageStorage

    server_crt, server_key = self_signed(tmp_path, "server")
    client_crt, client_key = self_signed(tmp_path, "client")
    queue = WorkQueue(tmp_path / "q.db")
    rx = Receiver(
        EdgeConfig(
            port=0,
            tls_cert=str(server_crt),
            tls_key=str(server_key),
            tls_ca=str(client_crt),
            engine=engine,
        ),
        queue,
        tmp_path / "inbox",
    )
    rx.start()
    try:
        ds = pydicom.dcmread(sorted(cohort.rglob("*.dcm"))[0])

        def send(context: ssl.SSLContext | None) -> bool:
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(MRImageStorage, ds.file_meta.TransferSyntaxUID)
            tls = (context, "127.0.0.1") if context is not None else None
            assoc = ae.associate("127.0.0.1", rx.port, ae_title="SHIFTGUARD", tls_args=tls)
            if not assoc.is_established:
                return False
            status = assoc.send_c_store(ds)
            assoc.release()
            return int(status.Status) == 0

        trusted = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(server_crt))
        trusted.load_cert_chain(str(client_crt), str(client_key))
        assert send(trusted)
        anonymous = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(server_crt))
        assert not send(anonymous)  # no client certificate
        assert not send(None)  # plain DICOM to a TLS port
        assert queue.counts()["instances"] == 1
    finally:
        rx.stop()
        queue.close()


def test_a_study_over_the_size_limit_is_refused_and_marked_failed_and_the_next_one_served(
    tmp_path: Path, engine: str, cohort: Path
) -> None:
    from shiftguard.peers import copy_study

    big, small = copy_study(sorted(next(cohort.iterdir()).iterdir())[0], tmp_path / "sent", 2)
    big_files, small_files = sorted(big.iterdir()), sorted(small.iterdir())
    study_bytes = sum(p.stat().st_size for p in big_files)
    limit_mb = 0.6 * study_bytes / 2**20
    small_files = small_files[: len(small_files) // 2]  # about half: under the limit
    queue = WorkQueue(tmp_path / "queue.db")
    ready: list[str] = []
    rx = Receiver(
        EdgeConfig(port=0, calling_ae_titles=["MODALITY"], engine=engine, max_study_mb=limit_mb),
        queue, tmp_path / "inbox", on_ready=ready.extend,
    )  # fmt: skip
    rx.start()
    try:
        proc = storescu(rx.port, big_files)
        assert "0xa700" in (proc.stdout + proc.stderr).lower() or proc.returncode != 0
        uid = pydicom.dcmread(big_files[0], stop_before_pixels=True).StudyInstanceUID
        assert queue.study_state(uid) == "failed"
        assert "edge.max_study_mb" in queue.study_note(uid)
        accepted = len(list((tmp_path / "inbox" / uid).iterdir()))
        assert 0 < accepted < len(big_files)  # what came before the limit is kept
        # storescu gives up at the first refusal; any instance after it is refused too
        assert 1 <= rx.stats.rejected <= len(big_files) - accepted
        assert uid in rx.oversized
        # the service keeps serving: a study under the limit is taken whole and made ready
        proc = storescu(rx.port, small_files)
        assert proc.returncode == 0, proc.stderr
        other = pydicom.dcmread(small_files[0], stop_before_pixels=True).StudyInstanceUID
        deadline = time.monotonic() + 10
        while queue.study_state(other) != READY and time.monotonic() < deadline:
            time.sleep(0.02)
        assert queue.study_state(other) == READY and other in ready
        assert queue.study_state(uid) == "failed"  # the release did not make it ready
    finally:
        rx.stop()
        queue.close()
