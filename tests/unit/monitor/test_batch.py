"""The monitor over a batch of past studies, as the DVC stage ``monitor`` runs it: windows in the
studies' time order, a page rendered from the snapshots the workspace holds, the alert rules as the
snapshots' tests, the figures in metrics.json."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from shiftguard.config import MonitorConfig
from shiftguard.monitor import batch
from shiftguard.monitor.report import BundleInfo, snapshot, verdicts
from shiftguard.monitor.runner import ResultsFileError, _stamp, records_from_results
from shiftguard.records.features import BY_NAME, FEATURE_NAMES

OUTPUTS = [n for n in FEATURE_NAMES if BY_NAME[n].group in ("output", "embedding")]
SITE = "unseen"
BUNDLE = BundleInfo(name="test-classifier", version="0a1b2c3d4e5f", sha256="9f" * 32)


def _config() -> MonitorConfig:
    return MonitorConfig(
        window={"min_size": 20, "batch_windows": 3},
        drift={"bootstrap": 20},
        alerts=[
            {"name": "unified", "metric": "unified_score", "above": 1.0, "windows": 2},
            {"name": "new_scanner", "metric": "novel:scanner_model", "above": 0.1},
            {"name": "calm", "metric": "drift_share", "above": 0.99},
        ],
    )


def _reference(make_frame: Any) -> pd.DataFrame:
    """Held-out rows like the live ones' outputs, training rows whose outputs are far off (the
    network fitted them): judged right, only the held-out rows count for outputs."""
    held_out = make_frame(40, seed=0).assign(split="val")
    train = make_frame(40, seed=1).assign(split="train")
    train[OUTPUTS] = train[OUTPUTS] + 3.0
    return pd.concat([train, held_out], ignore_index=True)


def _results(make_frame: Any, path: Path) -> pd.DataFrame:
    """An ``edge predict`` results file of 62 studies of a new scanner, in an order that is not
    their time order; returns the rows with their study times."""
    rows = make_frame(62, seed=4, shift=1.0, scanner="Vantage")
    rng = np.random.default_rng(5)
    days = np.sort(rng.choice(700, len(rows), replace=False))
    times = pd.Timestamp("2020-01-01") + pd.to_timedelta(days, unit="D") + pd.Timedelta(hours=9)
    rows = rows.assign(
        study_datetime=times.strftime("%Y-%m-%dT%H:%M:%S"),
        series_uid=[f"2.25.{i}" for i in range(len(rows))],
        model="test-classifier",
        model_version="0a1b2c3d4e5f",
    ).drop(columns=["site", "processed_at"])
    rows = rows.sample(frac=1.0, random_state=3).reset_index(drop=True)  # file order != time
    rows.to_csv(path, index=False)
    return rows


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory, make_frame: Any) -> dict[str, Any]:
    """The batch run once, as the stage runs it (the bundle replaced by its reference table)."""
    root = tmp_path_factory.mktemp("batch")
    reference = _reference(make_frame)
    rows = _results(make_frame, root / "results.csv")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batch, "reference_from_bundle", lambda _: reference)
        mp.setattr(batch, "bundle_info", lambda _: BUNDLE)
        figures = batch.run(
            _config(),
            root / "b.sgbundle",
            root / "results.csv",
            root / "out",
            root / "reports",
            SITE,
        )
    return {"root": root, "figures": figures, "rows": rows, "reference": reference}


def _page_widgets(text: str) -> list[dict[str, Any]]:
    """The widgets of the Evidently dashboard a page embeds as JSON."""
    found = re.search(r"var metric_\w+ = (.*);\n", text)
    assert found, "the page embeds no Evidently dashboard"
    return list(json.loads(found.group(1))["widgets"])


def _snapshots(root: Path) -> dict[str, dict[str, Any]]:
    """The workspace's snapshots by name."""
    files = sorted((root / "out/workspace").glob("*/snapshots/*.json"))
    return {s["name"]: s for s in (json.loads(f.read_text()) for f in files)}


