"""Verified reports from the PACS: its address, the reports fetched from a real Orthanc (and dcmtk's
dcmqrscp) by C-FIND and C-MOVE or C-GET, and the ways the PACS can refuse."""

from __future__ import annotations

import re
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from peers_plugin import peer_missing
from pydicom.sequence import Sequence as DicomSequence
from report_sr import study, write_report_sr

from shiftguard.peers import Orthanc, find_tool, free_port, storescu, tool
from shiftguard.shadow.diagnoses import Diagnosis, DiagnosisBook, read_diagnoses
from shiftguard.shadow.pacs import (
    Pacs,
    PacsError,
    fetch_reports,
    fetch_reports_dicomweb,
    parse_pacs,
)
from shiftguard.shadow.sr import report_to_diagnosis

needs_orthanc = pytest.mark.peers("Orthanc", "storescu")


# ---------------------------------------------------------------------------------------------
# addresses


def test_parse_pacs() -> None:
    assert parse_pacs(" ORTHANC@127.0.0.1:4242 ") == Pacs("127.0.0.1", 4242, "ORTHANC")
    assert parse_pacs("MY@AE@pacs.example.org:104") == Pacs("pacs.example.org", 104, "MY@AE")
    assert parse_pacs("PACS@[::1]:11112") == Pacs("::1", 11112, "PACS")
    assert str(parse_pacs("PACS@[::1]:11112")) == "PACS@[::1]:11112"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("127.0.0.1:4242", "has no AE title"),
        ("ORTHANC@127.0.0.1", "has no port"),
        ("ORTHANC@::1:4242", "has no port"),
        ("ORTHANC@127.0.0.1:dicom", "port 'dicom' is not a number"),
        ("ORTHANC@127.0.0.1:70000", "port 70000 is outside 1-65535"),
        ("ORTHANC@:4242", "host '' is empty"),
        ("@127.0.0.1:4242", "AE title '' must be 1-16"),
        ("A_VERY_LONG_AE_TITLE@127.0.0.1:4242", "AE title 'A_VERY_LONG_AE_TITLE' must be"),
    ],
)
def test_parse_pacs_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(PacsError, match=message) as caught:
        parse_pacs(text)
    assert repr(text) in str(caught.value)


# ---------------------------------------------------------------------------------------------
# a real PACS


@dataclass
class Archive:
    """What was stored in the PACS, and what fetching it must give."""

    orthanc: Orthanc
    move_port: int
    recent: str  # study with two reports and an AI result
    old: str  # older study with one report and a malformed one
    unreported: str
    expected: dict[str, list[Diagnosis]] = field(default_factory=dict)  # study -> reports
    sources: dict[Diagnosis, str] = field(default_factory=dict)  # report -> its SOP UID
    malformed: str = ""  # SOP Instance UID

    @property
    def pacs(self) -> Pacs:
        return Pacs("127.0.0.1", self.orthanc.dicom, self.orthanc.ae_title)


