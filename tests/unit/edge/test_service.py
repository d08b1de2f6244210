"""``edge serve`` end to end: dcmtk's storescu sends a study, the service infers, a real Orthanc
(started here, HTTP on loopback) receives the SR and key image."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shiftguard.config import EdgeConfig
from shiftguard.edge.bundle import BundleError
from shiftguard.edge.queue import DONE
from shiftguard.edge.service import Service, sampled
from shiftguard.peers import Orthanc, copy_study, free_port, storescu
from shiftguard.shadow.log import read_shadow_log

pytestmark = [
    pytest.mark.integration,
    pytest.mark.peers("Orthanc", "storescu"),
]


def _service(
    tmp_path: Path, bundle: Path, orthanc: Orthanc, shadow: bool, **changes: Any
) -> Service:
    """A started service on free ports sending to ``orthanc`` as its clinical destination."""
    settings = EdgeConfig(
        bundle=str(bundle),
        storage=str(tmp_path / "edge"),
        port=0,
        calling_ae_titles=["MODALITY"],
        destinations=[
            {"name": "pacs", "ae_title": "ORTHANC", "port": orthanc.dicom, "role": "clinical"}
        ],
        shadow=shadow,
        stability_s=30.0,
        retry_base_s=0.2,
        http_port=0,
    )
    token = changes.pop("collector_token", None)
    service = Service(
        EdgeConfig.model_validate({**settings.model_dump(), **changes}), collector_token=token
    )
    service.start()
    return service


def _send(port: int, study: Path) -> None:
    proc = storescu(port, sorted(study.rglob("*.dcm")))
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
        _wait(lambda: service.count("sent") == 2)  # Orthanc lists them before we hear back
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
        figures = samples(metrics)
        assert figures["shiftguard_edge_sent_total", ()] == 2
        assert figures["shiftguard_edge_latency_seconds_count", (("stage", "ready_to_sent"),)] == 1
        assert figures["shiftguard_edge_received_total", ()] >= 1
        assert figures["shiftguard_edge_queue", (("item", f"studies_{DONE}"),)] == 1
        with urllib.request.urlopen(f"http://127.0.0.1:{service.http_port}/healthz") as r:
            assert json.loads(r.read())["status"] == "ok"
    finally:
        service.stop()


@pytest.fixture
def preparer_not_niced(monkeypatch: pytest.MonkeyPatch) -> None:
    """The preparing process at the default priority: it runs at the lowest one in service, so
    that receiving goes first, and on a test host busy with other tests it could be left no CPU
    before a study's release; these tests check what it prepares, not its scheduling."""
    from shiftguard.edge import prefetch

    monkeypatch.setattr(prefetch, "NICENESS", 0)


def test_studies_prepared_while_they_arrive_give_the_offline_results(
    tmp_path: Path, bundle_path: Path, cohort: Path, orthanc: Orthanc, preparer_not_niced: None
) -> None:
    """With edge.prepare_while_receiving (the default) each image is read and its slice resampled
    as it is stored: every series of the cohort is resampled from those slices, and each
    probability is the offline runner's (which reads every study whole) to 1e-5. Each study's
    association is released only once its images are prepared, so that every series takes the
    prepared path (how much is ready by a release is a matter of timing, measured by
    benchmarks/edge_study_size.py)."""
    from pynetdicom import AE

    from shiftguard.edge.bundle import open_bundle
    from shiftguard.edge.predict import Predictor

    service = _service(tmp_path, bundle_path, orthanc, shadow=True)
    studies = sorted(p for site in cohort.iterdir() for p in site.iterdir())
    try:
        prefetch = service.prefetch
        assert prefetch is not None and prefetch.wait_ready()
        n_files = 0
        for study in studies:
            files = [pydicom.dcmread(f) for f in sorted(study.rglob("*.dcm"))]
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(files[0].SOPClassUID, files[0].file_meta.TransferSyntaxUID)
            assoc = ae.associate("127.0.0.1", service.receiver.port, ae_title="SHIFTGUARD")
            assert assoc.is_established
            for ds in files:
                assert assoc.send_c_store(ds).Status == 0
            n_files += len(files)
            _wait(lambda: prefetch.backlog() == 0)
            assoc.release()
        _wait(lambda: service.count("processed") == len(studies))
        assert prefetch.prepared == n_files and prefetch.errors == 0
        streamed = service.count("series_streamed")
    finally:
        service.stop()
    log = read_shadow_log(service.queue.path)
    online = dict(zip(log["study_uid"], log["probability"], strict=True))
    offline = Predictor(open_bundle(bundle_path), shadow=True).predict_folder(
        studies, tmp_path / "offline"
    )
    assert offline.results and len(online) == len(offline.results) == len(studies)
    assert streamed == len(offline.results)  # every series resampled from its prepared slices
    for row in offline.results:
        assert online[row["study_uid"]] == pytest.approx(row["probability"], abs=1e-5)


