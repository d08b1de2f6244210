"""The asyncio Storage SCP (shiftguard.edge.scp) at the protocol level: fragmentation, C-ECHO,
context negotiation, garbage, timeouts, aborts; and the header scan the receive path relies on."""

from __future__ import annotations

import io
import socket
import subprocess
import time
import warnings
from pathlib import Path

import pydicom
import pytest

from shiftguard.config import EdgeConfig
from shiftguard.edge.queue import RECEIVING, WorkQueue
from shiftguard.edge.receiver import Receiver, scan_uids
from shiftguard.peers import tool

needs_dcmtk = pytest.mark.peers("storescu")


@pytest.fixture
def make_receiver(tmp_path: Path):
    made: list[tuple[Receiver, WorkQueue]] = []

    def make(**settings) -> tuple[Receiver, WorkQueue]:
        queue = WorkQueue(tmp_path / f"queue{len(made)}.db")
        rx = Receiver(
            EdgeConfig(port=0, calling_ae_titles=["MODALITY"], **settings),
            queue,
            tmp_path / f"inbox{len(made)}",
        )
        rx.start()
        made.append((rx, queue))
        return rx, queue

    yield make
    for rx, queue in made:
        rx.stop()
        queue.close()


def _storescu(port: int, files: list[Path], *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("storescu"), *extra, "-aet", "MODALITY", "-aec", "SHIFTGUARD", "127.0.0.1", str(port),
         *map(str, files)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_scan_uids_agrees_with_pydicom_on_its_test_files() -> None:
    import pydicom.data

    # the files pydicom ships (get_testdata_files would also try to download its larger set)
    names = sorted((Path(pydicom.data.__file__).parent / "test_files").rglob("*"))
    compared = 0
    for name in names:
        if not Path(name).is_file() or Path(name).stat().st_size > 1_000_000:
            continue  # the header is what matters; big pixel payloads only cost time
        raw = Path(name).read_bytes()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True)
            expected = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
        except Exception:
            expected = None
        try:
            found = scan_uids(raw)
        except ValueError:
            found = "no uids"
        if found is None:
            continue  # not a case the scan handles (big endian, deflated, no Part 10 header)
        compared += 1
        assert found == (expected if expected is not None else "no uids"), name
    assert compared >= 40


@needs_dcmtk
def test_small_pdus_are_reassembled_into_the_bytes_sent(make_receiver, cohort: Path) -> None:
    rx, queue = make_receiver(max_pdu=4096)  # a 20 kB slice arrives in six PDUs
    files = sorted(next(cohort.iterdir()).rglob("*.dcm"))[:5]
    proc = _storescu(rx.port, files)
    assert proc.returncode == 0, proc.stderr
    stored = {pydicom.dcmread(p).SOPInstanceUID: p for p in map(Path, _all_files(queue))}
    for f in files:
        sent = pydicom.dcmread(f)
        got = pydicom.dcmread(stored[sent.SOPInstanceUID])
        assert got.PixelData == sent.PixelData and got.PatientID == sent.PatientID
        assert got.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
        assert got.file_meta.SourceApplicationEntityTitle == "MODALITY"


def _all_files(queue: WorkQueue) -> list[str]:
    return [row[0] for row in queue._db.execute("SELECT path FROM instances").fetchall()]


