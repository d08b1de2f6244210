"""Windows, the unified drift score, alert rules and the monitor's state, on constructed records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from shiftguard.config import AlertRule, MonitorConfig
from shiftguard.monitor.alerts import evaluate, post_webhook
from shiftguard.monitor.runner import Monitor, typed
from shiftguard.monitor.score import Scorer, cut_windows
from shiftguard.records.distance import distance


@pytest.fixture(scope="module")
def reference(make_frame: Any) -> pd.DataFrame:
    return make_frame(150, seed=0)


@pytest.fixture(scope="module")
def scorer(reference: pd.DataFrame) -> Scorer:
    return Scorer(typed(reference), bootstrap=60, seed=1)


def test_distance_is_ks_for_numbers_and_jensen_shannon_for_categories() -> None:
    from scipy.spatial.distance import jensenshannon
    from scipy.stats import ks_2samp

    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 1, 80), rng.normal(0.5, 1, 40)
    b[3] = np.nan  # missing values are left out
    assert distance(a, b, "numerical") == pytest.approx(ks_2samp(a, b[~np.isnan(b)]).statistic)
    x = np.array(["a", "a", "b", None], dtype=object)
    y = np.array(["b", "c", "c"], dtype=object)
    expected = jensenshannon([2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3])
    assert distance(x, y, "categorical") == pytest.approx(expected)
    assert distance(np.array([np.nan]), b, "numerical") is None


def test_in_distribution_windows_score_near_zero_and_a_shift_scores_high(
    scorer: Scorer, make_frame: Any
) -> None:
    frame = make_frame
    quiet = [scorer.judge(typed(frame(50, seed=10 + i)))[1] for i in range(8)]
    assert max(abs(q) for q in quiet) < 2.5, quiet
    _, shifted, groups = scorer.judge(typed(frame(50, seed=99, shift=1.0, scanner="Vantage")))
    assert shifted > 5 and groups["metadata"] > 5 and groups["image"] > 5
    assert abs(groups["output"]) < 3  # outputs did not move


def test_the_null_calibration_depends_on_the_window_size(scorer: Scorer) -> None:
    mean_small, spread_small = scorer.null(20)
    mean_large, spread_large = scorer.null(100)
    assert mean_small["snr"] > mean_large["snr"] and spread_small["snr"] > spread_large["snr"]


def test_count_and_time_windows() -> None:
    records = pd.DataFrame({"seq": range(1, 12), "processed_at": "2026-11-01T00:00:00Z"})
    windows = cut_windows(records, "count", 5, 24, 2)
    assert [(i, len(r), c) for i, r, c in windows] == [(0, 5, True), (1, 5, True), (2, 1, False)]
    records["processed_at"] = (
        ["2026-11-01T01:00:00Z"] * 4 + ["2026-11-01T09:00:00Z"] * 4 + ["2026-11-02T03:00:00Z"] * 3
    )
    timed = cut_windows(records, "time", 5, 6.0, 3)
    assert [(i, len(r), c) for i, r, c in timed] == [(0, 4, True), (1, 4, True), (4, 3, False)]
    records.loc[2, "processed_at"] = "yesterday"
    with pytest.raises(ValueError, match="'yesterday' is not an ISO-8601 time"):
        cut_windows(records, "time", 5, 6.0, 3)


class _Window:
    def __init__(self, index: int, value: float) -> None:
        self.index, self.end, self.value = index, f"t{index}", value

    def metric(self, name: str) -> float:
        if name != "unified_score":
            raise KeyError(name)
        return self.value


def test_a_rule_fires_only_after_k_consecutive_windows_above_its_threshold() -> None:
    rule = AlertRule(name="u", metric="unified_score", above=3.0, windows=2)
    values = [0.1, 4.0, 0.5, 4.0, 5.0, 6.0]
    alerts = evaluate([rule], {"a": [_Window(i, v) for i, v in enumerate(values)]})
    assert [a.window for a in alerts] == [4, 5]  # window 1 alone is not enough
    assert "unified_score = 5.000 > 3" in alerts[0].message()
    unknown = AlertRule(name="x", metric="drift:nothing", above=0.5)
    assert evaluate([unknown], {"a": [_Window(0, 9.0)]}) == []


def test_alert_rules_name_a_bad_metric() -> None:
    with pytest.raises(ValueError, match="metric 'accuracy' is not"):
        AlertRule(name="bad", metric="accuracy", above=1)


def test_monitor_judges_complete_windows_once_and_alerts_once(
    tmp_path: Path, reference: pd.DataFrame, webhook, make_frame: Any
) -> None:
    frame = make_frame
    url, received = webhook
    cfg = MonitorConfig(
        window={"size": 40, "min_size": 20},
        drift={"bootstrap": 40},
        alerts=[
            {"name": "unified", "metric": "unified_score", "above": 4.0, "windows": 2},
            {"name": "scanner", "metric": "drift:scanner_model", "above": 0.5},
        ],
        webhook=url,
    )
    monitor = Monitor(cfg, reference, tmp_path / "state.db")
    stream = pd.concat(
        [frame(80, seed=5), frame(80, seed=6, shift=1.0, scanner="Vantage")], ignore_index=True
    )
    stream["seq"] = range(1, len(stream) + 1)
    first = monitor.update(stream.iloc[:100])  # windows 0 and 1 complete, 2 open
    assert [w.index for w in first] == [0, 1]
    new, active = monitor.check()
    assert new == [] and active == []
    assert monitor.update(stream.iloc[:100]) == []  # nothing new to judge
    later = monitor.update(stream)
    assert [w.index for w in later] == [2, 3]
    new, active = monitor.check()
    assert {(a.rule, a.window) for a in new} == {("scanner", 2), ("scanner", 3), ("unified", 3)}
    assert {a.rule for a in active} == {"scanner", "unified"}  # on the latest window, 3
    assert len(received) == 1 and len(received[0]["alerts"]) == 3  # posted once
    again, _ = monitor.check()
    assert again == [] and len(received) == 1  # recorded: not raised twice
    monitor.close()
    reopened = Monitor(cfg, reference, tmp_path / "state.db")
    assert sorted(w.index for w in reopened.history()["a"]) == [0, 1, 2, 3]
    assert len(reopened.alerts()) == 3
    reopened.close()


def test_a_webhook_that_is_down_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    from shiftguard.monitor.alerts import Alert

    alert = Alert("u", "a", 1, "unified_score", 5.0, 4.0, 1, "t")
    assert post_webhook("http://127.0.0.1:9/nothing-listens", [alert], timeout=1) is False
    assert "the alerts stay recorded" in caplog.text


def test_the_embedding_snapshot_needs_enough_rows(make_frame: Any) -> None:
    from datetime import datetime

    from shiftguard.monitor.report import embedding_snapshot
    from shiftguard.monitor.score import WindowResult

    result = WindowResult("a", 0, 10, 1, 10, "", "", 0.0, 0, False, 0.0, {})
    when = datetime(2026, 11, 1)
    assert embedding_snapshot(make_frame(10, 1), make_frame(20, 2), result, when) is None
    assert embedding_snapshot(make_frame(30, 1), make_frame(40, 2), result, when) is not None
