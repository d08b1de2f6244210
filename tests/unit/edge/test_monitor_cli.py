"""``shiftguard monitor report|check|collect|ui`` on a bundle with a drift reference: records from
an ``edge predict`` results table or from the collector, windows, alerts and the exit status."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from shiftguard.cli import main
from shiftguard.edge.bundle import bundle_file_name, write_bundle
from shiftguard.peers import free_port
from shiftguard.records.features import make_record

from .conftest import make_manifest


@pytest.fixture(scope="module")
def monitored_bundle(
    tmp_path_factory: pytest.TempPathFactory, tiny: dict[str, Any], onnx_model: bytes, make_frame
) -> Path:
    """A bundle whose reference is 150 constructed in-distribution records."""
    reference = make_frame(150, seed=0)
    root = tmp_path_factory.mktemp("monitored")
    return write_bundle(
        root / bundle_file_name("test-model", "7"),
        make_manifest(tiny),
        {"model.onnx": onnx_model, "reference.csv": reference.to_csv(index=False).encode()},
    )


def results_csv(path: Path, frame) -> Path:  # type: ignore[no-untyped-def]
    """An edge predict results table holding ``frame``'s features."""
    rows = frame.assign(
        series_uid=[f"1.2.3.{i}" for i in range(len(frame))],
        model="test-model",
        model_version="7",
    )
    rows.to_csv(path, index=False, quoting=csv.QUOTE_MINIMAL)
    return path


def overrides(tmp_path: Path) -> list[str]:
    return [
        f"monitor.state={tmp_path / 'state.db'}",
        f"monitor.workspace={tmp_path / 'ws'}",
        f"monitor.reports={tmp_path / 'reports'}",
        "monitor.window.size=40",
        "monitor.drift.bootstrap=40",
    ]


def test_check_exits_1_on_an_active_alert_and_0_without(
    tmp_path: Path, monitored_bundle: Path, make_frame, capsys: pytest.CaptureFixture[str]
) -> None:
    quiet = results_csv(tmp_path / "quiet.csv", make_frame(80, seed=3))
    args = ["monitor", "check", "--bundle", str(monitored_bundle), "--site", "north"]
    assert main([*args, "--results", str(quiet), *overrides(tmp_path)]) == 0
    shifted = make_frame(80, seed=4, shift=1.5, scanner="Vantage")
    drifted = results_csv(tmp_path / "drifted.csv", shifted)
    out = tmp_path / "windows.json"
    code = main(
        [*args, "--site", "south", "--results", str(drifted), "--json", str(out),
         *overrides(tmp_path)]
    )  # fmt: skip
    assert code == 1
    summary = json.loads(out.read_text())
    assert [w["window"] for w in summary["south"]] == [0, 1]
    assert summary["south"][-1]["unified_score"] > 4
    assert summary["south"][-1]["novel"]["scanner_model"] == 1.0
    html = sorted((tmp_path / "reports").glob("drift-south-window*.html"))
    assert html and html[-1].stat().st_size > 10_000  # Evidently's report
    snapshots = list((tmp_path / "ws").rglob("snapshots/*.json"))
    assert len(snapshots) >= 4  # two windows, a drift and an embedding snapshot each
    # `report` judges nothing new and never exits 1
    again = ["monitor", "report", "--bundle", str(monitored_bundle), "--site", "south"]
    assert main([*again, "--results", str(drifted), *overrides(tmp_path)]) == 0


def test_ui_prints_the_evidently_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["monitor", "ui", "--print-only", f"monitor.workspace={tmp_path}"]) == 0
    assert capsys.readouterr().out.split()[:4] == ["evidently", "ui", "--workspace", str(tmp_path)]


def test_collect_needs_a_token_and_serves_records_to_report(
    tmp_path: Path, monitored_bundle: Path, make_frame
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SHIFTGUARD_MONITOR_TOKEN"}
    store = tmp_path / "records.db"
    port = free_port()
    cmd = [sys.executable, "-m", "shiftguard.cli", "monitor", "collect",
           f"monitor.collector.store={store}", f"monitor.collector.port={port}"]  # fmt: skip
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "SHIFTGUARD_MONITOR_TOKEN" in refused.stderr
    proc = subprocess.Popen(
        cmd, env={**env, "SHIFTGUARD_MONITOR_TOKEN": "t0ken"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the collector did not start"
                time.sleep(0.2)
        frame = make_frame(45, seed=9)
        records = [
            make_record(row, site="east", bundle="test-model", bundle_version="7",
                        series_uid=f"1.2.{i}", processed_at="2026-11-01T00:00:00Z",
                        record_key=bytes(32))
            for i, row in enumerate(frame.to_dict("records"))
        ]  # fmt: skip
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/records",
            data=json.dumps({"records": records}).encode(),
            headers={"Authorization": "Bearer t0ken", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert json.loads(answer.read())["accepted"] == 45
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    out = tmp_path / "w.json"
    code = main(
        ["monitor", "report", "--bundle", str(monitored_bundle), "--json", str(out),
         f"monitor.collector.store={store}", *overrides(tmp_path)]
    )  # fmt: skip
    assert code == 0
    assert [w["n"] for w in json.loads(out.read_text())["east"]] == [40]  # 5 wait for the next