def test_a_study_over_100_mb_goes_from_storescu_through_the_service_to_orthanc(
    tmp_path: Path, bundle_path: Path, cohort: Path, orthanc: Orthanc, preparer_not_niced: None
) -> None:
    """A clinical-size study (512 x 512 x 210 16-bit slices, 105 MiB of pixels, generated from a
    cohort series) sent by storescu in one association: the service streams it, and the SR in
    Orthanc references all 210 images while the key image is a valid Secondary Capture in the same
    study. Nothing is timed here (benchmarks/edge_study_size.py measures it)."""
    import io
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
    from clinical_study import slices_for, write_study
    from dciodvfy_check import assert_dciodvfy_clean

    slices = slices_for(105)
    source = sorted(next(cohort.iterdir()).iterdir())[0]
    files = write_study(source, tmp_path / "study", slices, seed=3)
    assert sum(f.stat().st_size for f in files) > 100 * 2**20
    sent = pydicom.dcmread(files[0], stop_before_pixels=True)
    service = _service(tmp_path, bundle_path, orthanc, shadow=False)
    try:
        assert service.prefetch is not None and service.prefetch.wait_ready()
        proc = storescu(service.receiver.port, files)
        assert proc.returncode == 0, proc.stderr
        _wait(lambda: service.count("sent") == 2, timeout=120)
        assert service.count("series_streamed") == 1 and service.prefetch is not None
        assert service.prefetch.errors == 0
        assert orthanc.studies() == {sent.StudyInstanceUID: 2}  # the SR and the key image
    finally:
        service.stop()
    found = {}
    classes = {"1.2.840.10008.5.1.4.1.1.88.34": "SR", "1.2.840.10008.5.1.4.1.1.7": "SC"}
    for instance in orthanc.get("/instances"):
        tags = orthanc.get(f"/instances/{instance}/simplified-tags")
        with urllib.request.urlopen(
            f"http://127.0.0.1:{orthanc.http}/instances/{instance}/file", timeout=30
        ) as r:
            found[classes[tags["SOPClassUID"]]] = r.read()
    assert set(found) == {"SR", "SC"}
    sr = pydicom.dcmread(io.BytesIO(found["SR"]))
    referenced = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert referenced == {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    sc = pydicom.dcmread(io.BytesIO(found["SC"]))
    assert sc.StudyInstanceUID == sr.StudyInstanceUID == sent.StudyInstanceUID
    assert sc.pixel_array.ndim == 3 and sc.SamplesPerPixel == 3  # the key image, in colour
    for name, data in found.items():
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(data)
        assert_dciodvfy_clean(path, iod={"SR": "Comprehensive3DSR", "SC": "SCImage"}[name])


def test_shadow_mode_sends_nothing_clinical_and_logs_both_roles(
    tmp_path: Path, bundle_path: Path, challenger_path: Path, cohort: Path, orthanc: Orthanc
) -> None:
    service = _service(tmp_path, bundle_path, orthanc, shadow=True, challenger=str(challenger_path))
    try:
        study = sorted(next(cohort.iterdir()).iterdir())[0]
        h = pydicom.dcmread(next(study.rglob("*.dcm")), stop_before_pixels=True)
        uid = h.StudyInstanceUID
        _send(service.receiver.port, study)
        _wait(lambda: service.queue.study_state(uid) == DONE)
        _wait(lambda: len(service.queue.shadow_log()) == 2)  # the challenger runs after
        time.sleep(1.0)  # a sender would have had time to deliver
        assert orthanc.get("/instances") == []
        rows = {r["role"]: r for r in service.queue.shadow_log()}
        assert rows.keys() == {"champion", "challenger"}
        row = rows["champion"]
        assert row["study_uid"] == uid and row["routed"] == "shadow log only"
        assert (rows["champion"]["bundle"], rows["challenger"]["bundle"]) == (
            "test-model-v7",
            "test-model-v8",
        )
        # the segments shadow evaluation slices by, from the study's header
        for row in rows.values():
            assert (row["sex"], row["manufacturer"], row["scanner_model"], row["institution"]) == (
                h.PatientSex,
                h.Manufacturer,
                h.ManufacturerModelName,
                h.InstitutionName,
            )
            assert row["patient_age"] == int(h.PatientAge[:3]) and row["age_band"]
        judged = read_shadow_log(service.queue.path)
        assert list(judged["role"]) == ["challenger", "champion"]
        assert set(judged["site"]) == {h.InstitutionName} and set(judged["study_uid"]) == {uid}
        assert service._ready_at == {}  # nothing kept for a study that will never be sent
    finally:
        service.stop()


def test_the_challenger_reads_a_stable_share_of_studies() -> None:
    uids = [f"1.2.826.0.1.{i}" for i in range(4000)]
    quarter = [u for u in uids if sampled(u, 0.25)]
    assert 0.22 < len(quarter) / len(uids) < 0.28
    assert quarter == [u for u in uids if sampled(u, 0.25)]  # the same studies every time
    assert set(quarter) <= {u for u in uids if sampled(u, 0.5)}  # a larger share keeps them
    assert all(sampled(u, 1.0) for u in uids[:10])


def test_a_study_outside_the_challengers_share_is_read_by_the_champion_only(
    tmp_path: Path, bundle_path: Path, challenger_path: Path, cohort: Path, orthanc: Orthanc
) -> None:
    study = sorted(next(cohort.iterdir()).iterdir())[0]
    uid = pydicom.dcmread(next(study.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
    share = next(f for f in (0.9, 0.5, 0.1, 0.01, 0.001) if not sampled(uid, f))
    service = _service(
        tmp_path, bundle_path, orthanc, shadow=True, challenger=str(challenger_path),
        challenger_fraction=share,
    )  # fmt: skip
    try:
        _send(service.receiver.port, study)
        _wait(lambda: service.queue.study_state(uid) == DONE)
        assert [r["role"] for r in service.queue.shadow_log()] == ["champion"]
    finally:
        service.stop()


def test_a_failing_challenger_costs_the_champion_nothing(
    tmp_path: Path, bundle_path: Path, challenger_path: Path, cohort: Path, orthanc: Orthanc
) -> None:
    (tmp_path / "edge" / "results").mkdir(parents=True)
    (tmp_path / "edge" / "results" / "challenger").write_text("")  # its output folder cannot be
    service = _service(
        tmp_path, bundle_path, orthanc, shadow=False, challenger=str(challenger_path)
    )
    try:
        study = sorted(next(cohort.iterdir()).iterdir())[0]
        uid = pydicom.dcmread(next(study.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
        _send(service.receiver.port, study)
        _wait(lambda: service.count("challenger_failed") == 1)
        _wait(lambda: service.count("sent") == 2)  # the champion's SR and key image
        assert service.queue.study_state(uid) == DONE
        assert [r["role"] for r in service.queue.shadow_log()] == ["champion"]
        assert orthanc.studies() == {uid: 2}
    finally:
        service.stop()


def test_the_champion_cannot_be_its_own_challenger(
    tmp_path: Path, bundle_path: Path, orthanc: Orthanc
) -> None:
    with pytest.raises(BundleError, match="the challenger is the champion's bundle"):
        _service(tmp_path, bundle_path, orthanc, shadow=True, challenger=str(bundle_path))


def test_results_wait_for_a_pacs_that_is_down_and_arrive_when_it_returns(
    tmp_path: Path, bundle_path: Path, cohort: Path, orthanc: Orthanc
) -> None:
    orthanc.stop()
    service = _service(
        tmp_path, bundle_path, orthanc, shadow=False, retry_base_s=0.1, retry_max_s=0.5
    )
    try:
        study = sorted(next(cohort.iterdir()).iterdir())[0]
        _send(service.receiver.port, study)
        _wait(lambda: service.count("send_failures") >= 2)
        assert service.queue.counts().get("deliveries_pending") == 2
        orthanc.start()
        _wait(lambda: service.queue.counts().get("deliveries_sent") == 2)
        assert sum(orthanc.studies().values()) == 2
    finally:
        service.stop()


def test_four_senders_ten_studies_each_nothing_lost_or_duplicated(
    tmp_path: Path, bundle_path: Path, cohort: Path, orthanc: Orthanc
) -> None:
    import concurrent.futures

    studies = copy_study(sorted(next(cohort.iterdir()).iterdir())[0], tmp_path / "studies", 40)
    service = _service(tmp_path, bundle_path, orthanc, shadow=False)
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            # four modalities, each sending its ten studies one association at a time
            list(
                pool.map(
                    lambda k: [_send(service.receiver.port, s) for s in studies[k::4]], range(4)
                )
            )
        _wait(lambda: service.queue.counts().get("deliveries_sent") == 80, timeout=240)
        stored = orthanc.studies()
        assert len(stored) == 40 and set(stored.values()) == {2}
        assert service.queue.counts()["studies_done"] == 40
        assert service.receiver.stats.received == 40 * len(list(studies[0].iterdir()))
    finally:
        service.stop()


def test_killed_mid_study_the_restarted_service_finishes_and_sends_once(
    tmp_path: Path, bundle_path: Path, cohort: Path, orthanc: Orthanc
) -> None:
    import os
    import signal
    import sys

    port, http = free_port(), free_port()
    repo = Path(__file__).resolve().parents[3]
    args = [
        sys.executable,
        "-m",
        "shiftguard.cli",
        "edge",
        "serve",
        f"edge.bundle={bundle_path}",
        f"edge.storage={tmp_path / 'edge'}",
        f"edge.port={port}",
        f"edge.http_port={http}",
        "edge.shadow=false",
        "edge.retry_base_s=0.2",
        "edge.calling_ae_titles=[MODALITY]",
        f"edge.destinations=[{{name:pacs,ae_title:ORTHANC,host:127.0.0.1,port:{orthanc.dicom}}}]",
    ]
    log = (tmp_path / "serve.log").open("ab")

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(args, cwd=repo, stdout=log, stderr=log)
        _wait(lambda: _healthy(http), timeout=120)
        return proc

    proc = start()
    studies = copy_study(sorted(next(cohort.iterdir()).iterdir())[0], tmp_path / "studies", 3)
    for study in studies:
        _send(port, study)
    # after every association ended, so inferring or sending (test_crash.py kills at known points)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    proc = start()
    try:
        _wait(lambda: len(orthanc.studies()) == 3, timeout=120)
        time.sleep(1.0)
        assert set(orthanc.studies().values()) == {2}  # an SR and a key image each
        import sqlite3

        db = sqlite3.connect(tmp_path / "edge" / "queue.db")
        rows = db.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state").fetchall()
        assert rows == [("sent", 6)]
    finally:
        proc.terminate()
        proc.wait(30)


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def test_a_broken_series_is_skipped_with_its_reason_and_the_next_study_still_served(
    tmp_path: Path, bundle_path: Path, cohort: Path, orthanc: Orthanc
) -> None:
    broken, good = copy_study(sorted(next(cohort.iterdir()).iterdir())[0], tmp_path / "studies", 2)
    files = sorted(broken.iterdir())
    files[len(files) // 2].unlink()  # a missing slice in the middle of the series
    service = _service(tmp_path, bundle_path, orthanc, shadow=False)
    try:
        broken_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        _send(service.receiver.port, broken)
        _send(service.receiver.port, good)
        _wait(lambda: service.queue.counts().get("deliveries_sent") == 2)
        assert service.queue.study_state(broken_uid) == DONE
        assert "missing" in service.queue.study_note(broken_uid).lower()
        assert len(orthanc.studies()) == 1  # only the good study's results
    finally:
        service.stop()


MALFORMED = ("MR_truncated.dcm", "rtplan_truncated.dcm", "badVR.dcm", "no_meta.dcm")


def test_malformed_objects_are_refused_or_skipped_and_the_service_keeps_serving(
    tmp_path: Path, bundle_path: Path, cohort: Path, orthanc: Orthanc
) -> None:
    from pydicom.data import get_testdata_file
    from pynetdicom import AE, AllStoragePresentationContexts

    service = _service(tmp_path, bundle_path, orthanc, shadow=False)
    try:
        sent: list[tuple[str, Any]] = []
        accepted: list[str] = []
        for name in MALFORMED:
            path = get_testdata_file(name, download=False)
            if path is None:
                continue
            ae = AE(ae_title="MODALITY")
            ae.requested_contexts = AllStoragePresentationContexts[:120]
            assoc = ae.associate("127.0.0.1", service.receiver.port, ae_title="SHIFTGUARD")
            assert assoc.is_established
            try:
                ds = pydicom.dcmread(path, force=True)
                status = assoc.send_c_store(ds)
                if int(getattr(status, "Status", -1)) == 0:
                    accepted.append(str(ds.StudyInstanceUID))
                sent.append((name, int(getattr(status, "Status", -1))))
            except Exception as exc:  # pynetdicom cannot even encode some of them
                sent.append((name, type(exc).__name__))
            finally:
                if assoc.is_established:
                    assoc.release()
        assert sent, "no malformed test file is bundled with pydicom"
        good = sorted(next(cohort.iterdir()).iterdir())[0]
        _send(service.receiver.port, good)
        uid = pydicom.dcmread(next(good.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
        _wait(lambda: orthanc.studies().get(uid) == 2)
        # whatever got in was dealt with, with the reason recorded; nothing was sent for it
        for study_uid in accepted:
            _wait(lambda u=study_uid: service.queue.study_state(u) in ("done", "failed"))
            assert service.queue.study_note(study_uid), study_uid
            assert study_uid not in orthanc.studies()
    finally:
        service.stop()


def test_a_site_runs_the_service_from_a_site_file_without_the_project(
    tmp_path: Path, bundle_path: Path, cohort: Path
) -> None:
    """What a hospital does: an installed package, a bundle and one YAML file; no conf/ tree."""
    import os
    import sys

    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(bundle_path, site / bundle_path.name)
    # the environment points the project lookup nowhere: only the site file may be read
    env = {**os.environ, "SHIFTGUARD_CONF_DIR": str(tmp_path / "no-conf-here")}
    cli = [sys.executable, "-m", "shiftguard.cli", "edge"]
    made = subprocess.run(
        [*cli, "config", "--out", "site.yaml"], cwd=site, env=env, capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr
    port, http = free_port(), free_port()
    proc = subprocess.Popen(
        [*cli, "serve", "--config", "site.yaml", f"bundle={bundle_path.name}", f"port={port}",
         f"http_port={http}", "calling_ae_titles=[MODALITY]"],
        cwd=site, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait(lambda: _healthy(http), timeout=120)
        _send(port, sorted(next(cohort.iterdir()).iterdir())[0])
        _wait(
            lambda: (
                samples(_metrics(http).decode()).get(("shiftguard_edge_processed_total", ())) == 1
            )
        )
        assert (site / "edge-data" / "queue.db").is_file()  # storage relative to the site folder
    finally:
        proc.terminate()
        assert proc.wait(30) == 0  # SIGTERM: a clean stop


def _metrics(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        return r.read()


def test_drift_records_reach_the_collector_and_carry_no_identifier(
    tmp_path: Path, bundle_path: Path, cohort: Path, orthanc: Orthanc
) -> None:
    """Every record that leaves the runner, scanned for what could identify a patient or a study:
    names, ids, accession numbers, dates, UIDs, institution and station names."""
    import re

    from shiftguard.monitor.collect import Collector, RecordStore
    from shiftguard.records.features import ENVELOPE, FEATURE_NAMES

    store = RecordStore(tmp_path / "records.db")
    collector = Collector(store, "s3cret")
    collector.start()
    service = _service(
        tmp_path, bundle_path, orthanc, shadow=True, site="north",
        collector_url=collector.url, collector_token="s3cret",
    )  # fmt: skip
    studies = sorted(p for p in cohort.iterdir() if p.is_dir())[:2]
    try:
        for patient in studies:
            _send(service.receiver.port, next(patient.iterdir()))
        _wait(lambda: store.count() == 2)
    finally:
        service.stop()
        collector.stop()
    frame = store.frame()
    store.close()
    assert list(frame["site"]) == ["north", "north"]
    assert set(FEATURE_NAMES) | set(ENVELOPE) <= set(frame.columns)
    assert frame["probability"].between(0, 1).all() and frame["n_slices"].gt(0).all()
    leaked: set[str] = set()
    for f in sorted(p for patient in studies for p in patient.rglob("*.dcm"))[:50]:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        for keyword in (
            "PatientName", "PatientID", "PatientBirthDate", "StudyDate", "SeriesDate",
            "AcquisitionDate", "AccessionNumber", "StudyInstanceUID", "SeriesInstanceUID",
            "SOPInstanceUID", "FrameOfReferenceUID", "InstitutionName", "StationName", "StudyID",
            "ReferringPhysicianName",
        ):  # fmt: skip
            value = str(ds.get(keyword, "") or "").strip()
            if len(value) >= 4:
                leaked.add(value)
    text = frame.drop(columns=["received_at"]).to_json(orient="records")
    assert not [v for v in leaked if v in text]
    assert not re.search(r"\d+\.\d+\.\d+\.\d+\.\d+", text)  # nothing shaped like a UID
    assert not re.search(r"(19|20)\d{2}(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])", text)  # no DA


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition, parsed by prometheus_client's own parser:
    (name, sorted labels) -> value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
