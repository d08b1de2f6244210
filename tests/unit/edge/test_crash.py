"""``edge serve`` killed with SIGKILL at known points, restarted, and checked in a real PACS.

The modality is dcmtk's ``storescu``, the PACS a real Orthanc, the service the real ``shiftguard
edge serve`` in a subprocess. To kill it at a known point rather than after a sleep, it is started
through :data:`PAUSING_SERVE`: the same command line with one method wrapped so that its call number
``k + 1`` writes a marker file and blocks; the test waits for the marker, so it knows exactly what
the service had done (``k`` instances acknowledged, a result computed but not queued, a C-STORE
acknowledged by the PACS but not recorded), and SIGKILLs it there (or, to let a modality's retry
arrive at a known moment, lets it go on).

Results are counted in Orthanc per *source* series, read from each SR's evidence references, not by
SOP instance UID: a result object has a deterministic UID, so Orthanc would silently keep one copy of
a result stored twice, and a result computed on a study cut short by the crash would hide behind the
UID of the complete one. So every SR is also checked to reference every instance of its source
series. Key images (which name no source series) are counted per study.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from ehr_peers import FhirServer, MllpListener
from peers_plugin import peer_missing

from shiftguard.peers import Orthanc, copy_study, find_tool, free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.peers("Orthanc", "storescu"),
    pytest.mark.slow(seconds=90),
]

REPO = Path(__file__).resolve().parents[3]
START_TIMEOUT_S = 60.0
WAIT_TIMEOUT_S = 40.0
SR, KEY_IMAGE = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7"

#: ``shiftguard edge serve`` with one method wrapped: ``SG_PAUSE_AT`` (``module:Class.method``) runs
#: ``SG_PAUSE_AFTER`` times as usual; the next calls write the file ``SG_PAUSE_MARK`` and block until
#: the file ``SG_PAUSE_RELEASE`` exists (never, if unset: until the process is killed). Everything
#: else in the service runs unchanged.
PAUSING_SERVE = """
import importlib, os, sys, threading, time
module, _, attribute = os.environ["SG_PAUSE_AT"].partition(":")
owner_name, _, method = attribute.partition(".")
owner = getattr(importlib.import_module(module), owner_name)
original, allowed, calls, lock = getattr(owner, method), int(os.environ["SG_PAUSE_AFTER"]), [0], threading.Lock()

def paused(*args, **kwargs):
    with lock:
        calls[0] += 1
        hold = calls[0] > allowed
    release = os.environ.get("SG_PAUSE_RELEASE", "")
    if hold:
        open(os.environ["SG_PAUSE_MARK"], "w").close()
    while hold and not (release and os.path.exists(release)):
        time.sleep(0.02)
    return original(*args, **kwargs)

setattr(owner, method, paused)
from shiftguard.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def storescu() -> str:
    """dcmtk's ``storescu`` (:func:`~shiftguard.peers.find_tool` passes over the one
    pynetdicom installs in the virtual environment)."""
    found = find_tool("storescu")
    if found is None:
        peer_missing("needs dcmtk's storescu: not installed (Debian package dcmtk)")
    return str(found)


