"""The fleet against real components: an ``mlflow server`` on PostgreSQL as the registry, two edge
services on loopback following ``champion``, storescu sending studies the whole time, and the
collector taking their heartbeats.

A new champion reaches both sites within their polling interval while studies keep coming (``promote`` moves the alias after the gate passed on a shadow
evaluation); every study is processed exactly once and each result names the version that produced it; a champion
whose bundle fails its smoke test is refused by both and the old bundle keeps serving; the fleet
view shows the versions, the refusal, and a site that stopped as stale."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
import pytest
import torch
from unit.edge.conftest import cohort, make_manifest, make_network, reference_csv, tiny
from unit.shadow.conftest import build

from shiftguard.config import EdgeConfig
from shiftguard.config.monitor import AlertRule
from shiftguard.config.shadow import GateConfig, RolloutConfig
from shiftguard.edge.bundle import bundle_file_name, write_bundle
from shiftguard.edge.preprocess import preprocess
from shiftguard.edge.service import Service
from shiftguard.edge.smoke import SMOKE_MEMBER, smoke_volume
from shiftguard.export.stage import export_onnx, onnx_logits
from shiftguard.monitor.collect import Collector
from shiftguard.peers import copy_study, storescu
from shiftguard.shadow.evaluate import run
from shiftguard.shadow.promote import promote
from shiftguard.shadow.report import write_report
from shiftguard.shadow.rollout import HALTED_TAG, advance, start
from shiftguard.tracking import file_sha256

if TYPE_CHECKING:
    from .conftest import MlflowServer

pytestmark = [pytest.mark.integration, pytest.mark.peers("storescu")]
__all__ = ["cohort", "tiny"]  # the edge tests' fixtures, used here by name

MODEL = "test-model"
TOKEN = "fleet-integration-token"
POLL_S = 0.5
STUDIES = 60  # copies per site; the senders stop a few studies after the swap


def _wait(predicate: Callable[[], object], timeout: float = 90.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def study(cohort: Path) -> Path:
    """One study folder of the edge tests' tiny cohort."""
    return sorted(next(cohort.iterdir()).iterdir())[0]


def _bundle(
    folder: Path, tiny: dict[str, Any], version: str, threshold: float, shift: float
) -> Path:
    net = make_network()
    onnx = export_onnx(net, torch.zeros(1, 1, *tiny["ingest"]["shape"]))
    manifest = make_manifest(tiny, version=version, threshold=threshold)
    volume = torch.rand(*tiny["ingest"]["shape"], generator=torch.Generator().manual_seed(3))
    volume_np = (volume.numpy() * 1000).astype("float32")
    logit = float(
        onnx_logits(onnx, preprocess(volume_np, manifest["preprocessing"])).reshape(-1)[0]
    )
    manifest["smoke"] = {"member": SMOKE_MEMBER, "logit": logit + shift}
    members = {"model.onnx": onnx, "reference.csv": b"mean,std\n1.0,2.0\n",
               SMOKE_MEMBER: smoke_volume(volume_np)}  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    return write_bundle(folder / bundle_file_name(MODEL, version), manifest, members)


def _register(client: Any, experiment: str, bundle: Path, model: str = MODEL) -> str:
    """Log ``bundle`` to a run and register it as a new version, tagged as the export stage
    tags it; the version's number."""
    run = client.create_run(experiment)
    client.log_artifact(run.info.run_id, str(bundle), artifact_path="bundle")
    client.set_terminated(run.info.run_id)
    tags = {
        "bundle": bundle.name,
        "bundle_version": bundle.name.removesuffix(".sgbundle").rsplit("-v", 1)[-1],
        "bundle_sha256": file_sha256(bundle),
        "bundle_uri": f"runs:/{run.info.run_id}/bundle/{bundle.name}",
    }
    version = client.create_model_version(
        model, source=f"runs:/{run.info.run_id}/bundle", run_id=run.info.run_id, tags=tags
    )
    return str(version.version)