@needs_dcmtk
def test_c_echo_answers(make_receiver) -> None:
    rx, _ = make_receiver()
    proc = subprocess.run(
        [tool("echoscu"), "-aet", "MODALITY", "-aec", "SHIFTGUARD", "127.0.0.1", str(rx.port)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_unsupported_contexts_are_rejected_and_supported_ones_used(make_receiver) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import MRImageStorage, PatientRootQueryRetrieveInformationModelFind

    rx, _ = make_receiver()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", rx.port, ae_title="SHIFTGUARD")
    assert assoc.is_established
    accepted = {str(c.abstract_syntax) for c in assoc.accepted_contexts}
    rejected = {str(c.abstract_syntax) for c in assoc.rejected_contexts}
    assert accepted == {MRImageStorage} and rejected == {
        PatientRootQueryRetrieveInformationModelFind
    }
    assoc.release()


@needs_dcmtk
def test_garbage_is_aborted_and_the_scp_keeps_serving(make_receiver, cohort: Path) -> None:
    rx, queue = make_receiver()
    with socket.create_connection(("127.0.0.1", rx.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = sock.recv(100)
        assert reply[:1] in (b"\x07", b"")  # A-ABORT, then the connection closes
        assert sock.recv(100) == b""
    with socket.create_connection(("127.0.0.1", rx.port), timeout=5) as sock:
        sock.sendall(b"\x01\x00\xff\xff\xff\xff")  # an A-ASSOCIATE-RQ claiming 4 GB
        assert sock.recv(100)[:1] in (b"\x07", b"")
    files = sorted(cohort.rglob("*.dcm"))[:2]
    assert _storescu(rx.port, files).returncode == 0
    assert queue.counts()["instances"] == 2


@needs_dcmtk
def test_an_instance_over_the_size_limit_aborts_its_association_only(
    make_receiver, cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fragments are held in memory until an instance is complete: one over the limit ends its
    association (bounded memory), and what came before it and after it is kept."""
    from shiftguard.edge import scp

    files = sorted(cohort.rglob("*.dcm"))
    small = min(files, key=lambda f: f.stat().st_size)
    monkeypatch.setattr(scp, "MAX_DATASET_BYTES", small.stat().st_size + 1024)
    big = _padded_copy(small, tmp_path / "big.dcm", 64 * 1024)
    rx, queue = make_receiver()
    assert _storescu(rx.port, [small]).returncode == 0
    refused = _storescu(rx.port, [big])
    assert refused.returncode != 0 and queue.counts()["instances"] == 1
    assert _storescu(rx.port, files[:2]).returncode == 0
    assert queue.counts()["instances"] == len({small, *files[:2]})


def _padded_copy(source: Path, dest: Path, extra: int) -> Path:
    """``source`` with a new SOP Instance UID and ``extra`` bytes of private data."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.add_new(0x00291010, "OB", bytes(extra))
    ds.save_as(dest, enforce_file_format=True)
    return dest


def test_a_silent_association_is_aborted_after_the_network_timeout(make_receiver) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import MRImageStorage

    rx, _ = make_receiver(network_timeout_s=0.5)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", rx.port, ae_title="SHIFTGUARD")
    assert assoc.is_established
    deadline = time.monotonic() + 10
    while not assoc.is_aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted


def test_an_aborted_association_leaves_its_study_receiving(make_receiver, cohort: Path) -> None:
    from pynetdicom import AE

    rx, queue = make_receiver()
    ds = pydicom.dcmread(sorted(cohort.rglob("*.dcm"))[0])
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", rx.port, ae_title="SHIFTGUARD")
    assert int(assoc.send_c_store(ds).Status) == 0
    assoc.abort()
    time.sleep(0.3)
    # kept (it was acknowledged), but not ready: the stability timer decides
    assert queue.counts()["instances"] == 1
    assert queue.study_state(str(ds.StudyInstanceUID)) == RECEIVING


@pytest.mark.parametrize("durability", ["association", "instance"])
@needs_dcmtk
def test_both_durability_modes_store_and_release(make_receiver, cohort: Path, durability) -> None:
    rx, queue = make_receiver(durability=durability)
    study = sorted(next(cohort.iterdir()).iterdir())[0]
    files = sorted(study.rglob("*.dcm"))
    assert _storescu(rx.port, files).returncode == 0
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert queue.study_state(uid) == "ready"  # marked before the release was acknowledged
    assert len(queue.study_files(uid)) == len(files)


def test_settings_name_the_bad_value() -> None:
    with pytest.raises(ValueError, match=r"engine\n.*'asyncio' or 'pynetdicom'.*'twisted'"):
        EdgeConfig(engine="twisted")
    with pytest.raises(ValueError, match=r"durability\n.*'association' or 'instance'.*'maybe'"):
        EdgeConfig(durability="maybe")


@needs_dcmtk
def test_files_written_but_not_recorded_are_recovered_at_start(
    tmp_path: Path, make_receiver, cohort: Path
) -> None:
    """Under durability 'association' an instance is acknowledged once its file is written and
    its record committed in a batch: a crash in between leaves a file the queue does not know."""
    rx, queue = make_receiver()
    files = sorted(next(cohort.iterdir()).rglob("*.dcm"))[:3]
    assert _storescu(rx.port, files).returncode == 0
    inbox = rx.inbox
    rx.stop()
    recorded = sorted(queue.instance_paths())
    # the crash: records lost, one half-written temporary file left behind
    queue._db.execute("DELETE FROM instances")
    queue._db.execute("DELETE FROM studies")
    leftover = Path(recorded[0]).with_name(".partial.dcm.1.tmp")
    leftover.write_bytes(b"half")
    again = Receiver(EdgeConfig(port=0), queue, inbox)
    again.start()
    try:
        assert sorted(queue.instance_paths()) == recorded
        assert not leftover.exists()
        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        assert queue.study_state(uid) == RECEIVING  # the stability timer will process it
        calling = queue._db.execute("SELECT DISTINCT calling_ae FROM instances").fetchall()
        assert [r[0] for r in calling] == ["MODALITY"]
    finally:
        again.stop()
