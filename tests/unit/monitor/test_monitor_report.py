"""Evidently's workspace and HTML report written the way the DVC stage ``monitor`` writes them:
the same records give the same bytes (Evidently's ids seeded, the judging time fixed)."""

from __future__ import annotations

import uuid
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pandas as pd

from shiftguard.config import MonitorConfig
from shiftguard.monitor.report import seeded_ids, write_page
from shiftguard.monitor.runner import Monitor
from shiftguard.records.features import BY_NAME, FEATURE_NAMES

EMBEDDING = [n for n in FEATURE_NAMES if BY_NAME[n].group == "embedding"]


def _write(out: Path, reference: pd.DataFrame, records: pd.DataFrame, seeded: bool) -> None:
    """The stage's writing, small: one judged window into a workspace, its page rendered from the
    snapshot the workspace holds."""
    cfg = MonitorConfig(window={"size": 30, "min_size": 20}, drift={"bootstrap": 20}, html="none")
    with seeded_ids() if seeded else nullcontext():
        monitor = Monitor(
            cfg, reference, out / "monitor.db", workspace=out / "workspace",
            clock=lambda: "2026-01-01T00:00:00Z",
        )  # fmt: skip
        [result] = monitor.update(records, judge_open=True)
        monitor.check(notify=False)
        monitor.close()
        write_page(out / "drift.html", monitor.latest[result.site], cfg.alerts)


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_the_workspace_report_and_state_are_the_same_bytes_for_the_same_records(
    tmp_path: Path, make_frame: Any
) -> None:
    # no embedding: Evidently's embedding drift draws a t-SNE, which takes a minute on 2 cores
    unknown = dict.fromkeys(EMBEDDING, float("nan"))
    reference = make_frame(60, seed=0).assign(split="val", **unknown)
    records = make_frame(30, seed=4, shift=1.0, scanner="Vantage").assign(**unknown)
    real4 = uuid.uuid4
    _write(tmp_path / "a", reference, records, seeded=True)
    _write(tmp_path / "b", reference, records, seeded=True)
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert {"monitor.db", "drift.html"} <= set(a)
    assert any(name.endswith("dashboard.json") for name in a)
    assert a.keys() == b.keys()  # the project's and snapshots' ids name folders and files
    assert [name for name in a if a[name] != b[name]] == []
    # left, the ids are random again: the swap is undone in every module that held them
    import evidently.core.metric_types
    import evidently.legacy.renderers.html_widgets
    import uuid6

    assert uuid.uuid4 is real4 and evidently.core.metric_types.uuid.uuid4 is real4
    assert uuid6.uuid7().int != uuid6.uuid7().int
    assert evidently.legacy.renderers.html_widgets.uuid7 is uuid6.uuid7
    # without the seed, Evidently's ids differ from run to run (what the stage had before)
    _write(tmp_path / "c", reference, records, seeded=False)
    c = _tree(tmp_path / "c")
    assert c["drift.html"] != a["drift.html"] and c.keys() != a.keys()