def _ai_result(image: Path, out: Path) -> None:
    """The edge runner's own (unverified) SR for the series of ``image``."""
    from shiftguard.dicom.scan import read_headers
    from shiftguard.edge.dicom_out import SeriesResult, write_sr

    ref = pydicom.dcmread(image, stop_before_pixels=True)
    result = SeriesResult(ref.SeriesInstanceUID, 0.9, 0.5, "small-cnn", "3", shadow=True)
    write_sr(ref, read_headers(image), result, out)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    """An Orthanc knowing AE SHIFTGUARD, holding three studies and their SRs."""
    missing = [name for name in ("Orthanc", "storescu") if find_tool(name) is None]
    if missing:
        peer_missing(f"needs {', '.join(missing)}: scripts/setup.sh installs them")
    root = tmp_path_factory.mktemp("pacs")
    move_port = free_port()
    orthanc = Orthanc(
        root / "orthanc", modalities={"SHIFTGUARD": ("127.0.0.1", move_port)}, dicomweb=True
    )
    recent = study(root / "recent", "20240301", "P1")
    old = study(root / "old", "20231115", "P2")
    unreported = study(root / "unreported", "20240310", "P3")
    uids = [pydicom.dcmread(p[0]).StudyInstanceUID for p in (recent, old, unreported)]
    a = Archive(orthanc, move_port, *uids)
    files = [*recent, *old, *unreported]
    for n, (images, finding, reader, signed) in enumerate(
        [
            (recent, 1, "Smith^Jane", "2024-03-02T09:00:00Z"),
            (recent, 0, "Doe^John", "2024-03-03T14:15:00+01:00"),  # later: this one counts
            (old, 1, "Smith^Jane", "2023-11-16T08:00:00Z"),
        ]
    ):
        image = pydicom.dcmread(images[0])
        ds = write_report_sr(image, finding, reader, signed, root / "sr" / f"{n}.dcm")
        diagnosis, _ = report_to_diagnosis(ds, "")
        assert diagnosis is not None
        a.expected.setdefault(diagnosis.study_uid, []).append(diagnosis)
        a.sources[diagnosis] = f"pacs:ORTHANC/{ds.SOPInstanceUID}"
        files.append(root / "sr" / f"{n}.dcm")
    malformed = write_report_sr(
        pydicom.dcmread(old[0]), 0, "Doe^John", "2023-11-17", root / "sr" / "bad.dcm"
    )
    malformed.ContentSequence = DicomSequence(malformed.ContentSequence[1:])  # no Finding
    malformed.save_as(root / "sr" / "bad.dcm", enforce_file_format=True)
    a.malformed = malformed.SOPInstanceUID
    files.append(root / "sr" / "bad.dcm")
    _ai_result(recent[0], root / "sr" / "ai.dcm")

    orthanc.start()
    try:
        sent = storescu(orthanc.dicom, files, called=orthanc.ae_title)
        assert sent.returncode == 0, sent.stderr
        # storescu does not propose Comprehensive 3D SR: the AI result goes in over HTTP
        upload = urllib.request.Request(
            f"http://127.0.0.1:{orthanc.http}/instances",
            data=(root / "sr" / "ai.dcm").read_bytes(),
            method="POST",
        )
        urllib.request.urlopen(upload, timeout=10).close()
        assert len(orthanc.get("/instances")) == len(files) + 1
        yield a
    finally:
        orthanc.stop()


@pytest.mark.integration
@needs_orthanc
@pytest.mark.parametrize("retrieve", ["move", "get"])
def test_the_verified_reports_come_back_from_the_pacs(archive: Archive, retrieve: str) -> None:
    diagnoses, problems, stats = fetch_reports(
        archive.pacs,
        retrieve=retrieve,
        move_port=archive.move_port,  # type: ignore[arg-type]
    )
    expected = [d for reports in archive.expected.values() for d in reports]
    assert sorted(diagnoses) == sorted(expected)
    assert {d.source for d in diagnoses} == {archive.sources[d] for d in expected}
    assert archive.unreported not in {d.study_uid for d in diagnoses}

    book = DiagnosisBook()
    book.add(diagnoses, problems)
    assert book.verdicts() == {archive.recent: 0, archive.old: 1}  # Doe^John signed last
    verdict = book.verdict(archive.recent)
    assert verdict is not None and verdict.reader == "Doe^John"
    assert book.disagreements() == [archive.recent]

    assert [p.source for p in problems] == [f"pacs:ORTHANC/{archive.malformed}"]
    assert "no Finding" in problems[0].message
    assert (stats.series_found, stats.instances_retrieved) == (5, 5)
    assert (stats.verified_reports, stats.skipped_unverified, stats.problems) == (3, 1, 1)