def _wait(predicate: Callable[[], Any], what: str, timeout: float = WAIT_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _health(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return dict(json.loads(r.read()))
    except OSError:
        return None


class Edge:
    """``shiftguard edge serve`` in a subprocess on fixed ports and storage, started and killed at
    will (the ports and the storage survive a restart, as on a real site)."""

    def __init__(self, tmp_path: Path, bundle: Path, orthanc: Orthanc) -> None:
        self.storage = tmp_path / "edge"
        self.port, self.http = free_port(), free_port()
        self.mark, self.release = tmp_path / "paused", tmp_path / "released"
        self.log = tmp_path / "serve.log"
        self.stability_s = 30.0  # longer than any test waits: a study is ready on its release
        self.args = [
            "edge", "serve", f"edge.bundle={bundle}", f"edge.storage={self.storage}",
            f"edge.port={self.port}", f"edge.http_port={self.http}", "edge.shadow=false",
            "edge.retry_base_s=0.2", "edge.retry_max_s=1", "edge.calling_ae_titles=[MODALITY]",
            f"edge.destinations=[{{name:pacs,ae_title:ORTHANC,host:127.0.0.1,port:{orthanc.dicom}}}]",
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, pause_at: str | None = None, after: int = 0, hold: bool = False) -> None:
        """Start the service; with ``pause_at``, the wrapped one (see :data:`PAUSING_SERVE`),
        held until killed or, with ``hold``, until :meth:`go_on`."""
        env = dict(os.environ)
        args = [*self.args, f"edge.stability_s={self.stability_s}"]
        if pause_at is None:
            command = [sys.executable, "-m", "shiftguard.cli", *args]
        else:
            command = [sys.executable, "-c", PAUSING_SERVE, *args]
            env |= {"SG_PAUSE_AT": pause_at, "SG_PAUSE_AFTER": str(after)}
            env["SG_PAUSE_MARK"] = str(self.mark)
            if hold:
                env["SG_PAUSE_RELEASE"] = str(self.release)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=out)
        _wait(self.healthy, "the service to answer /healthz", START_TIMEOUT_S)

    def healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"edge serve exited {self.proc.returncode}:\n{self.tail()}")
        return _health(self.http) is not None

    def counts(self) -> dict[str, Any]:
        return _health(self.http) or {}

    def wait_paused(self) -> None:
        _wait(self.mark.exists, "the service to reach the point where it is killed")

    def go_on(self) -> None:
        self.release.touch()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(30) == -signal.SIGKILL
        self.proc = None
        self.mark.unlink(missing_ok=True)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
            self.proc = None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Read the service's queue (SQLite, WAL: readable while it runs)."""
        db = sqlite3.connect(self.storage / "queue.db", timeout=30)
        try:
            return [tuple(r) for r in db.execute(sql).fetchall()]
        finally:
            db.close()


@pytest.fixture
def edge(tmp_path: Path, bundle_path: Path, orthanc: Orthanc) -> Iterator[Edge]:
    service = Edge(tmp_path, bundle_path, orthanc)
    yield service
    if service.proc is not None:
        service.stop()


