"""Following a registry channel at the site: the smoke test on the bundle's reference series, the
follower's state on disk, the watch after a swap, and a real rollback when the new bundle's outputs
move (storescu sends the studies)."""

from __future__ import annotations

import json
import math
import time
from datetime import time as clock
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch

from shiftguard.config import EdgeConfig
from shiftguard.config.deploy import RollbackConfig
from shiftguard.edge.bundle import bundle_file_name, open_bundle, write_bundle
from shiftguard.edge.follow import FollowState, Installed, Watch, in_window, reference_outputs
from shiftguard.edge.predict import Predictor
from shiftguard.edge.preprocess import preprocess
from shiftguard.edge.service import Service
from shiftguard.edge.smoke import SMOKE_MEMBER, require_smoke, smoke_test, smoke_volume
from shiftguard.errors import RegistryError, SmokeTestError
from shiftguard.export.stage import export_onnx, onnx_logits
from shiftguard.peers import copy_study, free_port, storescu

from .conftest import make_manifest, make_network, reference_csv

PLAIN_REFERENCE = b"mean,std\n1.0,2.0\n"


def _bundle(
    folder: Path,
    tiny: dict[str, Any],
    onnx: bytes,
    version: str,
    smoke_shift: float | None = 0.0,
    reference: bytes = PLAIN_REFERENCE,
) -> Path:
    """A bundle of version ``version``; with a reference series whose recorded logit is the
    network's plus ``smoke_shift`` (None: no reference series)."""
    manifest = make_manifest(tiny, version=version)
    members = {"model.onnx": onnx, "reference.csv": reference}
    if smoke_shift is not None:
        shape = tiny["ingest"]["shape"]
        volume = np.random.default_rng(1).gamma(2.0, 100.0, size=shape).astype(np.float32)
        logit = float(
            onnx_logits(onnx, preprocess(volume, manifest["preprocessing"])).reshape(-1)[0]
        )
        manifest["smoke"] = {"member": SMOKE_MEMBER, "logit": logit + smoke_shift}
        members[SMOKE_MEMBER] = smoke_volume(volume)
    folder.mkdir(parents=True, exist_ok=True)
    return write_bundle(folder / bundle_file_name("test-model", version), manifest, members)


def _onnx(tiny: dict[str, Any], bias: float = 0.0, nan: bool = False) -> bytes:
    net = make_network()
    with torch.no_grad():
        net.head.bias += bias
        if nan:
            net.head.weight.fill_(float("nan"))
    return export_onnx(net, torch.zeros(1, 1, *tiny["ingest"]["shape"]))


# the smoke test ---------------------------------------------------------------------------------


def test_a_bundle_passes_on_its_own_reference_series(
    tmp_path: Path, tiny: dict[str, Any], onnx_model: bytes
) -> None:
    predictor = Predictor(open_bundle(_bundle(tmp_path, tiny, onnx_model, "7")))
    result = require_smoke(predictor)
    assert result.passed and "reference series" in result.detail
    assert abs(result.logit - result.expected) < 1e-4


def test_a_logit_that_differs_from_the_exports_fails_the_smoke_test(
    tmp_path: Path, tiny: dict[str, Any], onnx_model: bytes
) -> None:
    predictor = Predictor(open_bundle(_bundle(tmp_path, tiny, onnx_model, "7", smoke_shift=0.05)))
    result = smoke_test(predictor)
    assert not result.passed and "at export" in result.detail
    with pytest.raises(SmokeTestError, match="failed its smoke test"):
        require_smoke(predictor)


def test_a_network_that_gives_nan_fails_even_without_a_reference_series(
    tmp_path: Path, tiny: dict[str, Any]
) -> None:
    predictor = Predictor(open_bundle(_bundle(tmp_path, tiny, _onnx(tiny, nan=True), "7", None)))
    result = smoke_test(predictor)
    assert not result.passed and "nan" in result.detail.lower()
    assert "synthetic" in result.detail


