"""Label-free performance estimates in the monitor: rules on them, windows carrying them, and a
harmful shift told from a harmless one on constructed records."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from shiftguard.config import AlertRule, MonitorConfig
from shiftguard.monitor.alerts import evaluate, rule_text, streaks
from shiftguard.monitor.report import BundleInfo
from shiftguard.monitor.runner import Monitor, typed
from shiftguard.monitor.score import WindowResult

THRESHOLD = 0.5


def _calibrated(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated probabilities and labels drawn from them."""
    p = rng.beta(0.8, 1.2, n)
    return p, (rng.random(n) < p).astype(int)


def _frame(make_frame: Any, n: int, seed: int, shift: float = 0.0, harm: bool = False) -> Any:
    """Records with calibrated outputs (``harm``: the findings' probabilities collapse towards 0,
    as when a scanner hides the lesions, while the labels stay) and image features shifted by
    ``shift``."""
    rng = np.random.default_rng(seed)
    frame = make_frame(n, seed=seed, shift=shift, scanner="Skyra")
    p, y = _calibrated(rng, n)
    if harm:
        p = np.where(y == 1, p * 0.3, p)
    frame["probability"] = p
    frame["entropy"] = -(p * np.log(p + 1e-12) + (1 - p) * np.log(1 - p + 1e-12))
    frame["finding"] = y
    return frame


@pytest.fixture(scope="module")
def reference(make_frame: Any) -> pd.DataFrame:
    ref = _frame(make_frame, 300, seed=0)
    ref["split"] = np.where(np.arange(300) < 100, "train", "test")
    return ref


def test_rules_on_estimates_are_validated() -> None:
    ok = AlertRule(name="perf", metric="estimated_sensitivity_drop", above=0.1, windows=2)
    assert ok.limit == 0.1 and ok.fires(0.2) and not ok.fires(0.05)
    low = AlertRule(name="sens", metric="estimated_sensitivity@density_ratio", below=0.7)
    assert low.fires(0.6) and not low.fires(0.8)
    assert rule_text(low) == "estimated_sensitivity@density_ratio below 0.7 in a window"
    for bad in (
        {"metric": "estimated_recall", "above": 0.1},
        {"metric": "estimated_sensitivity@nannyml", "above": 0.1},
        {"metric": "unified_score", "above": 1.0, "below": 2.0},
        {"metric": "unified_score"},
    ):
        with pytest.raises(ValidationError):
            AlertRule(name="x", **bad)


def test_a_below_rule_counts_windows_under_its_threshold_and_skips_missing_values() -> None:
    rule = SimpleNamespace(
        name="sens", metric="estimated_sensitivity", above=None, below=0.7, windows=2
    )
    values = [0.8, 0.6, 0.65, math.nan, 0.5, 0.4]
    windows = [
        SimpleNamespace(metric=lambda _, v=v: v, index=i, end="") for i, v in enumerate(values)
    ]
    assert streaks(rule, windows) == [0, 1, 2, 0, 1, 2]
    alerts = evaluate([rule], {"s": windows})
    assert [a.window for a in alerts] == [2, 5]
    assert alerts[0].below and "0.650 < 0.7" in alerts[0].message()


def _monitor(tmp_path: Path, reference: pd.DataFrame, rules: list[dict[str, Any]]) -> Monitor:
    cfg = MonitorConfig(
        alerts=rules,
        window={"size": 100, "min_size": 20},
        drift={"bootstrap": 40},
        estimation={"n_draws": 300, "n_boot": 40},
    )
    info = BundleInfo(name="m", version="1", threshold=THRESHOLD)
    return Monitor(cfg, reference, tmp_path / "state.db", bundle=info)


RULES = [
    {"name": "unified", "metric": "unified_score", "above": 4.0, "windows": 1},
    {"name": "performance", "metric": "estimated_sensitivity_drop", "above": 0.1, "windows": 1},
]


@pytest.mark.parametrize(
    ("shift", "harm", "fired"),
    [
        (0.0, False, set()),  # nothing changes
        (1.5, False, {"unified"}),  # the images drift, the model's outputs do not: harmless
        (0.0, True, {"performance"}),  # the findings fade from the outputs: harmful
    ],
)
def test_the_performance_rule_fires_on_harm_and_stays_quiet_on_a_harmless_drift(
    tmp_path: Path,
    reference: pd.DataFrame,
    make_frame: Any,
    shift: float,
    harm: bool,
    fired: set[str],
) -> None:
    monitor = _monitor(tmp_path, reference, RULES)
    try:
        records = _frame(make_frame, 200, seed=7, shift=shift, harm=harm)
        judged = monitor.update(typed(records.drop(columns=["finding"])))
        assert len(judged) == 2
        for window in judged:
            assert set(window.estimates) == {"cbpe", "density_ratio", "reference"}
            truth = records.iloc[window.first_seq - 1 : window.last_seq]
            positives = truth["finding"] == 1
            realised = float((truth.loc[positives, "probability"] >= THRESHOLD).mean())
            cbpe = window.estimates["cbpe"]["metrics"]["sensitivity"]
            if not harm:  # calibrated here: the estimate tracks the realised sensitivity
                assert cbpe["value"] == pytest.approx(realised, abs=0.15)
        new, _ = monitor.check(notify=False, announce=False)
        assert {a.rule for a in new} == fired
        # the judged windows keep their estimates in the monitor's state
        again = monitor.history()["a"]
        assert again[0].estimates == judged[0].estimates
        assert math.isfinite(again[0].metric("estimated_auroc"))
    finally:
        monitor.close()


def test_a_window_without_estimates_gives_no_value_to_a_rule() -> None:
    window = WindowResult(
        site="s", index=0, n=1, first_seq=1, last_seq=1, start="", end="", drift_share=0.0,
        n_drifted=0, dataset_drift=False, unified_score=0.0, group_scores={},
    )  # fmt: skip
    assert math.isnan(window.metric("estimated_sensitivity"))
    window.estimates = {
        "density_ratio": {"supported": False, "metrics": {"sensitivity": {"value": 0.2}}},
        "cbpe": {"supported": True, "metrics": {"sensitivity": {"value": 0.7}}},
        "reference": {"sensitivity": 0.8},
    }
    assert math.isnan(window.metric("estimated_sensitivity@density_ratio"))  # unsupported
    assert window.metric("estimated_sensitivity_drop") == pytest.approx(0.1)


def test_a_reference_without_labels_leaves_the_monitor_judging_drift(
    tmp_path: Path, reference: pd.DataFrame, make_frame: Any, caplog: pytest.LogCaptureFixture
) -> None:
    monitor = _monitor(tmp_path, reference.drop(columns=["finding"]), RULES)
    try:
        assert monitor.scorer.estimator is None
        assert "performance is not estimated" in caplog.text
        judged = monitor.update(typed(_frame(make_frame, 100, seed=3).drop(columns=["finding"])))
        assert judged and judged[0].estimates == {}
    finally:
        monitor.close()