def _latest(stage: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    index = stage["figures"]["window"]["window"]
    snaps = _snapshots(stage["root"])
    return snaps[f"{SITE} window {index}"], snaps.get(f"{SITE} window {index} embedding")


def _held(snap: dict[str, Any], embedding: dict[str, Any] | None) -> dict[str, Any]:
    widgets = snap["widgets"] + snap["tests_widgets"] + (embedding or {}).get("widgets", [])
    return verdicts(widgets)


def _compared(page: dict[str, Any], held: dict[str, Any]) -> list[str]:
    keys = ("columns", "dataset_drift", "n_drifted", "embedding_drift", "tests")
    return [k for k in keys if page[k] != held[k]]


def test_the_page_and_the_workspace_snapshot_agree_on_every_verdict(stage: dict[str, Any]) -> None:
    root, figures = stage["root"], stage["figures"]
    page = verdicts(_page_widgets((root / "reports/drift.html").read_text()))
    snap, embedding = _latest(stage)
    held = _held(snap, embedding)
    assert held["columns"] and held["tests"] and held["n_drifted"] is not None
    assert held["embedding_drift"] is not None  # the window had enough rows for it
    assert _compared(page, held) == []
    # and both agree with the figures the stage wrote
    assert held["n_drifted"] == figures["n_drifted"] == sum(held["columns"].values())
    assert sorted(c for c, d in held["columns"].items() if d) == figures["drifted"]
    assert held["embedding_drift"] == figures["embedding_drift"]
    failed = {t.split("'alert ")[1].split(":")[0] for t, s in held["tests"].items() if s == "fail"}
    assert sorted(failed) == figures["alerts"]
    # the comparison sees what recomputing the snapshot for the page did: all the studies, the
    # reference with the training rows' outputs, gave other verdicts
    records = records_from_results(root / "results.csv", SITE, time_column="study_datetime")
    from shiftguard.monitor.score import WindowResult

    state = sqlite3.connect(root / "out/monitor.db")
    [(text,)] = state.execute(
        "SELECT result FROM windows WHERE idx = ?", (figures["window"]["window"],)
    )
    state.close()
    result = WindowResult(**json.loads(text))
    recomputed = snapshot(records, stage["reference"], result, _stamp(result.end))
    again = verdicts(w.dict() for w in recomputed.to_snapshot_model().widgets)
    assert "columns" in _compared(again, held)


def test_the_page_header_names_site_window_dates_bundle_score_and_alerts(
    stage: dict[str, Any],
) -> None:
    text = (stage["root"] / "reports/drift.html").read_text()
    figures = stage["figures"]
    header = text[text.index('<div id="shiftguard">') : text.index("Evidently report</h2>")]
    window = figures["window"]
    assert f"<title>ShiftGuard drift report: {SITE}, window {window['window']}</title>" in text
    for shown in (
        SITE,
        f"#{window['window']}: {window['n']} studies",
        window["start"][:10],
        window["end"][:10],
        BUNDLE.name,
        BUNDLE.version,
        BUNDLE.sha256[:12],
        f"{figures['unified_score']:.2f}",
        f"{figures['n_drifted']} of",
    ):
        assert shown in header, shown
    for rule in _config().alerts:
        assert rule.name in header and f"{rule.metric} above {rule.above:g}" in header
    fired = re.findall(
        r"<td>(\w+)</td><td>[^<]*</td><td>[^<]*</td><td>\d+</td><td class=\"fire\">", header
    )
    assert sorted(fired) == figures["alerts"]
    assert "new_scanner" in fired and "calm" not in fired


def test_drifted_features_come_first_in_the_drift_tables(stage: dict[str, Any]) -> None:
    text = (stage["root"] / "reports/drift.html").read_text()
    for source in (verdicts(_page_widgets(text)), _held(*_latest(stage))):
        order = list(source["columns"].values())
        assert True in order and False in order  # both kinds: the order says something
        assert order == sorted(order, reverse=True)
    header = text[text.index("Features, drifted first") : text.index("Evidently report</h2>")]
    flags = re.findall(
        r"<td>[^<]*</td><td>(?:metadata|image|output|embedding)</td><td>(yes|no)", header
    )
    assert flags and flags == sorted(flags, reverse=True)  # "yes" before "no"
    zs = [float(z) for z in re.findall(r"<td>(?:yes)</td><td>([-0-9.e]+)</td>", header)]
    assert zs == sorted(zs, reverse=True)


def test_the_tests_are_the_alert_rules_and_no_automatic_evidently_test(
    stage: dict[str, Any],
) -> None:
    rules = _config().alerts
    for name, snap in _snapshots(stage["root"]).items():
        results = [t for m in snap["metric_results"].values() for t in m.get("tests") or []]
        if name.endswith("embedding"):
            assert results == []
            continue
        assert len(results) == len(rules)
        assert all("'alert " in t["name"] for t in results), [t["name"] for t in results]
        window = int(name.rsplit(" ", 1)[1])
        [row] = [w for w in stage["figures"]["windows"] if w["window"] == window]
        failed = sorted(
            t["name"].split("'alert ")[1].split(":")[0] for t in results if t["status"] == "FAIL"
        )
        assert failed == row["alerts"]


def test_windows_follow_the_studies_in_time_and_are_dated_by_them(stage: dict[str, Any]) -> None:
    figures, rows = stage["figures"], stage["rows"]
    times = sorted(pd.to_datetime(rows["study_datetime"], utc=True))
    windows = figures["windows"]
    assert len(windows) == 3 and all(w["n"] >= 20 for w in windows)
    assert sum(w["n"] for w in windows) == figures["n_studies"] == len(rows)
    first = 0
    for w in windows:  # each window is a run of consecutive studies in time
        stamps = times[first : first + w["n"]]
        assert pd.Timestamp(w["start"]) == stamps[0] and pd.Timestamp(w["end"]) == stamps[-1]
        first += w["n"]
    snaps = _snapshots(stage["root"])
    for w in windows:
        stamp = pd.Timestamp(snaps[f"{SITE} window {w['window']}"]["timestamp"], tz="UTC")
        assert stamp == pd.Timestamp(w["end"])
    state = sqlite3.connect(stage["root"] / "out/monitor.db")
    judged = {t for (t,) in state.execute("SELECT judged_at FROM windows")}
    state.close()
    assert judged == {times[-1].strftime("%Y-%m-%dT%H:%M:%SZ")}


def test_the_same_results_give_the_same_files(
    stage: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = stage["root"]
    monkeypatch.setattr(batch, "reference_from_bundle", lambda _: stage["reference"])
    monkeypatch.setattr(batch, "bundle_info", lambda _: BUNDLE)
    batch.run(_config(), root / "b.sgbundle", root / "results.csv", tmp_path / "out",
              tmp_path / "reports", SITE)  # fmt: skip

    def tree(*folders: Path) -> dict[str, bytes]:
        return {
            f"{p.relative_to(folder)}": p.read_bytes()
            for folder in folders
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }

    a, b = tree(root / "out", root / "reports"), tree(tmp_path / "out", tmp_path / "reports")
    assert "drift.html" in a and a.keys() == b.keys()
    assert [name for name in a if a[name] != b[name]] == []


def test_too_few_studies_are_not_judged_and_the_page_says_why(
    tmp_path: Path, make_frame: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = _results(make_frame, tmp_path / "all.csv").head(12)
    rows.to_csv(tmp_path / "results.csv", index=False)
    monkeypatch.setattr(batch, "reference_from_bundle", lambda _: _reference(make_frame))
    monkeypatch.setattr(batch, "bundle_info", lambda _: BUNDLE)
    figures = batch.run(_config(), tmp_path / "b.sgbundle", tmp_path / "results.csv",
                        tmp_path / "out", tmp_path / "reports", SITE)  # fmt: skip
    assert figures["judged"] is False and figures["n_studies"] == 12
    assert "fewer than monitor.window.min_size (20)" in figures["reason"]
    assert figures["reason"] in (tmp_path / "reports/drift.html").read_text()
    assert json.loads((tmp_path / "reports/metrics.json").read_text()) == figures
    # the stage's output folder exists even so (DVC fails a stage whose output is missing)
    assert json.loads((tmp_path / "out/not-judged.json").read_text())["n_studies"] == 12


def test_records_are_dated_and_ordered_by_their_studies(tmp_path: Path, make_frame: Any) -> None:
    rows = _results(make_frame, tmp_path / "results.csv")
    records = records_from_results(tmp_path / "results.csv", SITE, time_column="study_datetime")
    expected = pd.to_datetime(rows["study_datetime"], utc=True).sort_values()
    assert list(pd.to_datetime(records["processed_at"], utc=True)) == list(expected)
    assert list(records["seq"]) == list(range(1, len(rows) + 1))
    rows.loc[5, "study_datetime"] = "not a time"
    rows.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ResultsFileError, match=r"'not a time'.* is not an ISO 8601 time"):
        records_from_results(tmp_path / "bad.csv", SITE, time_column="study_datetime")
    rows.drop(columns="study_datetime").to_csv(tmp_path / "old.csv", index=False)
    with pytest.raises(ResultsFileError, match=r"lacks the column.* study_datetime"):
        records_from_results(tmp_path / "old.csv", SITE, time_column="study_datetime")
