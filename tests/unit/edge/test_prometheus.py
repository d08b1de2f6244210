"""The edge's and the collector's /metrics scraped by a real Prometheus (Debian package), with the
example alert rules shipped in ``deploy/prometheus/`` loaded; and those rules' own tests."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from shiftguard.config import EdgeConfig
from shiftguard.config.monitor import AlertRule
from shiftguard.edge.service import Service
from shiftguard.monitor.collect import Collector
from shiftguard.peers import free_port, tool

pytestmark = [pytest.mark.integration, pytest.mark.peers("prometheus", "promtool")]

EXAMPLES = Path(__file__).resolve().parents[3] / "deploy" / "prometheus"
TOKEN = "scrape-test-token"


def test_the_example_rules_and_configuration_pass_promtool() -> None:
    for args in (
        ("check", "rules", "shiftguard-rules.yml"),
        ("test", "rules", "shiftguard-rules.test.yml"),
        ("check", "config", "prometheus.yml"),
    ):
        done = subprocess.run([tool("promtool"), *args], cwd=EXAMPLES, capture_output=True,
                              text=True, timeout=60, check=False)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr


def _query(base: str, expr: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    with urllib.request.urlopen(url, timeout=5) as answer:
        return list(json.load(answer)["data"]["result"])


def test_prometheus_scrapes_the_edge_and_the_collector_with_the_rules_loaded(
    tmp_path: Path, bundle_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    collector = Collector(tmp_path / "records.db", TOKEN, fleet_check_s=0.5,
                          rules=[AlertRule(name="stale_site", metric="heartbeat_age", above=3)])  # fmt: skip
    collector.start()
    service = Service(
        EdgeConfig(bundle=str(bundle_path), storage=str(tmp_path / "edge"), port=0, http_port=0,
                   site="north", collector_url=collector.url, heartbeat_s=0.5),
        collector_token=TOKEN,
    )  # fmt: skip
    service.start()
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: ['{EXAMPLES / 'shiftguard-rules.yml'}']\n"
        "scrape_configs:\n"
        f"  - {{job_name: shiftguard-edge, static_configs: [{{targets: ['127.0.0.1:{service.http_port}']}}]}}\n"
        f"  - {{job_name: shiftguard-collector, static_configs: [{{targets: ['127.0.0.1:{collector.port}']}}]}}\n"
    )
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        up: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            try:
                up = _query(base, "up == 1")
                heartbeat = _query(base, 'shiftguard_fleet_heartbeat_age{site="north"}')
                if len(up) == 2 and heartbeat:
                    break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            time.sleep(0.5)
        assert {r["metric"]["job"] for r in up} == {"shiftguard-edge", "shiftguard-collector"}
        assert float(heartbeat[0]["value"][1]) < 3.0
        queue = _query(base, 'shiftguard_edge_queue{job="shiftguard-edge"}')
        assert {r["metric"]["item"] for r in queue} >= {"instances"}
        assert _query(base, "shiftguard_edge_processed_total")[0]["value"][1] == "0"
        with urllib.request.urlopen(f"{base}/api/v1/rules", timeout=5) as answer:
            groups = json.load(answer)["data"]["groups"]
        assert {g["name"] for g in groups} == {"shiftguard-edge", "shiftguard-fleet"}
        deadline = time.monotonic() + 30
        while any(r["health"] != "ok" for g in groups for r in g["rules"]):
            assert time.monotonic() < deadline, groups
            time.sleep(0.5)
            with urllib.request.urlopen(f"{base}/api/v1/rules", timeout=5) as answer:
                groups = json.load(answer)["data"]["groups"]
        firing = [r["name"] for g in groups for r in g["rules"] if r.get("state") == "firing"]
        assert firing == []  # a healthy site: nothing fires
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        service.stop()
        collector.stop()
