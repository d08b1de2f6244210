"""The fleet view on a real collector: heartbeats from shippers, the JSON and the page, the
Prometheus figures, a stale site's alert to the webhook, and `shiftguard fleet status`."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shiftguard.cli import main
from shiftguard.config.monitor import AlertRule
from shiftguard.edge.shipper import Shipper, Spool
from shiftguard.monitor.collect import Collector
from shiftguard.monitor.fleet import fleet_rows, format_table

TOKEN = "fleet-token"
STALE = AlertRule(name="stale_site", metric="heartbeat_age", above=3.0)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def _wait(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def _get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return int(answer.status), answer.read(), answer.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        with exc:
            return int(exc.code), exc.read(), exc.headers["Content-Type"]


def _post(url: str, body: bytes, token: str | None = TOKEN) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url + "/v1/heartbeats", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return int(answer.status), json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return int(exc.code), json.loads(exc.read())


def _state(site: str, version: str, interval: float) -> Callable[[], dict[str, Any]]:
    beats = {"n": 0}

    def beat() -> dict[str, Any]:
        beats["n"] += 1
        return {
            "site": site, "interval_s": interval, "bundle": "m", "bundle_version": version,
            "registry_version": "3", "state": "serving", "wave": 0, "processed": beats["n"],
            "failed": 0, "queue_depth": 1, "last_study_at": None, "disk_free_bytes": 5_000_000_000,
            "sent_at": "2026-12-05T10:00:00Z",
        }  # fmt: skip

    return beat


@pytest.fixture
def fleet(tmp_path: Path, webhook: tuple[str, list[dict[str, Any]]]) -> Iterator[Any]:
    url, received = webhook
    collector = Collector(
        tmp_path / "records.db", TOKEN, rules=[STALE], webhook=url, fleet_check_s=0.05
    )
    collector.start()
    shippers: list[tuple[Spool, Shipper]] = []

    def site(name: str, version: str, interval: float = 0.5) -> Shipper:
        spool = Spool(tmp_path / f"{name}.db")
        shipper = Shipper(spool, collector.url, TOKEN, heartbeat=_state(name, version, interval),
                          heartbeat_s=interval, poll_s=0.05)  # fmt: skip
        shipper.start()
        shippers.append((spool, shipper))
        return shipper

    yield collector, site, received
    for spool, shipper in shippers:
        shipper.stop()
        spool.close()
    collector.stop()


def test_heartbeats_make_the_fleet_view_and_a_silent_site_raises_one_alert(fleet: Any) -> None:
    collector, site, received = fleet
    north, south = site("north", "abc"), site("south", "def")
    _wait(lambda: north.last_heartbeat and south.last_heartbeat)
    status, body, kind = _get(collector.url + "/v1/fleet")
    assert status == 200 and kind == "application/json"
    answer = json.loads(body)
    assert answer["stale_after"] == 3.0
    assert [(s["site"], s["bundle_version"], s["stale"]) for s in answer["sites"]] == [
        ("north", "abc", False), ("south", "def", False),
    ]  # fmt: skip
    status, page, kind = _get(collector.url + "/fleet")
    assert status == 200 and kind.startswith("text/html") and b"<td>north</td>" in page
    metrics = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(_get(collector.url + "/metrics")[1].decode())
        for s in family.samples
    }
    labels = (
        ("bundle_version", "abc"),
        ("registry_version", "3"),
        ("site", "north"),
        ("state", "serving"),
    )
    assert metrics["shiftguard_fleet_bundle", labels] == 1.0
    assert metrics["shiftguard_fleet_heartbeat_age", (("site", "north"),)] < 3.0

    def about(site: str) -> list[dict[str, Any]]:
        return [a for body in received for a in body["alerts"] if a["site"] == site]

    assert about("south") == []
    south.stop()  # south falls silent: three intervals later it is stale, alerted once
    _wait(lambda: about("south"), timeout=10)
    time.sleep(1.0)
    assert len(about("south")) == 1
    alert = about("south")[0]
    assert (alert["rule"], alert["metric"]) == ("stale_site", "heartbeat_age")
    assert alert["value"] > 3.0
    sites = {s["site"]: s for s in collector.fleet_status()["sites"]}
    assert sites["south"]["stale"] and not sites["north"]["stale"]
    assert sites["north"]["beats"] >= 2 and sites["north"]["processed"] >= 2


def test_a_bad_heartbeat_is_refused_clearly(fleet: Any) -> None:
    collector, _, _ = fleet
    ok = json.dumps({"site": "x", "interval_s": 60}).encode()
    assert _post(collector.url, ok, token=None)[0] == 401
    assert _post(collector.url, ok, token="wrong")[0] == 401
    status, answer = _post(collector.url, b"[1, 2]")
    assert status == 400 and "'site'" in answer["error"]
    status, answer = _post(collector.url, json.dumps({"site": "a b", "interval_s": 60}).encode())
    assert status == 400
    status, answer = _post(collector.url, json.dumps({"site": "x", "interval_s": 0}).encode())
    assert status == 400 and "interval_s" in answer["error"]
    assert _post(collector.url, ok) == (200, {"site": "x", "stored": True})
    assert [s["site"] for s in collector.fleet_status()["sites"]] == ["x"]


def test_fleet_status_prints_the_table_and_fails_on_a_stale_site(
    fleet: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    collector, site, _ = fleet
    north = site("north", "abc")
    _wait(lambda: north.last_heartbeat)
    assert main(["fleet", "status", "--collector", collector.url]) == 0
    out = capsys.readouterr().out
    assert "north" in out and "abc" in out and "1 site(s), 0 stale" in out
    north.stop()
    _wait(lambda: collector.fleet_status()["sites"][0]["stale"])
    assert main(["fleet", "status", "--collector", collector.url, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["sites"][0]["stale"] is True


def test_fleet_status_names_a_collector_it_cannot_reach(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fleet", "status", "--collector", "http://127.0.0.1:9"]) == 2
    assert "cannot be read" in capsys.readouterr().err


def test_the_table_shows_a_rollback_and_staleness() -> None:
    rows = fleet_rows(
        [
            {"site": "a", "received_at": "2000-01-01T00:00:00Z", "interval_s": 60,
             "rolled_back": {"version": "v9", "at": "t", "detail": "output score 5.1"}},
        ]
    )  # fmt: skip
    text = format_table(rows)
    assert "STALE" in text and "rolled back v9 at t: output score 5.1" in text