@pytest.fixture
def fleet(
    mlflow_server: MlflowServer,
    tmp_path: Path,
    tiny: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[dict[str, Any]]:
    from mlflow.tracking import MlflowClient

    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SHIFTGUARD_MONITOR_TOKEN", TOKEN)
    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiment = client.create_experiment(f"fleet-{os.getpid()}-{time.monotonic_ns()}")
    bundles = {
        "7": _bundle(tmp_path / "b7", tiny, "7", 0.5, 0.0),
        "8": _bundle(tmp_path / "b8", tiny, "8", 0.4, 0.0),
        "9": _bundle(tmp_path / "b9", tiny, "9", 0.3, 0.5),  # its smoke test fails anywhere
    }
    client.create_registered_model(MODEL)
    first = _register(client, experiment, bundles["7"])
    client.set_registered_model_alias(MODEL, "champion", first)
    collector = Collector(
        tmp_path / "records.db", TOKEN, fleet_check_s=0.2,
        rules=[AlertRule(name="stale_site", metric="heartbeat_age", above=3.0)],
    )  # fmt: skip
    collector.start()
    services = []
    for site in ("north", "south"):
        settings = EdgeConfig(
            bundle=str(bundles["7"]), storage=str(tmp_path / site), port=0, http_port=0,
            site=site, stability_s=30.0, collector_url=collector.url, heartbeat_s=1.0,
            follow={"url": mlflow_server.url, "model": MODEL, "poll_s": POLL_S, "timeout_s": 10},
        )  # fmt: skip
        service = Service(settings)
        service.start()
        services.append(service)
    yield {"client": client, "experiment": experiment, "bundles": bundles,
           "collector": collector, "services": services}  # fmt: skip
    for service in services:
        service.stop()
    collector.stop()
    client.delete_registered_model(MODEL)


def _send(
    service: Service,
    folders: list[Path],
    sent: list[Path],
    stop: threading.Event,
    errors: list[str],
) -> None:
    """Send studies one after another until ``stop`` is set (or ``folders`` run out)."""
    for folder in folders:
        if stop.is_set():
            return
        proc = storescu(service.receiver.port, sorted(folder.rglob("*.dcm")))
        if proc.returncode != 0:
            errors.append(proc.stderr)
        sent.append(folder)
        time.sleep(0.1)


def test_a_promotion_reaches_both_sites_while_studies_keep_coming(
    fleet: dict[str, Any], study: Path, tmp_path: Path, mlflow_server: MlflowServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    client, services, collector = fleet["client"], fleet["services"], fleet["collector"]
    copies = {s.settings.site: copy_study(study, tmp_path / s.settings.site / "sent", STUDIES)
              for s in services}  # fmt: skip
    sent: dict[str, list[Path]] = {s.settings.site: [] for s in services}
    errors: list[str] = []
    stop = threading.Event()
    senders = [
        threading.Thread(
            target=_send, args=(s, copies[s.settings.site], sent[s.settings.site], stop, errors)
        )
        for s in services
    ]
    for thread in senders:
        thread.start()
    # after a few studies, `shiftguard promote` passes the new version through the gate on a
    # shadow evaluation (bundle 7 the champion, bundle 8 the challenger) and moves the alias
    _wait(lambda: all(s.count("processed") >= 3 for s in services), what="the first studies")
    second = _register(client, fleet["experiment"], fleet["bundles"]["8"])
    log, book = build(
        seed=7, challenger_separation=0.3, champion_version="7", challenger_version="8"
    )
    write_report(run(log, book, n_boot=300), tmp_path / "report")
    decision = promote(tmp_path / "report", GateConfig(min_studies=100), MODEL,
                       root=tmp_path, rollout=RolloutConfig())  # fmt: skip
    assert decision.promoted, decision.lines()
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == second
    promoted = time.monotonic()
    _wait(lambda: all(s.champion.bundle.version == "8" for s in services), what="the swap")
    reached = time.monotonic() - promoted
    assert reached < 10 * POLL_S + 10  # a poll, a download, a smoke test
    after = {s.settings.site: s.count("processed") for s in services}
    _wait(lambda: all(s.count("processed") >= after[s.settings.site] + 3 for s in services),
          what="studies after the swap")  # fmt: skip
    stop.set()
    for thread in senders:
        thread.join(timeout=120)
    assert not errors, errors
    _wait(lambda: all(s.count("processed") == len(sent[s.settings.site]) for s in services),
          what="every study sent")  # fmt: skip

    for service in services:
        site = service.settings.site
        uids = {
            pydicom.dcmread(next(f.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
            for f in sent[site]
        }
        rows = sorted(
            (r for r in service.queue.shadow_log() if r["role"] == "champion"),
            key=lambda r: r["created_at"],
        )
        # exactly once each, and every result names its version: 7 up to the swap, 8 after
        assert sorted(r["study_uid"] for r in rows) == sorted(uids), site
        versions = [r["model_version"] for r in rows]
        assert "7" in versions and "8" in versions, (site, versions)
        assert versions == sorted(versions), (site, versions)
        assert service.count("failed") == 0 and service.count("swaps") == 1

    # a champion whose bundle fails its smoke test: refused by both, the old bundle keeps serving
    third = _register(client, fleet["experiment"], fleet["bundles"]["9"])
    client.set_registered_model_alias(MODEL, "champion", third)
    _wait(lambda: all(third in s.follow_state.refused for s in services), what="the refusal")
    for service in services:
        assert "SmokeTestError" in service.follow_state.refused[third]
        assert service.champion.bundle.version == "8" and service.count("refused_bundles") == 1
    on_8, done = services[0].queue.studies_by("8"), services[0].count("processed")
    extra = copy_study(study, tmp_path / "extra", 1)[0]
    assert storescu(services[0].receiver.port, sorted(extra.rglob("*.dcm"))).returncode == 0
    _wait(lambda: services[0].count("processed") == done + 1, what="one more study")
    assert services[0].queue.studies_by("8") == on_8 + 1  # served by 8

    # the fleet view: versions, the refusal, and a site that stopped, stale
    _wait(
        lambda: all(
            third in (row.get("refused") or {}) for row in collector.fleet_status()["sites"]
        ),
        what="heartbeats with the refusal",
    )
    sites = {row["site"]: row for row in collector.fleet_status()["sites"]}
    assert set(sites) == {"north", "south"}
    for row in sites.values():
        assert (row["bundle_version"], row["registry_version"]) == ("8", second)
        assert row["channel"] == f"{MODEL}@champion" and not row["stale"]
    before = len(collector.fleet.raised)
    services[1].stop()
    _wait(lambda: {r["site"]: r for r in collector.fleet_status()["sites"]}["south"]["stale"],
          timeout=30, what="south to go stale")  # fmt: skip
    _wait(lambda: len(collector.fleet.raised) > before, timeout=5, what="the alert")
    assert "south" in [a.site for a in collector.fleet.raised[before:]]
    assert not {r["site"]: r for r in collector.fleet_status()["sites"]}["north"]["stale"]


def test_a_canary_that_trips_the_output_rule_rolls_back_and_halts_the_rollout(
    mlflow_server: MlflowServer, tmp_path: Path, tiny: dict[str, Any], study: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Two waves: the canary (wave 0) takes the new champion, whose network says "finding" on
    everything, sees its outputs leave the bundle's reference, and goes back by itself; `fleet
    rollout` then halts the rollout, and the wave-1 site never takes the version."""
    from mlflow.tracking import MlflowClient

    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiment = client.create_experiment(f"rollout-{os.getpid()}-{time.monotonic_ns()}")
    model = f"{MODEL}-rollout"
    good = _bundle(tmp_path / "good", tiny, "7", 0.5, 0.0)
    net = make_network()
    with torch.no_grad():
        net.head.bias += 40.0
    onnx = export_onnx(net, torch.zeros(1, 1, *tiny["ingest"]["shape"]))
    (tmp_path / "bad").mkdir()
    bad = write_bundle(
        tmp_path / "bad" / bundle_file_name(MODEL, "11"),
        make_manifest(tiny, version="11"),
        {"model.onnx": onnx, "reference.csv": reference_csv()},
    )
    client.create_registered_model(model)
    first = _register(client, experiment, good, model)
    client.set_registered_model_alias(model, "champion", first)
    plan = RolloutConfig.model_validate({"waves": [{"name": "canary"}, {"name": "everyone"}]})
    services = []
    try:
        for site, wave in (("canary", 0), ("late", 1)):
            settings = EdgeConfig(
                bundle=str(good), storage=str(tmp_path / site), port=0, http_port=0, site=site,
                stability_s=30.0,
                follow={"url": mlflow_server.url, "model": model, "poll_s": POLL_S, "wave": wave},
                rollback={"min_output_studies": 5, "observe_studies": 50, "max_failures": 5},
            )  # fmt: skip
            service = Service(settings)
            service.start()
            services.append(service)
        canary, late = services
        second = _register(client, experiment, bad, model)
        start(client, model, second, plan)  # as `shiftguard promote` does: wave 0 open, then
        client.set_registered_model_alias(model, "champion", second)  # the alias moves
        _wait(lambda: canary.champion.bundle.version == "11", what="the canary's swap")
        for folder in copy_study(study, tmp_path / "sent", 6):
            assert storescu(canary.receiver.port, sorted(folder.rglob("*.dcm"))).returncode == 0
        _wait(lambda: canary.count("rollbacks") == 1, what="the canary's rollback")
        assert canary.champion.bundle.version == "7"
        assert canary.follow_state.refused[second].startswith("rolled back: output score")
        time.sleep(3 * POLL_S)  # the canary polls again: it does not take the version back
        assert canary.champion.bundle.version == "7" and canary.count("swaps") == 1
        assert late.champion.bundle.version == "7" and late.count("swaps") == 0
        assert "this site is wave 1" in late.follow_status

        fleet = [{**canary.heartbeat(), "stale": False}, {**late.heartbeat(), "stale": False}]
        step = advance(client, model, plan, fleet)
        assert step.halted and "canary rolled back (output score" in step.action
        tags = client.get_model_version(model, second).tags
        assert "canary" in tags[HALTED_TAG]
        assert tags["rollout.site.canary"].startswith("rolled back: output score")
        assert tags["rollout.site.late"].startswith("waiting")
    finally:
        for service in services:
            service.stop()
        client.delete_registered_model(model)
