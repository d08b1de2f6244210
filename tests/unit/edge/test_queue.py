"""The durable queue: state transitions, exactly-once deliveries, and survival of a killed process."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from shiftguard.edge.queue import DONE, PROCESSING, READY, RECEIVING, WorkQueue


def _fill(q: WorkQueue, study: str, n: int, now: float = 100.0) -> None:
    for i in range(n):
        q.record_instance(
            f"{study}.{i}", study, f"{study}.s", f"/in/{study}/{i}.dcm", "MODALITY", now
        )


def test_a_study_moves_from_receiving_to_done(tmp_path: Path) -> None:
    q = WorkQueue(tmp_path / "q.db")
    _fill(q, "1.1", 3)
    assert q.study_state("1.1") == RECEIVING and q.claim_study() is None
    assert q.mark_ready(["1.1", "9.9"]) == 1
    assert q.claim_study() == "1.1" and q.study_state("1.1") == PROCESSING
    assert q.claim_study() is None  # nobody else gets it
    assert q.study_files("1.1") == [f"/in/1.1/{i}.dcm" for i in range(3)]
    q.finish_study("1.1", [("PACS", "2.25.1", "/out/sr.dcm"), ("PACS", "2.25.2", "/out/sc.dcm")])
    assert q.study_state("1.1") == DONE
    assert [d.sop_uid for d in q.due("PACS")] == ["2.25.1", "2.25.2"]
    assert q.counts()["deliveries_pending"] == 2 and q.counts()["instances"] == 3


def test_duplicates_are_ignored_and_late_instances_reopen_the_study(tmp_path: Path) -> None:
    q = WorkQueue(tmp_path / "q.db")
    _fill(q, "1.1", 2)
    assert not q.record_instance("1.1.0", "1.1", "1.1.s", "/in/again.dcm", "MODALITY")
    q.mark_ready(["1.1"])
    assert q.claim_study() == "1.1"
    q.finish_study("1.1", [("PACS", "2.25.1", "/out/sr.dcm")])
    assert q.record_instance("1.1.9", "1.1", "1.1.s", "/in/late.dcm", "MODALITY")
    assert q.study_state("1.1") == RECEIVING
    q.mark_ready(["1.1"])
    assert q.claim_study() == "1.1"
    # the same result again (deterministic UID): still one delivery
    q.finish_study("1.1", [("PACS", "2.25.1", "/out/sr.dcm")])
    assert len(q.due("PACS")) == 1


def test_stability_time_is_the_fallback(tmp_path: Path) -> None:
    q = WorkQueue(tmp_path / "q.db")
    _fill(q, "1.1", 1, now=100.0)
    _fill(q, "1.2", 1, now=108.0)
    assert q.mark_stable(5.0, now=110.0) == ["1.1"]
    assert q.study_state("1.2") == RECEIVING and q.study_state("1.1") == READY


def test_retries_back_off_and_deliveries_are_per_destination(tmp_path: Path) -> None:
    q = WorkQueue(tmp_path / "q.db")
    _fill(q, "1.1", 1)
    q.mark_ready(["1.1"])
    q.claim_study()
    q.finish_study("1.1", [("PACS", "2.25.1", "/o/a"), ("RESEARCH", "2.25.1", "/o/a")], now=0.0)
    [pacs] = q.due("PACS", now=0.0)
    q.retry_later(pacs.id, "connection refused", delay_s=30.0, now=0.0)
    assert q.due("PACS", now=10.0) == [] and len(q.due("RESEARCH", now=10.0)) == 1
    [again] = q.due("PACS", now=31.0)
    assert again.attempts == 1
    q.delivered(again.id, now=31.0)
    assert q.due("PACS", now=1e9) == [] and q.counts()["deliveries_sent"] == 1


WORK_THEN_DIE = """
import os, signal, sys
from shiftguard.edge.queue import WorkQueue
q = WorkQueue(sys.argv[1])
for i in range(2):
    q.record_instance(f"1.1.{i}", "1.1", "1.1.s", f"/in/{i}.dcm", "MODALITY", 100.0)