def test_a_bundle_without_a_reference_series_gets_the_synthetic_check(
    bundle_path: Path,
) -> None:
    result = smoke_test(Predictor(open_bundle(bundle_path)))
    assert result.passed and "synthetic" in result.detail and math.isnan(result.expected)


# the follower's state and the watch --------------------------------------------------------------


def test_the_state_survives_a_restart_and_a_damaged_file_is_set_aside(tmp_path: Path) -> None:
    state = FollowState.load(tmp_path)
    assert state.current is None and state.confirmed
    state.current = Installed("a.sgbundle", "m", "abc", "3")
    state.refused["4"] = "SmokeTestError: ..."
    state.event("swapped", "m vabc in")
    state.save()
    again = FollowState.load(tmp_path)
    assert again.current == state.current and again.refused == {"4": "SmokeTestError: ..."}
    assert again.last("swapped")["detail"] == "m vabc in"
    (tmp_path / "state.json").write_text("{not json")
    fresh = FollowState.load(tmp_path)
    assert fresh.current is None and (tmp_path / "state.json.bad").is_file()


def test_maintenance_windows_span_midnight() -> None:
    assert in_window("01:00-05:00", clock(1, 0)) and not in_window("01:00-05:00", clock(5, 0))
    assert in_window("23:00-01:00", clock(0, 30)) and not in_window("23:00-01:00", clock(1, 30))


def test_reference_outputs_prefer_the_held_out_rows() -> None:
    outputs = reference_outputs(reference_csv(40))
    assert set(outputs) == {"probability", "entropy"} and len(outputs["probability"]) == 40
    assert reference_outputs(PLAIN_REFERENCE) == {}


def _rows(p: np.ndarray) -> list[dict[str, float]]:
    return [
        {"probability": float(v), "entropy": float(-(v * np.log(v) + (1 - v) * np.log(1 - v)))}
        for v in p
    ]


def test_the_watch_trips_on_failures_latency_and_outputs_and_ends_when_observed() -> None:
    cfg = RollbackConfig(observe_studies=30, observe_hours=0, max_failures=1, latency_factor=3,
                         min_latency_studies=5, min_output_studies=20)  # fmt: skip
    reference = reference_outputs(reference_csv(60))
    rng = np.random.default_rng(5)

    same = Watch(cfg, reference, baseline=[0.1] * 10)
    for p in rng.beta(1, 8, 30):
        same.record(0.11, _rows(np.array([p])))
        assert same.verdict() is None
    assert same.done() and not math.isnan(same.last_output_score)

    moved = Watch(cfg, reference, baseline=[0.1] * 10)
    verdicts = []
    for p in rng.beta(8, 1, 20):
        moved.record(0.1, _rows(np.array([p])))
        verdicts.append(moved.verdict())
    assert verdicts[:-1] == [None] * 19 and "output score" in verdicts[-1]

    slow = Watch(cfg, {}, baseline=[0.1] * 10)
    for _ in range(5):
        slow.record(0.5, [])
    assert "p95 predict latency" in slow.verdict()

    failing = Watch(cfg, {}, baseline=[])
    failing.failed()
    assert failing.verdict() is None
    failing.failed()
    assert "2 of 2 studies failed" in failing.verdict()
    assert not Watch(cfg.model_copy(update={"observe_hours": 1.0}), {}).done()


# the service: swap, refusal, rollback, registry down ----------------------------------------------


def _settings(tmp_path: Path, bundle: Path, **changes: Any) -> EdgeConfig:
    base = EdgeConfig(bundle=str(bundle), storage=str(tmp_path / "edge"), port=0, http_port=0,
                      stability_s=30.0, calling_ae_titles=["MODALITY"])  # fmt: skip
    return EdgeConfig.model_validate({**base.model_dump(), **changes})


