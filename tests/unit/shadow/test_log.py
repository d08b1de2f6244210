"""The shadow log read from the edge service's queue and from `edge predict`'s results table."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from shiftguard.edge.queue import WorkQueue
from shiftguard.shadow.log import ShadowLogError, read_shadow_log


def row(series: str, role: str, p: float, **segments: object) -> dict[str, object]:
    return {
        "study_uid": "1.2.3", "series_uid": series, "bundle": f"m-v{1 if role == 'champion' else 2}",
        "role": role, "probability": p, "threshold": 0.5, "result": "", "routed": "",
        "model": "m", "model_version": "1" if role == "champion" else "2", **segments,
    }  # fmt: skip


def test_the_queue_gives_one_row_per_role_and_study_with_its_segments(tmp_path: Path) -> None:
    queue = WorkQueue(tmp_path / "queue.db")
    seg = {"site": "edge-a", "institution": "", "manufacturer": "Canon", "scanner_model": "Orian",
           "sex": "F", "age_band": "60-69", "patient_age": 63.0}  # fmt: skip
    queue.finish_study(
        "1.2.3",
        results=[row("1.1", "champion", 0.2, **seg), row("1.2", "champion", 0.9, **seg),
                 row("1.1", "challenger", 0.4, **seg)],
    )  # fmt: skip
    queue.close()
    log = read_shadow_log(tmp_path / "queue.db")
    assert list(log["role"]) == ["challenger", "champion"]
    champion = log[log["role"] == "champion"].iloc[0]
    # a study is positive when any of its series is: the highest probability counts
    assert champion["probability"] == 0.9 and champion["n_series"] == 2
    assert (champion["site"], champion["scanner_model"], champion["patient_age"]) == (
        "edge-a",
        "Orian",
        63.0,
    )


def test_a_queue_from_before_the_segment_columns_gains_them(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    with sqlite3.connect(path) as db:  # the first release's results table
        db.execute(
            "CREATE TABLE results (study_uid TEXT NOT NULL, series_uid TEXT NOT NULL, bundle TEXT "
            "NOT NULL, role TEXT NOT NULL, probability REAL NOT NULL, threshold REAL NOT NULL, "
            "result TEXT NOT NULL, routed TEXT NOT NULL, created_at REAL NOT NULL, "
            "PRIMARY KEY (study_uid, series_uid, bundle))"
        )
        db.execute("INSERT INTO results VALUES ('1.2.9', '1.1', 'm-v1', 'champion', 0.7, 0.5, "
                   "'finding present', '', 0)")  # fmt: skip
    WorkQueue(path).close()
    log = read_shadow_log(path, site="edge-b")
    assert log.iloc[0]["site"] == "edge-b" and log.iloc[0]["sex"] == "unknown"


def test_a_results_table_is_the_champion_and_the_institution_is_the_site(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    pd.DataFrame(
        [{"study_uid": "1.2.5", "series_uid": "1.5", "probability": 0.3, "threshold": 0.6,
          "model": "m", "model_version": "12", "institution": "Lakeshore", "sex": "M"}]
    ).to_csv(path, index=False)  # fmt: skip
    log = read_shadow_log(path)
    assert log.iloc[0][["role", "bundle", "site", "sex"]].tolist() == [
        "champion",
        "m-v12",
        "Lakeshore",
        "M",
    ]


def test_a_role_that_changed_bundle_is_judged_on_its_latest(tmp_path: Path) -> None:
    queue = WorkQueue(tmp_path / "queue.db")
    queue.finish_study("1.2.3", results=[row("1.1", "champion", 0.2)], now=1.0)
    newer = {**row("1.1", "champion", 0.8), "bundle": "m-v3", "model_version": "3"}
    queue.finish_study("1.2.4", results=[{**newer, "study_uid": "1.2.4"}], now=2.0)
    queue.close()
    log = read_shadow_log(tmp_path / "queue.db")
    assert list(log["bundle"]) == ["m-v3"] and log.attrs["older_bundle_rows"] == 1


def test_unreadable_logs_are_named(tmp_path: Path) -> None:
    with pytest.raises(ShadowLogError, match="no such shadow log"):
        read_shadow_log(tmp_path / "nope.db")
    bad = tmp_path / "results.csv"
    bad.write_text("study_uid,score\n1.2.3,0.5\n")
    with pytest.raises(ShadowLogError, match=r"results.csv: lacks the column\(s\) probability"):
        read_shadow_log(bad)
    bad.write_text("study_uid,probability\n1.2.3,high\n")
    with pytest.raises(ShadowLogError, match=r"study 1\.2\.3: probability is not a number"):
        read_shadow_log(bad)