def _storescu(storescu: str, port: int, files: list[Path]) -> subprocess.Popen[str]:
    """A modality sending ``files`` over one association (in the background)."""
    command = [storescu, "-aet", "MODALITY", "-aec", "SHIFTGUARD", "127.0.0.1", str(port)]
    return subprocess.Popen(
        [*command, *map(str, files)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TCP_NODELAY": "1"},
    )


def _send(storescu: str, port: int, files: list[Path]) -> None:
    proc = _storescu(storescu, port, files)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out


def _studies(cohort: Path, tmp_path: Path, n: int) -> list[list[Path]]:
    """``n`` distinct copies of the cohort's first study: each one's files, in sending order."""
    source = sorted(next(cohort.iterdir()).iterdir())[0]
    return [sorted(s.rglob("*.dcm")) for s in copy_study(source, tmp_path / "studies", n)]


def results_in_pacs(orthanc: Orthanc) -> tuple[dict[str, list[Any]], dict[str, list[int]]]:
    """What Orthanc holds, as Orthanc groups it (its own series, however their UIDs were made).

    Returns ``(srs, key_images)``. ``srs`` maps each *source* series UID, read from the SR's evidence
    (Current Requested Procedure Evidence Sequence), to one entry per SR series that refers to it:
    the set of source SOP instance UIDs each of its SRs refers to, in Instance Number order.
    ``key_images`` maps each study UID to the instance count of each of its key image series (a
    Secondary Capture names no source series)."""
    srs: dict[str, list[Any]] = {}
    key_images: dict[str, list[int]] = {}
    for series in orthanc.get("/series?expand"):
        instances = [orthanc.get(f"/instances/{i}/tags?simplify") for i in series["Instances"]]
        tags = instances[0]
        if tags["SOPClassUID"] == KEY_IMAGE:
            key_images.setdefault(tags["StudyInstanceUID"], []).append(len(instances))
            continue
        assert tags["SOPClassUID"] == SR, f"an object that is not a result in the PACS: {tags}"
        by_source: dict[str, list[set[str]]] = {}
        for sr in sorted(instances, key=lambda t: int(t["InstanceNumber"])):
            refs: dict[str, set[str]] = {}
            for study in sr.get("CurrentRequestedProcedureEvidenceSequence", []):
                for ref in study.get("ReferencedSeriesSequence", []):
                    sops = {r["ReferencedSOPInstanceUID"] for r in ref["ReferencedSOPSequence"]}
                    refs.setdefault(ref["SeriesInstanceUID"], set()).update(sops)
            assert refs, f"an SR in the PACS that names no source series: {sr['SOPInstanceUID']}"
            for source, sops in refs.items():
                by_source.setdefault(source, []).append(sops)
        for source, versions in by_source.items():
            srs.setdefault(source, []).append(versions)
    return srs, key_images


def _source(files: list[Path]) -> tuple[str, dict[str, set[str]]]:
    """A study's UID and its series: series UID -> SOP instance UIDs."""
    series: dict[str, set[str]] = {}
    for f in files:
        h = pydicom.dcmread(f, stop_before_pixels=True)
        series.setdefault(str(h.SeriesInstanceUID), set()).add(str(h.SOPInstanceUID))
    return str(h.StudyInstanceUID), series


def assert_each_result_once(orthanc: Orthanc, sent: list[list[Path]]) -> None:
    """For every study in ``sent`` (its files): each of its series has exactly one SR series holding
    one SR in the PACS, referring to every instance of that series, and the study one key image
    series of one instance per series; nothing else is there."""
    source: dict[str, set[str]] = {}
    studies: dict[str, int] = {}
    for files in sent:
        study, series = _source(files)
        source |= series
        studies[study] = len(series)
    srs, key_images = results_in_pacs(orthanc)
    assert srs.keys() == source.keys()
    for series, sops in source.items():
        # one SR series with one SR for this source series, computed on all of its instances
        assert srs[series] == [[sops]]
    assert key_images == {study: [1] * n for study, n in studies.items()}


# ------------------------------------------------------------------------------------------------


def _cut_short(edge: Edge, storescu: str, study: list[Path], k: int) -> int:
    """Send ``study`` and SIGKILL the service (stability time 1 s) after it stored ``k`` of its
    instances, storescu waiting for the next answer; storescu's exit status."""
    edge.stability_s = 1.0
    edge.start(pause_at="shiftguard.edge.receiver:Receiver._store", after=k)
    modality = _storescu(storescu, edge.port, study)
    edge.wait_paused()
    edge.kill()
    modality.communicate(timeout=30)
    return int(modality.returncode)


def test_killed_mid_association_the_resent_studies_are_processed_once(
    edge: Edge, orthanc: Orthanc, cohort: Path, tmp_path: Path, storescu: str
) -> None:
    """storescu sends two studies over one association; the service is SIGKILLed after it has
    acknowledged the first study and ``k`` of the second's ``n`` instances, with storescu waiting for
    the next answer. Restarted, the modality resends the whole association (as a modality does
    after a failed one). Each study is processed once, on all of its instances, and its result
    reaches the PACS once."""
    first, second = _studies(cohort, tmp_path, 2)
    n, k = len(second), len(second) // 2
    edge.start(pause_at="shiftguard.edge.receiver:Receiver._store", after=len(first) + k)
    modality = _storescu(storescu, edge.port, first + second)
    edge.wait_paused()
    edge.kill()
    out, _ = modality.communicate(timeout=30)
    assert modality.returncode != 0, out  # the modality saw its association fail
    inbox = Counter(f.parent.name for f in (edge.storage / "inbox").glob("*/*.dcm"))
    assert sorted(inbox.values()) == [k, len(first)]  # what was acknowledged is on disk
    assert orthanc.get("/instances") == []

    edge.start()
    restarted = edge.counts()  # nothing processed on what the crash left: waits for the retry
    assert restarted.get("studies_receiving") == 2 and restarted["instances"] == len(first) + k
    _send(storescu, edge.port, first + second)  # the modality's retry: the whole study list again
    _wait(lambda: edge.counts().get("deliveries_sent") == 4, "both studies' results to be sent")
    time.sleep(1.0)  # time for a second processing or sending to show
    counts = edge.counts()
    assert counts.get("studies_done") == 2 and counts["instances"] == len(first) + n
    assert counts.get("deliveries_pending", 0) == 0
    assert_each_result_once(orthanc, [first, second])
    claims = [attempts for (attempts,) in edge.query("SELECT attempts FROM studies")]
    assert claims == [1, 1]  # each study processed once: never on the k instances alone
    assert len(edge.query("SELECT * FROM results WHERE role = 'champion'")) == 2
    assert edge.query("SELECT DISTINCT state FROM deliveries") == [("sent",)]


@pytest.mark.parametrize(
    ("pause_at", "point"),
    [
        ("shiftguard.edge.queue:WorkQueue.finish_study", "computed"),
        ("pynetdicom.association:Association.send_c_store", "queued"),
        ("shiftguard.edge.queue:WorkQueue.delivered", "stored"),
    ],
    ids=["after-inference", "before-the-c-store", "pacs-stored-not-recorded"],
)
def test_killed_between_inference_and_delivery_each_result_arrives_once(
    edge: Edge,
    orthanc: Orthanc,
    cohort: Path,
    tmp_path: Path,
    storescu: str,
    pause_at: str,
    point: str,
) -> None:
    """Two studies in; the service is SIGKILLed at the first study's

    * ``computed``: SR and key image written, not yet queued for delivery;
    * ``queued``: queued, association with the PACS open, the C-STORE not yet sent;
    * ``stored``: the PACS has stored and acknowledged the first object, the service has not
      recorded it (the window where a result is sent twice: the deterministic UIDs make the
      second copy the same object).

    Restarted, each study's results reach the PACS once, counted per source series."""
    studies = _studies(cohort, tmp_path, 2)
    edge.start(pause_at=pause_at, after=0)
    _send(storescu, edge.port, studies[0] + studies[1])
    edge.wait_paused()
    if point != "computed":  # the worker goes on while the sender is held: let it finish
        _wait(lambda: edge.counts().get("studies_done") == 2, "the second study to be processed")
    queued = edge.query("SELECT COUNT(*), COALESCE(SUM(state = 'sent'), 0) FROM deliveries")
    in_pacs = orthanc.get("/instances")
    if point == "computed":
        assert queued == [(0, 0)] and in_pacs == []
        assert list((edge.storage / "results").glob("*/*_SR.dcm"))  # but written
    elif point == "queued":
        assert queued == [(4, 0)] and in_pacs == []
    else:
        assert queued == [(4, 0)] and len(in_pacs) == 1  # in the PACS, not recorded as sent
    edge.kill()

    edge.start()
    _wait(lambda: edge.counts().get("deliveries_sent") == 4, "both studies' results to be sent")
    time.sleep(1.0)
    counts = edge.counts()
    assert counts.get("studies_done") == 2 and counts.get("deliveries_pending", 0) == 0
    assert_each_result_once(orthanc, studies)
    claims = sorted(a for (a,) in edge.query("SELECT attempts FROM studies"))
    assert claims == ([1, 2] if point == "computed" else [1, 1])  # redone only if not finished
    assert edge.query("SELECT COUNT(*), COUNT(DISTINCT sop_uid) FROM deliveries") == [(4, 4)]


def test_a_study_cut_short_and_processed_before_the_retry_still_gets_its_complete_result(
    edge: Edge, orthanc: Orthanc, cohort: Path, tmp_path: Path, storescu: str
) -> None:
    """As above, but the modality retries only after the stability time: the restarted service has
    processed the ``k`` instances it had (nothing told it more were coming) and sent that result.
    The retry brings the other ``n - k``: the study is processed again, on all ``n``, and that
    result reaches the PACS too, as the next SR in the same SR series (and the next key image),
    instead of being dropped as a resend of the first one's objects."""
    [study] = _studies(cohort, tmp_path, 1)
    n, k = len(study), len(study) // 2
    assert _cut_short(edge, storescu, study, k) != 0

    edge.start()
    _wait(lambda: edge.counts().get("deliveries_sent") == 2, "the result on k instances")
    study_uid, [(series, sops)] = _source(study)[0], list(_source(study)[1].items())
    [[[partial]]] = results_in_pacs(orthanc)[0].values()
    assert len(partial) == k and partial < sops
    _send(storescu, edge.port, study)  # the modality's retry, later
    _wait(lambda: edge.counts().get("deliveries_sent") == 4, "the result on all n instances")
    time.sleep(1.0)
    srs, key_images = results_in_pacs(orthanc)
    assert srs == {series: [[partial, sops]]}  # one SR series: the first result, then the whole
    assert key_images == {study_uid: [2]}
    assert edge.counts()["instances"] == n and edge.counts().get("deliveries_pending", 0) == 0
    assert [a for (a,) in edge.query("SELECT attempts FROM studies")] == [2]


def test_a_retry_that_arrives_while_the_cut_short_study_is_processed_is_processed_too(
    edge: Edge, orthanc: Orthanc, cohort: Path, tmp_path: Path, storescu: str
) -> None:
    """As above, with the retry arriving while the restarted service is processing the ``k``
    instances: the ``n - k`` it brings are processed too, once that processing ends, and the result
    on all ``n`` is the last SR of the study's SR series (the one on ``k`` is superseded, or sent
    before it if the sender was quicker)."""
    [study] = _studies(cohort, tmp_path, 1)
    n, k = len(study), len(study) // 2
    _cut_short(edge, storescu, study, k)

    edge.start(pause_at="shiftguard.edge.queue:WorkQueue.finish_study", after=0, hold=True)
    edge.wait_paused()  # the result on the k instances is computed, not yet recorded
    _send(storescu, edge.port, study)  # the modality's retry
    edge.go_on()
    study_uid, [(series, sops)] = _source(study)[0], list(_source(study)[1].items())

    def complete() -> bool:
        versions = results_in_pacs(orthanc)[0].get(series, [[]])[0]
        return bool(versions) and versions[-1] == sops

    _wait(complete, "the result on all n instances")
    _wait(lambda: edge.counts().get("deliveries_pending", 0) == 0, "nothing left to send")
    time.sleep(1.0)
    srs, key_images = results_in_pacs(orthanc)
    [versions] = srs.pop(series)
    assert srs == {} and versions[-1] == sops and len(versions) <= 2
    assert all(len(v) == k for v in versions[:-1])  # the earlier one, if sent, is on the k
    [key_image_versions] = key_images.pop(study_uid)
    assert key_images == {} and key_image_versions in (1, 2)
    counts = edge.counts()
    assert counts["instances"] == n and counts.get("studies_done") == 1
    assert counts.get("deliveries_sent", 0) + counts.get("deliveries_superseded", 0) == 4


@pytest.mark.parametrize(
    "pause_at",
    ["shiftguard.edge.queue:WorkQueue.finish_study", "shiftguard.edge.queue:WorkQueue.delivered"],
    ids=["after-inference", "acknowledged-not-recorded"],
)
def test_killed_the_ehr_gets_every_message_once(
    edge: Edge, orthanc: Orthanc, cohort: Path, tmp_path: Path, storescu: str, pause_at: str
) -> None:
    """A site with a PACS, an HL7 receiver (MLLP) and a FHIR server; the service is SIGKILLed
    after the first study's inference (nothing queued) or once every destination has
    acknowledged an object the service has not recorded yet (the window where a message goes
    twice). Restarted, each result's ORU and FHIR report arrive, and each only once as the
    receivers count them: a resent message is the same message under the same control ID (HL7)
    or resource id (FHIR), which the receivers take for what it is."""
    listener = MllpListener(free_port()).start()
    fhir = FhirServer(free_port()).start()
    edge.args = [a for a in edge.args if not a.startswith("edge.destinations=")] + [
        "edge.destinations=["
        f"{{name:pacs,ae_title:ORTHANC,host:127.0.0.1,port:{orthanc.dicom}}},"
        f"{{name:ehr,kind:hl7-mllp,host:127.0.0.1,port:{listener.port}}},"
        f"{{name:fhir,kind:fhir,url:'{fhir.url}'}}]"
    ]
    studies = _studies(cohort, tmp_path, 2)
    try:
        edge.start(pause_at=pause_at, after=0)
        _send(storescu, edge.port, studies[0] + studies[1])
        edge.wait_paused()
        if pause_at.endswith("delivered"):  # each sender holds an acknowledged object
            _wait(lambda: len(listener.accepted) == 1 and len(fhir.writes) == 2, "acks")
            assert edge.query("SELECT COUNT(*) FROM deliveries WHERE state = 'sent'") == [(0,)]
        else:
            assert listener.received == [] and fhir.requests == []
        edge.kill()

        edge.start()
        _wait(lambda: edge.counts().get("deliveries_sent") == 8, "every delivery to be sent")
        time.sleep(1.0)
        assert_each_result_once(orthanc, studies)
        assert len(listener.accepted) == 2 and listener.invalid == [] and listener.conflicts == []
        assert sum(listener.repeats.values()) == (1 if pause_at.endswith("delivered") else 0)
        assert len(fhir.of_type("DiagnosticReport")) == 2 and len(fhir.of_type("Observation")) == 2
        assert fhir.invalid == []
        assert edge.counts().get("deliveries_pending", 0) == 0
    finally:
        listener.stop()
        fhir.stop()