q.mark_ready(["1.1"])
q.claim_study()
os.kill(os.getpid(), signal.SIGKILL)  # mid-processing, no clean shutdown
"""


def test_a_killed_process_loses_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "q.db")
    proc = subprocess.run([sys.executable, "-c", WORK_THEN_DIE, path], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    q = WorkQueue(path)
    assert q.study_state("1.1") == PROCESSING and q.counts()["instances"] == 2
    assert q.recover() == 1 and q.claim_study() == "1.1"


def test_shadow_log_keeps_every_bundles_results(tmp_path: Path) -> None:
    q = WorkQueue(tmp_path / "q.db")
    _fill(q, "1.1", 1)
    q.mark_ready(["1.1"])
    q.claim_study()
    row = {"study_uid": "1.1", "series_uid": "1.1.s", "threshold": 0.5, "routed": "shadow"}
    q.finish_study(
        "1.1",
        results=[
            {
                **row,
                "bundle": "m-v1",
                "role": "champion",
                "probability": 0.8,
                "result": "finding present",
            },
            {
                **row,
                "bundle": "m-v2",
                "role": "challenger",
                "probability": 0.3,
                "result": "no finding",
            },
        ],
    )
    log = q.shadow_log()
    assert [(r["bundle"], r["role"]) for r in log] == [("m-v1", "champion"), ("m-v2", "challenger")]


def test_new_instances_after_the_results_start_a_revision_and_replace_unsent_ones(
    tmp_path: Path,
) -> None:
    q = WorkQueue(tmp_path / "q.db")
    _fill(q, "1.1", 2)
    q.mark_ready(["1.1"])
    assert q.claim_study() == "1.1" and q.study_revision("1.1") == 0
    q.finish_study("1.1", [("PACS", "2.25.1", "/out/sr.dcm")])
    # a resend of what it has changes nothing; an instance it lacked makes the next revision
    assert not q.record_instance("1.1.0", "1.1", "1.1.s", "/in/1.1/0.dcm", "MODALITY")
    assert q.study_state("1.1") == DONE and q.study_revision("1.1") == 0
    assert q.record_instance("1.1.2", "1.1", "1.1.s", "/in/1.1/2.dcm", "MODALITY")
    assert q.record_instance("1.1.3", "1.1", "1.1.s", "/in/1.1/3.dcm", "MODALITY")
    assert q.study_state("1.1") == RECEIVING and q.study_revision("1.1") == 1  # once per reopening
    q.mark_ready(["1.1"])
    assert q.claim_study() == "1.1"
    q.finish_study("1.1", [("PACS", "2.25.2", "/out/sr.dcm")])
    # the first revision's result, never sent, is superseded: only the latest goes out
    assert [d.sop_uid for d in q.due("PACS")] == ["2.25.2"]
    assert q.counts()["deliveries_superseded"] == 1
    assert WorkQueue(tmp_path / "q.db").study_revision("1.1") == 1  # on disk
    assert q.study_revision("9.9") == 0


def test_a_queue_from_before_revisions_gains_the_column(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "q.db"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE studies (study_uid TEXT PRIMARY KEY, state TEXT NOT NULL, calling_ae TEXT "
        "NOT NULL, first_received REAL NOT NULL, last_received REAL NOT NULL, ready_at REAL, "
        "done_at REAL, attempts INTEGER NOT NULL DEFAULT 0, error TEXT NOT NULL DEFAULT '')"
    )
    db.execute("INSERT INTO studies (study_uid, state, calling_ae, first_received, last_received)"
               " VALUES ('1.1', 'done', 'MODALITY', 1.0, 1.0)")  # fmt: skip
    db.commit()
    db.close()
    q = WorkQueue(path)
    assert q.study_revision("1.1") == 0 and q.study_state("1.1") == DONE


def test_instances_arriving_while_the_study_is_processed_are_processed_too(
    tmp_path: Path,
) -> None:
    q = WorkQueue(tmp_path / "q.db")
    _fill(q, "1.1", 2, now=100.0)
    q.mark_ready(["1.1"], now=101.0)
    assert q.claim_study() == "1.1"
    revision = q.study_revision("1.1")  # what the worker read before the study's files
    # a second association brings more of the study while its first part is processed
    assert q.record_instance("1.1.2", "1.1", "1.1.s", "/in/1.1/2.dcm", "MODALITY", now=102.0)
    q.finish_study("1.1", [("PACS", "2.25.1", "/o/sr")], now=103.0, revision=revision)
    assert q.study_state("1.1") == RECEIVING  # not done: waits for that association's release
    q.mark_ready(["1.1"], now=104.0)
    assert q.claim_study() == "1.1" and q.study_revision("1.1") == revision + 1
    assert len(q.study_files("1.1")) == 3
    # released while still processing: ready again as soon as the processing ends
    assert q.record_instance("1.1.3", "1.1", "1.1.s", "/in/1.1/3.dcm", "MODALITY", now=105.0)
    q.mark_ready(["1.1"], now=106.0)
    assert q.study_state("1.1") == PROCESSING
    q.finish_study("1.1", [("PACS", "2.25.2", "/o/sr")], now=107.0, revision=revision + 1)
    assert q.study_state("1.1") == READY and q.claim_study() == "1.1"
    q.finish_study("1.1", [("PACS", "2.25.3", "/o/sr")], now=108.0, revision=revision + 2)
    assert q.study_state("1.1") == DONE
    # the earlier revisions' results, not sent yet, are superseded by the last
    assert [d.sop_uid for d in q.due("PACS", now=1e9)] == ["2.25.3"]
    assert q.counts()["deliveries_superseded"] == 2