@pytest.mark.integration
@needs_orthanc
def test_since_and_studies_narrow_the_query(archive: Archive) -> None:
    diagnoses, problems, stats = fetch_reports(
        archive.pacs, retrieve="get", since="2024-01-01", studies=None
    )
    assert {d.study_uid for d in diagnoses} == {archive.recent}  # the 2023 study is left out
    assert problems == [] and stats.series_found == 3 and stats.skipped_unverified == 1

    diagnoses, problems, stats = fetch_reports(
        archive.pacs, move_port=archive.move_port, studies=[archive.old, archive.unreported]
    )
    assert sorted(diagnoses) == archive.expected[archive.old]
    assert len(problems) == 1 and stats.series_found == 2

    diagnoses, _, stats = fetch_reports(archive.pacs, retrieve="get", since="20250101")
    assert diagnoses == [] and stats.series_found == 0


@pytest.mark.integration
@needs_orthanc
def test_the_verified_reports_come_back_by_qido_and_wado_rs(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same archive through Orthanc's DICOMweb plugin: the same diagnoses, problems and
    counts as by C-FIND and C-MOVE, sourced by the server's address; ``since`` and ``studies``
    narrow the QIDO-RS query; ``shadow fetch --dicomweb`` writes them."""
    from shiftguard.cli import main

    url = archive.orthanc.dicomweb_url
    netloc = url.split("/")[2]
    diagnoses, problems, stats = fetch_reports_dicomweb(url)
    expected = [d for reports in archive.expected.values() for d in reports]
    assert sorted(diagnoses) == sorted(expected)
    assert {d.source for d in diagnoses} == {
        archive.sources[d].replace("pacs:ORTHANC", f"dicomweb:{netloc}") for d in expected
    }
    assert [p.source for p in problems] == [f"dicomweb:{netloc}/{archive.malformed}"]
    assert (stats.series_found, stats.instances_retrieved) == (5, 5)
    assert (stats.verified_reports, stats.skipped_unverified, stats.problems) == (3, 1, 1)

    recent, _, stats = fetch_reports_dicomweb(url, since="2024-01-01")
    assert {d.study_uid for d in recent} == {archive.recent} and stats.skipped_unverified == 1
    old, _, stats = fetch_reports_dicomweb(url, studies=[archive.old, archive.unreported])
    assert sorted(old) == archive.expected[archive.old] and stats.series_found == 2

    monkeypatch.chdir(Path(__file__).resolve().parents[3])  # the project's conf/
    out = tmp_path / "dicomweb.jsonl"
    assert main(["shadow", "fetch", "--dicomweb", url, "--out", str(out)]) == 0
    assert sorted(read_diagnoses(out)[0]) == sorted(expected)


def test_an_unreachable_dicomweb_server_is_named() -> None:
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    with pytest.raises(PacsError, match=re.escape(f"cannot reach DICOMweb {url}")):
        fetch_reports_dicomweb(url)
    with pytest.raises(PacsError, match="in clear"):
        fetch_reports_dicomweb("http://10.1.2.3/dicom-web", token_env="PACS_TOKEN")


def test_an_unreachable_pacs_is_named() -> None:
    pacs = Pacs("127.0.0.1", free_port(), "ORTHANC")  # nothing listens there
    with pytest.raises(PacsError, match=re.escape(f"cannot reach PACS {pacs}")):
        fetch_reports(pacs, retrieve="get", timeout=5)


@pytest.mark.integration
@needs_orthanc
def test_a_pacs_that_does_not_know_our_ae_says_so(archive: Archive) -> None:
    with pytest.raises(PacsError, match="the PACS must know AE 'STRANGER'") as caught:
        fetch_reports(archive.pacs, ae_title="STRANGER", move_port=free_port(), timeout=5)
    assert str(archive.pacs) in str(caught.value)


@pytest.mark.integration
@needs_orthanc
def test_a_c_move_the_pacs_cannot_deliver_names_the_destination(archive: Archive) -> None:
    elsewhere = free_port()  # Orthanc sends to archive.move_port, where nobody listens now
    with pytest.raises(PacsError, match="C-MOVE of series") as caught:
        fetch_reports(archive.pacs, move_port=elsewhere, timeout=10)
    assert f"must know AE 'SHIFTGUARD' at 127.0.0.1:{elsewhere}" in str(caught.value)


def test_a_rejected_association_is_named() -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    scp = AE("REALPACS")
    scp.require_called_aet = True  # rejects an association called anything else
    scp.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    server = scp.start_server(("127.0.0.1", 0), block=False)
    try:
        pacs = Pacs("127.0.0.1", server.server_address[1], "WRONGAE")
        with pytest.raises(PacsError, match="rejected the association") as caught:
            fetch_reports(pacs, retrieve="get", timeout=5)
        assert str(caught.value).startswith(f"PACS {pacs} rejected the association from AE ")
        assert "Called AE title not recognised" in str(caught.value)
    finally:
        server.shutdown()


def test_fetch_arguments_are_checked_before_connecting() -> None:
    pacs = Pacs("127.0.0.1", 9, "ORTHANC")
    with pytest.raises(PacsError, match="needs move_port"):
        fetch_reports(pacs)
    with pytest.raises(PacsError, match="since '01/02/2024'"):
        fetch_reports(pacs, retrieve="get", since="01/02/2024")
    with pytest.raises(PacsError, match=re.escape("'1.2.x' not DICOM UIDs")):
        fetch_reports(pacs, retrieve="get", studies=["1.2.3", "1.2.x"])
    with pytest.raises(PacsError, match="retrieve 'copy'"):
        fetch_reports(pacs, retrieve="copy")  # type: ignore[arg-type]


@contextmanager
def dcmqrscp(
    folder: Path, host: str, destinations: dict[str, tuple[str, int]] | None = None
) -> Iterator[Pacs]:
    """dcmtk's archive (AE ``QRSCP``, storage in ``folder/db``) reached at ``host``; it sends a
    C-MOVE to an AE of ``destinations`` (AE title -> host, port) and to no other."""
    port = free_port()
    (folder / "db").mkdir()
    hosts = "".join(
        f"{ae.lower()} = ({ae}, {h}, {p})\n" for ae, (h, p) in (destinations or {}).items()
    )
    (folder / "qr.cfg").write_text(
        f"NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 4\n"
        f"HostTable BEGIN\n{hosts}HostTable END\nVendorTable BEGIN\nVendorTable END\n"
        f"AETable BEGIN\nQRSCP {folder / 'db'} RW (10, 16mb) ANY\nAETable END\n"
    )
    proc = subprocess.Popen(
        [tool("dcmqrscp"), "-c", str(folder / "qr.cfg")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection((host, port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield Pacs(host, port, "QRSCP")
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.integration
@pytest.mark.peers("dcmqrscp", "storescu")
def test_another_pacs_dcmtk_dcmqrscp_answers_too(tmp_path: Path) -> None:
    """dcmtk's archive: C-GET gives the report; C-MOVE to an AE it does not know is refused with
    'move destination unknown' (Orthanc answers a bare failure)."""
    image = pydicom.dcmread(study(tmp_path / "img", "20240301", "P1")[0])
    report = write_report_sr(image, 1, "Smith^Jane", "2024-03-02T09:30:00Z", tmp_path / "r.dcm")
    with dcmqrscp(tmp_path, "127.0.0.1") as pacs:
        sent = storescu(pacs.port, [tmp_path / "r.dcm"], called="QRSCP")
        assert sent.returncode == 0, sent.stderr

        diagnoses, problems, _ = fetch_reports(pacs, retrieve="get", timeout=5)
        assert diagnoses == [
            Diagnosis(image.StudyInstanceUID, "2024-03-02T09:30:00Z", "Smith^Jane", 1)
        ]
        assert diagnoses[0].source == f"pacs:QRSCP/{report.SOPInstanceUID}" and problems == []

        elsewhere = free_port()
        with pytest.raises(PacsError, match="does not know the C-MOVE destination") as caught:
            fetch_reports(pacs, move_port=elsewhere, timeout=5)
        assert f"must know AE 'SHIFTGUARD' at 127.0.0.1:{elsewhere}" in str(caught.value)


@pytest.mark.integration
@pytest.mark.peers("dcmqrscp", "storescu")
def test_c_move_reaches_us_on_another_host_from_flag_and_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A remote PACS (dcmqrscp on 127.0.0.2) sends the C-MOVE to the address it knows for our AE
    (127.0.0.3, not where we connect from): fetch_reports, the --move-host flag and the
    shadow.pacs config each make us listen there, and the reports arrive."""
    from shiftguard.cli import main

    move_port = free_port()
    image = pydicom.dcmread(study(tmp_path / "img", "20240301", "P1")[0])
    write_report_sr(image, 1, "Smith^Jane", "2024-03-02T09:30:00Z", tmp_path / "r.dcm")
    with dcmqrscp(tmp_path, "127.0.0.2", {"SHIFTGUARD": ("127.0.0.3", move_port)}) as pacs:
        port = pacs.port
        sent = storescu(port, [tmp_path / "r.dcm"], called="QRSCP", host="127.0.0.2")
        assert sent.returncode == 0, sent.stderr
        expected = [Diagnosis(image.StudyInstanceUID, "2024-03-02T09:30:00Z", "Smith^Jane", 1)]

        with pytest.raises(PacsError, match=r"127\.0\.0\.1"):  # the default: not where it sends
            fetch_reports(pacs, move_port=move_port, timeout=5)
        diagnoses, problems, _ = fetch_reports(
            pacs, move_host="127.0.0.3", move_port=move_port, timeout=5
        )
        assert diagnoses == expected and problems == []

        monkeypatch.chdir(Path(__file__).resolve().parents[3])  # the project's conf/
        address = f"QRSCP@127.0.0.2:{port}"
        flag, config = tmp_path / "flag.jsonl", tmp_path / "config.jsonl"
        assert main(["shadow", "fetch", "--pacs", address, "--move-host", "127.0.0.3",
                     "--move-port", str(move_port), "--out", str(flag)]) == 0  # fmt: skip
        assert main(["shadow", "fetch", "--out", str(config), f"shadow.pacs.address={address}",
                     "shadow.pacs.move_host=127.0.0.3",
                     f"shadow.pacs.move_port={move_port}"]) == 0  # fmt: skip
        for out in (flag, config):
            assert read_diagnoses(out)[0] == expected, out


@pytest.mark.integration
@needs_orthanc
def test_the_commands_take_their_diagnoses_from_the_pacs(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from shiftguard.cli import main
    from shiftguard.shadow.diagnoses import read_diagnoses

    monkeypatch.chdir(Path(__file__).resolve().parents[3])  # the project's conf/
    pacs = f"ORTHANC@127.0.0.1:{archive.orthanc.dicom}"
    assert main(["shadow", "fetch", "--pacs", pacs, "--retrieve", "get",
                 "--out", str(tmp_path / "d.jsonl")]) == 0  # fmt: skip
    fetched, bad = read_diagnoses(tmp_path / "d.jsonl")
    assert not bad and sorted(fetched) == sorted(
        d for reports in archive.expected.values() for d in reports
    )
    log = tmp_path / "results.csv"
    log.write_text(
        "study_uid,series_uid,probability,threshold,model,model_version\n"
        + "".join(f"{u},1.{i},0.{i + 3},0.5,m,1\n" for i, u in
                  enumerate((archive.recent, archive.old, archive.unreported)))
    )  # fmt: skip
    out = tmp_path / "report"
    assert main(["shadow", "evaluate", "--log", str(log), "--pacs", pacs, "--move-port",
                 str(archive.move_port), "--out", str(out), "--no-mlflow"]) == 0  # fmt: skip
    champion = json.loads((out / "summary.json").read_text())["roles"]["champion"]
    assert (champion["predictions"], champion["judged"], champion["pending"]) == (3, 2, 1)
    assert champion["positive"] == 1  # the old study; the recent one's latest report says absent