def test_a_bundle_that_fails_its_smoke_test_is_never_swapped_in(
    tmp_path: Path, tiny: dict[str, Any], onnx_model: bytes
) -> None:
    v7 = _bundle(tmp_path / "a", tiny, onnx_model, "7")
    bad = _bundle(tmp_path / "b", tiny, onnx_model, "8", smoke_shift=1.0)
    service = Service(_settings(tmp_path, v7))
    try:
        with pytest.raises(SmokeTestError):
            service.adopt(bad)
        assert service.champion.bundle.version == "7" and service.watch is None
    finally:
        service.stop()


def test_a_site_that_cannot_reach_the_registry_keeps_serving_its_last_good_bundle(
    tmp_path: Path, tiny: dict[str, Any], onnx_model: bytes
) -> None:
    v7 = _bundle(tmp_path / "a", tiny, onnx_model, "7")
    v8 = _bundle(tmp_path / "b", tiny, onnx_model, "8")
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    settings = _settings(tmp_path, v7, follow={"url": url, "poll_s": 0.2, "timeout_s": 2})
    service = Service(settings)
    try:
        service.adopt(v8)  # as if the registry had given it
        assert "registry unavailable" in service.poll_registry()
        assert service.count("registry_errors") == 1 and service.champion.bundle.version == "8"
    finally:
        service.stop()
    restarted = Service(settings)  # v8 is still observed: it comes back with v7 to go back to
    try:
        assert restarted.champion.bundle.version == "8" and restarted.previous is not None
        assert restarted.previous.bundle.version == "7" and restarted.watch is not None
        beat = restarted.heartbeat()
        assert beat["bundle_version"] == "8" and beat["state"] == "observing"
        assert beat["registry_error"] is None and beat["queue_depth"] == 0
    finally:
        restarted.stop()
    with pytest.raises(RegistryError, match="cannot reach"):
        restarted.registry_client.resolve("test-model", "champion")  # type: ignore[union-attr]


@pytest.mark.integration
@pytest.mark.peers("storescu")
def test_outputs_that_move_after_a_swap_roll_the_site_back_by_itself(
    tmp_path: Path, tiny: dict[str, Any], onnx_model: bytes, cohort: Path
) -> None:
    v7 = _bundle(tmp_path / "a", tiny, onnx_model, "7")
    # the new bundle's network says "finding" on everything; its reference says rarely
    v9 = _bundle(tmp_path / "b", tiny, _onnx(tiny, bias=40.0), "9", reference=reference_csv())
    rollback = {"min_output_studies": 5, "observe_studies": 50, "max_failures": 5}
    service = Service(_settings(tmp_path, v7, rollback=rollback))
    service.start()
    try:
        assert service.adopt(v9)
        study = sorted(next(cohort.iterdir()).iterdir())[0]
        copies = copy_study(study, tmp_path / "copies", 6)
        for folder in copies:
            proc = storescu(service.receiver.port, sorted(folder.rglob("*.dcm")))
            assert proc.returncode == 0, proc.stderr
        deadline = time.monotonic() + 90
        while service.count("processed") < 6 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert service.count("processed") == 6
        assert service.count("rollbacks") == 1 and service.champion.bundle.version == "7"
        state = json.loads((tmp_path / "edge" / "bundles" / "state.json").read_text())
        reason = state["refused"]["bundle 9"]
        assert reason.startswith("rolled back: output score")
        beat = service.heartbeat()
        assert beat["rolled_back"]["version"] == "9" and beat["state"] == "serving"
        # every study once, each result naming the version that produced it: 5 on v9, then v7
        rows = service.queue.shadow_log()
        uids = [
            pydicom.dcmread(next(f.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
            for f in copies
        ]
        by_study = {r["study_uid"]: r["model_version"] for r in rows if r["role"] == "champion"}
        assert sorted(by_study) == sorted(uids)
        assert sorted(by_study.values()) == ["7"] + ["9"] * 5
    finally:
        service.stop()
