"""EHR messages: HL7 v2.5.1 ORU^R01 and order priority updates over MLLP, FHIR R4
DiagnosticReport + Observation and ServiceRequest priority, checked with maintained libraries
(hl7apy strict, python-hl7, fhir.resources) and delivered by the edge service to an MLLP listener
and a FHIR endpoint on loopback (tests/ehr_peers.py) beside a real Orthanc PACS."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import hl7
import pydicom
import pytest
from ehr_peers import FhirServer, MllpListener, validate_fhir, validate_hl7
from pydantic import ValidationError

from shiftguard.config import EdgeConfig
from shiftguard.config.deploy import EdgeDestination
from shiftguard.edge.ehr import (
    ResultFacts,
    StudyFacts,
    control_id,
    fhir_priority_update,
    fhir_report,
    hl7_order_priority,
    hl7_oru,
    study_facts,
)
from shiftguard.edge.fhir import FhirClient, FhirError
from shiftguard.edge.mllp import MllpError, send
from shiftguard.edge.queue import WorkQueue
from shiftguard.edge.service import Service
from shiftguard.peers import Orthanc, free_port, storescu

from .conftest import make_bundle, wait_until

STUDY = StudyFacts(
    study_uid="1.2.826.0.1.3680043.8.498.1",
    patient_id="MRN-0042",
    issuer="HOSP_A",
    patient_name="Müller^Anna^Maria^Dr^PhD",
    birth_date="19610304",
    sex="F",
    accession="ACC|7^1",  # delimiters that must be escaped
    study_datetime="20261130143000",
)
POSITIVE = ResultFacts("1.2.3.9", "2.25.1234", 0.91, 0.5, "shiftguard-classifier", "4", urgent=True)
NEGATIVE = ResultFacts("1.2.3.9", "2.25.5678", 0.12, 0.5, "shiftguard-classifier", "4")


def _segment(message: str, name: str) -> Any:
    return hl7.parse(message).segment(name)


def test_the_oru_validates_and_says_what_the_result_is() -> None:
    message = hl7_oru(STUDY, POSITIVE, "site-a", ("EHR", "HOSP"), now=0.0)
    validate_hl7(message)  # hl7apy strict (ORU_R01 2.5.1) and python-hl7
    parsed = hl7.parse(message)
    msh, pid, obr, tq1 = (parsed.segment(s) for s in ("MSH", "PID", "OBR", "TQ1"))
    assert str(msh[9]) == "ORU^R01^ORU_R01" and str(msh[12]) == "2.5.1"
    assert str(msh[10]) == control_id("ORU^R01:2.25.1234")
    assert (str(msh[5]), str(msh[6])) == ("EHR", "HOSP")
    assert str(pid[3]) == "MRN-0042^^^HOSP_A" and str(pid[8]) == "F"
    assert str(pid[5]) == "Müller^Anna^Maria^PhD^Dr"  # XPN: family, given, middle, suffix, prefix
    assert parsed.unescape(str(obr[18])) == "ACC|7^1" and str(obr[25]) == "P"  # preliminary
    assert str(tq1[9]) == "S^Stat^HL70485"
    values = {str(s[3][0][0]): parsed.unescape(str(s[5])) for s in parsed.segments("OBX")}
    assert values["52988006"] == "52101004^Present^SCT"
    assert float(values["122157"]) == pytest.approx(0.91) and float(values["122411"]) == 0.5
    assert values["111001"] == "shiftguard-classifier" and values["111003"] == "4"
    assert values["110180"] == STUDY.study_uid
    assert {str(s[11]) for s in parsed.segments("OBX")} == {"P"}
    assert str(parsed.segments("OBX")[0][8]) == "A"  # abnormal

    routine = hl7.parse(hl7_oru(STUDY, NEGATIVE, "site-a"))
    assert str(routine.segment("TQ1")[9]) == "R^Routine^HL70485"
    assert str(routine.segments("OBX")[0][5]) == "272519000^Absent^SCT"
    assert str(routine.segment("MSH")[10]) != str(msh[10])


@pytest.mark.parametrize("kind", ["OMI^O23", "ORM^O01"])
def test_a_priority_update_validates_and_asks_for_stat(kind: str) -> None:
    message = hl7_order_priority(kind, STUDY, "site-a", ("RIS", "HOSP"))
    validate_hl7(message)
    parsed = hl7.parse(message)
    assert str(parsed.segment("ORC")[1]) == "XO"  # change order request
    assert parsed.unescape(str(parsed.segment("ORC")[3])) == "ACC|7^1"  # the filler's number
    if kind == "OMI^O23":
        assert str(parsed.segment("TQ1")[9]).startswith("S^")
        assert str(parsed.segment("IPC")[3]) == STUDY.study_uid
    else:
        assert str(parsed.segment("ORC")[7]).split("^")[5] == "S"
        assert str(parsed.segment("OBR")[27]).split("^")[5] == "S"
    assert str(parsed.segment("MSH")[10]) == control_id(f"{kind}:{STUDY.study_uid}")


def test_the_fhir_report_validates_and_references_the_imaging_study() -> None:
    bundle = fhir_report(STUDY, POSITIVE, "site-a", now=0.0)
    validate_fhir(bundle)
    observation, report = (validate_fhir(e["resource"]) for e in bundle["entry"])
    assert report.status == "preliminary" and observation.status == "preliminary"
    assert report.imagingStudy[0].identifier.value == f"urn:oid:{STUDY.study_uid}"
    assert report.result[0].reference == f"Observation/{observation.id}"
    assert report.basedOn[0].identifier.value == "ACC|7^1"
    assert report.subject.identifier.value == "MRN-0042"
    assert observation.valueCodeableConcept.coding[0].code == "52101004"
    assert observation.interpretation[0].coding[0].code == "A"
    components = {c.code.coding[0].code: c.valueQuantity.value for c in observation.component}
    assert float(components["122157"]) == pytest.approx(0.91)
    assert float(components["122411"]) == 0.5
    assert str(report.effectiveDateTime).startswith("2026-11-30")
    assert "urgent" in report.conclusion
    again = fhir_report(STUDY, POSITIVE, "site-a", now=100.0)
    assert [e["request"] for e in again["entry"]] == [e["request"] for e in bundle["entry"]]
    other = fhir_report(STUDY, NEGATIVE, "site-a")
    assert other["entry"][0]["request"] != bundle["entry"][0]["request"]
    validate_fhir(other)


# MLLP --------------------------------------------------------------------------------------------


@pytest.fixture
def listener() -> Any:
    server = MllpListener(free_port()).start()
    yield server
    server.stop()


def test_mllp_send_is_acknowledged_and_a_nack_is_an_error(listener: MllpListener) -> None:
    message = hl7_oru(STUDY, POSITIVE, "site-a")
    control = control_id("ORU^R01:2.25.1234")
    listener.nack = 1
    with pytest.raises(MllpError, match="negative acknowledgement AE"):
        send("127.0.0.1", listener.port, message, control, timeout_s=5)
    reply = send("127.0.0.1", listener.port, message, control, timeout_s=5)
    assert "MSA|AA|" + control in reply
    assert list(listener.accepted) == [control] and listener.invalid == []
    with pytest.raises(MllpError, match="acknowledges"):  # the reply is for another message
        send("127.0.0.1", listener.port, message, "SGOTHER", timeout_s=5)


def test_mllp_send_to_a_closed_port_or_a_silent_peer_is_an_error() -> None:
    message = hl7_oru(STUDY, POSITIVE, "site-a")
    with pytest.raises(MllpError, match="ConnectionRefused"):
        send("127.0.0.1", free_port(), message, "X", timeout_s=5)
    server = socket.create_server(("127.0.0.1", 0))  # reads the message, closes without a word

    def close_after_reading() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        conn.close()

    threading.Thread(target=close_after_reading, daemon=True).start()
    try:
        with pytest.raises(MllpError, match="closed the connection"):
            send("127.0.0.1", server.getsockname()[1], message, "X", timeout_s=5)
    finally:
        server.close()


# FHIR --------------------------------------------------------------------------------------------


@pytest.fixture
def fhir_server() -> Any:
    server = FhirServer(free_port(), token="fhir-token").start()
    yield server
    server.stop()


def _fhir_destination(server: FhirServer, **extra: Any) -> EdgeDestination:
    return EdgeDestination(
        name="fhir", kind="fhir", url=server.url, token_env="FHIR_TOKEN", **extra
    )  # fmt: skip


ORDER = {
    "resourceType": "ServiceRequest",
    "id": "order-1",
    "status": "active",
    "intent": "order",
    "priority": "routine",
    "subject": {"reference": "Patient/p1"},
    "identifier": [{"value": "ACC|7^1"}],
}


def test_fhir_transaction_and_priority_update(
    fhir_server: FhirServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FHIR_TOKEN", "fhir-token")
    client = FhirClient(_fhir_destination(fhir_server))
    bundle = fhir_report(STUDY, POSITIVE, "site-a")
    client.transaction(bundle)
    client.transaction(bundle)  # sent again: the same two resources, updated, not copied
    assert len(fhir_server.of_type("DiagnosticReport")) == 1
    assert len(fhir_server.of_type("Observation")) == 1 and fhir_server.invalid == []
    fhir_server.fail = 1
    with pytest.raises(FhirError, match="HTTP 503"):
        client.transaction(bundle)

    with pytest.raises(FhirError, match="0 ServiceRequests") as missing:
        client.raise_priority(STUDY.accession)
    assert missing.value.permanent
    fhir_server.add(ORDER)
    assert client.raise_priority(fhir_priority_update(STUDY)["accession"]) is True
    [order] = fhir_server.of_type("ServiceRequest")
    assert order["priority"] == "stat" and order["meta"]["versionId"] == "2"
    assert client.raise_priority(STUDY.accession) is False  # already stat: nothing written

    monkeypatch.setenv("FHIR_TOKEN", "wrong")
    with pytest.raises(FhirError, match="HTTP 401"):
        FhirClient(_fhir_destination(fhir_server)).transaction(bundle)


# configuration -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("destination", "message"),
    [
        ({"name": "ehr", "kind": "hl7-mllp", "url": "https://x"}, "url is for"),
        ({"name": "f", "kind": "fhir"}, "needs url"),
        ({"name": "ehr", "kind": "hl7-mllp", "priority_update": "ServiceRequest"}, "does not go"),
        ({"name": "f", "kind": "fhir", "url": "https://x", "priority_update": "OMI^O23"}, "not go"),
        ({"name": "p", "ae_title": "P", "priority_update": "ORM^O01"}, "does not go by dimse"),
    ],
)
def test_an_ehr_destination_missing_what_its_kind_needs_is_a_config_error(
    destination: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        EdgeConfig(destinations=[destination])


def test_urgent_deliveries_go_first(tmp_path: Path) -> None:
    queue = WorkQueue(tmp_path / "queue.db")
    queue.record_instance("1.1", "study", "series", "/f", "MODALITY")
    queue.mark_ready(["study"])
    assert queue.claim_study() == "study"
    queue.finish_study("study", [("ehr", "a", "/a"), ("ehr", "b", "/b", True), ("ehr", "c", "/c")])
    assert [d.sop_uid for d in queue.due("ehr")] == ["b", "a", "c"]
    assert [d.urgent for d in queue.due("ehr")] == [True, False, False]
    queue.close()


# the service -------------------------------------------------------------------------------------

pacs_peers = pytest.mark.peers("Orthanc", "storescu")


@pytest.fixture(scope="module")
def positive_bundle(
    tmp_path_factory: pytest.TempPathFactory, tiny: dict[str, Any], onnx_model: bytes
) -> Path:
    """The test model with operating threshold 0: every result is a present finding."""
    return make_bundle(
        tmp_path_factory.mktemp("positive"), tiny, onnx_model, version="9", threshold=0.0
    )


def _study(cohort: Path, k: int = 0) -> tuple[list[Path], str]:
    study = sorted(sorted(cohort.iterdir())[k].iterdir())[0]
    files = sorted(study.rglob("*.dcm"))
    return files, str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _settings(tmp_path: Path, bundle: Path, destinations: list[dict[str, Any]], **kw: Any) -> Any:
    return EdgeConfig(
        bundle=str(bundle),
        storage=str(tmp_path / "edge"),
        port=0,
        http_port=0,
        calling_ae_titles=["MODALITY"],
        destinations=destinations,
        retry_base_s=0.2,
        retry_max_s=0.5,
        **{"shadow": False, **kw},
    )


def _ehr(listener: MllpListener, fhir: FhirServer, role: str = "clinical") -> list[dict[str, Any]]:
    return [
        {"name": "ehr", "kind": "hl7-mllp", "port": listener.port, "role": role,
         "receiving_application": "EHR", "priority_update": "OMI^O23"},
        {"name": "fhir", "kind": "fhir", "url": fhir.url, "role": role,
         "priority_update": "ServiceRequest"},
    ]  # fmt: skip


@pacs_peers
def test_a_clinical_result_reaches_the_pacs_and_the_ehr_by_hl7_and_fhir(
    tmp_path: Path, positive_bundle: Path, cohort: Path
) -> None:
    """A site wired to a PACS by DIMSE, an EHR by HL7 v2 over MLLP and a FHIR server: an urgent
    result goes to all three, its messages validate, carry the patient and study of the images,
    and raise the order's priority (OMI^O23 to the HL7 side, ServiceRequest.priority by FHIR)."""
    pacs = Orthanc(tmp_path / "pacs")
    pacs.start()
    listener = MllpListener(free_port()).start()
    fhir = FhirServer(free_port()).start()
    files, uid = _study(cohort)
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    fhir.add({**ORDER, "identifier": [{"value": str(source.AccessionNumber)}]})
    destinations = [{"name": "pacs", "ae_title": "ORTHANC", "port": pacs.dicom}]
    service = Service(
        _settings(tmp_path, positive_bundle, destinations + _ehr(listener, fhir),
                  urgency_threshold=0.0)
    )  # fmt: skip
    service.start()
    try:
        assert storescu(service.receiver.port, files).returncode == 0
        wait_until(lambda: service.health().get("deliveries_sent", 0) == 6)  # 2 + ORU + OMI + 2
        assert pacs.studies() == {uid: 2}
        [oru] = listener.of_type("ORU^R01")
        [omi] = listener.of_type("OMI^O23")
        assert listener.invalid == [] and not listener.repeats
        pid = _segment(oru, "PID")
        assert str(pid[3]).split("^")[0] == str(source.PatientID)
        assert str(_segment(oru, "OBR")[18]) == str(source.AccessionNumber)
        assert str(_segment(oru, "TQ1")[9]).startswith("S^")
        assert str(_segment(omi, "IPC")[3]) == uid
        [report] = fhir.of_type("DiagnosticReport")
        assert report["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{uid}"
        assert len(fhir.of_type("Observation")) == 1 and fhir.invalid == []
        assert fhir.of_type("ServiceRequest")[0]["priority"] == "stat"
        sr = next((Path(service.settings.storage) / "results" / uid).glob("*_SR.dcm"))
        assert study_facts(sr).patient_id == str(source.PatientID)
    finally:
        service.stop()
        listener.stop()
        fhir.stop()
        pacs.stop()


@pacs_peers
def test_shadow_mode_sends_nothing_to_a_clinical_ehr(
    tmp_path: Path, positive_bundle: Path, cohort: Path
) -> None:
    """In shadow mode an urgent result reaches a research HL7 receiver, never the clinical ones
    (HL7 or FHIR), and no priority update is sent to a clinical system."""
    clinical = MllpListener(free_port()).start()
    research = MllpListener(free_port()).start()
    fhir = FhirServer(free_port()).start()
    destinations = [
        *_ehr(clinical, fhir),
        {"name": "registry", "kind": "hl7-mllp", "port": research.port, "role": "research"},
    ]
    service = Service(
        _settings(tmp_path, positive_bundle, destinations, shadow=True, urgency_threshold=0.0)
    )
    service.start()
    try:
        files, _ = _study(cohort)
        assert storescu(service.receiver.port, files).returncode == 0
        wait_until(lambda: len(research.accepted) == 1)
        time.sleep(1.0)  # anything queued for the clinical ones would be sent by now
        assert clinical.received == [] and fhir.requests == []
        assert service.health().get("deliveries_sent") == 1
        assert service.health().get("deliveries_pending", 0) == 0
    finally:
        service.stop()
        for peer in (clinical, research, fhir):
            peer.stop()


@pacs_peers
def test_an_ehr_that_is_down_or_says_no_gets_every_message_once(
    tmp_path: Path, positive_bundle: Path, cohort: Path
) -> None:
    """The MLLP listener's port is closed at first, then it answers AE twice; the FHIR endpoint
    answers 503 three times: every message is retried until it is accepted, and each is accepted
    once (the receiver sees no repeat: a message is resent only when it was not acknowledged)."""
    listener = MllpListener(free_port())  # not listening yet
    fhir = FhirServer(free_port()).start()
    fhir.fail = 3
    service = Service(_settings(tmp_path, positive_bundle, _ehr(listener, fhir)))
    service.start()
    try:
        for k in (0, 1):
            assert storescu(service.receiver.port, _study(cohort, k)[0]).returncode == 0
        wait_until(lambda: service.count("send_failures") >= 4)
        listener.nack = 2
        listener.start()
        wait_until(lambda: service.health().get("deliveries_sent", 0) == 4)
        time.sleep(1.0)
        assert len(listener.accepted) == 2 and not listener.repeats and listener.invalid == []
        assert len(listener.received) == 4  # two refused with AE, then each once
        assert len(fhir.of_type("DiagnosticReport")) == 2
        assert sum(fhir.writes.values()) == 4  # two reports and two observations, written once
        assert service.health().get("deliveries_pending", 0) == 0
    finally:
        service.stop()
        listener.stop()
        fhir.stop()


@pytest.mark.peers("storescu")
def test_an_urgent_study_without_an_accession_number_gets_its_results_but_no_order_update(
    tmp_path: Path, positive_bundle: Path, cohort: Path
) -> None:
    """The order an update would change is named by the accession number: without one, the ORU
    and the FHIR report go as usual and no priority update is sent (nor retried forever)."""
    from shiftguard.peers import copy_study

    source = sorted(sorted(cohort.iterdir())[0].iterdir())[0]
    [study] = copy_study(source, tmp_path / "copy", 1)
    files = sorted(study.iterdir())
    for f in files:
        ds = pydicom.dcmread(f)
        ds.AccessionNumber = ""
        ds.save_as(f)
    listener = MllpListener(free_port()).start()
    fhir = FhirServer(free_port()).start()
    service = Service(
        _settings(tmp_path, positive_bundle, _ehr(listener, fhir), urgency_threshold=0.0)
    )
    service.start()
    try:
        assert storescu(service.receiver.port, files).returncode == 0
        wait_until(lambda: service.health().get("deliveries_sent", 0) == 2)
        time.sleep(0.5)
        assert [str(_segment(m, "MSH")[9]) for m in listener.accepted.values()] == [
            "ORU^R01^ORU_R01"
        ]
        assert len(fhir.of_type("DiagnosticReport")) == 1
        assert [m for m, _ in fhir.requests if m == "GET"] == []  # no order looked for
        assert service.health().get("deliveries_pending", 0) == 0
    finally:
        service.stop()
        listener.stop()
        fhir.stop()


class _PrioritySCP:
    """A Storage SCP (pynetdicom) that notes each C-STORE's priority and SOP class."""

    def __init__(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.seen: list[tuple[str, int]] = []
        ae = AE(ae_title="PRIORITY")
        ae.supported_contexts = AllStoragePresentationContexts

        def on_store(event: Any) -> int:
            self.seen.append((str(event.request.AffectedSOPClassUID), int(event.request.Priority)))
            return 0x0000

        self.server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
        )
        self.port = self.server.server_address[1]


@pytest.mark.peers("storescu")
@pytest.mark.parametrize("urgency", [0.0, None])
def test_an_urgent_result_is_c_stored_with_high_priority(
    tmp_path: Path, positive_bundle: Path, cohort: Path, urgency: float | None
) -> None:
    scp = _PrioritySCP()
    dest = [{"name": "pacs", "ae_title": "PRIORITY", "port": scp.port}]
    service = Service(_settings(tmp_path, positive_bundle, dest, urgency_threshold=urgency))
    service.start()
    try:
        assert storescu(service.receiver.port, _study(cohort)[0]).returncode == 0
        wait_until(lambda: len(scp.seen) == 2)
        assert {p for _, p in scp.seen} == {1 if urgency is not None else 0}  # HIGH or MEDIUM
    finally:
        service.stop()
        scp.server.shutdown()


@pytest.mark.peers("openssl")
def test_mllp_over_tls_checks_the_receiver_and_shows_our_certificate(
    tmp_path: Path, listener: MllpListener
) -> None:
    """The HL7 receiver behind TLS that requires a client certificate: with ``ca``, ``cert`` and
    ``key`` the message is accepted; without our certificate the handshake fails and nothing
    arrives; a server certificate not signed by ``ca`` is refused by us."""
    from tls_certs import TlsFront, self_signed

    from shiftguard.tls import client_context

    server, client = self_signed(tmp_path, "server"), self_signed(tmp_path, "client")
    other = self_signed(tmp_path, "other")
    front = TlsFront(listener.port, server, client[0])
    message = hl7_oru(STUDY, POSITIVE, "site-a")
    control = control_id("ORU^R01:2.25.1234")
    try:
        ours = client_context(str(server[0]), str(client[0]), str(client[1]))
        send("127.0.0.1", front.port, message, control, timeout_s=5, context=ours)
        assert list(listener.accepted) == [control]
        for context in (client_context(str(server[0])), client_context(str(other[0]))):
            with pytest.raises(MllpError):
                send("127.0.0.1", front.port, message, control, timeout_s=5, context=context)
        assert len(listener.received) == 1
    finally:
        front.close()


@pacs_peers
def test_edge_check_reaches_each_destination_and_names_the_one_it_cannot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``edge check`` on a site file with a destination of each kind: C-ECHO to Orthanc, QIDO-RS
    to its DICOMweb plugin, a TCP connection to the HL7 listener (which receives nothing), FHIR
    metadata; a PACS that is not listening makes it exit 1 naming it."""
    import yaml

    from shiftguard.cli import main

    pacs = Orthanc(tmp_path / "pacs", dicomweb=True)
    pacs.start()
    listener = MllpListener(free_port()).start()
    fhir = FhirServer(free_port(), token="t0ken").start()
    monkeypatch.setenv("FHIR_TOKEN", "t0ken")
    destinations = [
        {"name": "pacs", "ae_title": "ORTHANC", "port": pacs.dicom},
        {"name": "vna", "kind": "stow-rs", "url": pacs.dicomweb_url},
        {"name": "ehr", "kind": "hl7-mllp", "port": listener.port},
        {"name": "fhir", "kind": "fhir", "url": fhir.url, "token_env": "FHIR_TOKEN"},
    ]
    site = tmp_path / "site.yaml"
    try:
        site.write_text(yaml.safe_dump({"destinations": destinations}))
        assert main(["edge", "check", "--config", str(site)]) == 0
        out = capsys.readouterr().out
        assert [line.split()[:2] for line in out.splitlines()] == [
            ["ok", "pacs"], ["ok", "vna"], ["ok", "ehr"], ["ok", "fhir"]
        ]  # fmt: skip
        assert "C-ECHO 0x0000" in out and "FHIR 4.0.1" in out and "no message sent" in out
        assert listener.received == [] and fhir.resources == {}

        down = {"name": "old-pacs", "ae_title": "OLD", "port": free_port()}
        site.write_text(yaml.safe_dump({"destinations": [*destinations, down]}))
        monkeypatch.setenv("FHIR_TOKEN", "wrong")
        assert main(["edge", "check", "--config", str(site), "--timeout", "3"]) == 1
        lines = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()}
        assert lines["old-pacs"].startswith("FAIL") and "not established" in lines["old-pacs"]
        assert lines["fhir"].startswith("FAIL") and "401" in lines["fhir"]
        assert lines["pacs"].startswith("ok")
    finally:
        pacs.stop()
        listener.stop()
        fhir.stop()
