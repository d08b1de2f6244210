"""Drift scenarios: streams drawn from pools, detection delay and false alarms, and the scenario
files in conf/ (each must load; the committed run's results are checked by the pipeline test)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shiftguard.config import (
    AlertRule,
    CohortConfig,
    ScenarioConfig,
    SplitConfig,
    compose,
    validate,
)
from shiftguard.monitor.runner import typed
from shiftguard.monitor.scenarios import (
    Condition,
    condition_cohort,
    draw_stream,
    load_scenarios,
    run_scenario,
    training_scanners,
)
from shiftguard.monitor.score import Scorer

REPO = Path(__file__).resolve().parents[3]
RULES = [
    AlertRule(name="unified", metric="unified_score", above=4.0, windows=2),
    AlertRule(name="new_scanner", metric="novel:scanner_model", above=0.1),
]
NEW = Condition(("vantage_15t",))


@pytest.fixture(scope="module")
def pools(make_frame) -> dict[Condition, pd.DataFrame]:
    frame = make_frame
    training = typed(frame(200, seed=21))
    training["finding"] = (np.arange(200) % 3 == 0).astype(int)
    new = typed(frame(120, seed=22, shift=1.0, scanner="Vantage"))
    new["finding"] = 0
    return {Condition(): training, NEW: new}


@pytest.fixture(scope="module")
def scorer(make_frame) -> Scorer:
    return Scorer(typed(make_frame(150, seed=0)), bootstrap=60, seed=2)


def scenario(**data) -> ScenarioConfig:
    return ScenarioConfig.model_validate({"name": "s", **data})


def test_a_stream_follows_its_phases_prevalence_and_ramp(pools) -> None:
    stream, labels = draw_stream(
        scenario(
            phases=[
                {"studies": 150},
                {"studies": 300, "prevalence": 0.85},
                {"studies": 400, "scanners": ["vantage_15t"], "ramp": True},
            ]
        ),
        pools,
    )
    assert len(stream) == 850 and list(stream["seq"]) == list(range(1, 851))
    first = stream.iloc[:150]
    assert first.index.size == 150 and first["scanner_model"].eq("Skyra").all()
    assert stream.iloc[150:450]["finding"].mean() == pytest.approx(0.85, abs=0.06)
    ramp = np.array([label == NEW.label for label in labels[450:]])
    assert ramp[:100].mean() < 0.3 and ramp[-100:].mean() > 0.7  # the new scanner takes over
    # without replacement while the pool lasts: the first 150 draws are 150 distinct studies
    assert first.drop(columns=["seq"]).drop_duplicates().shape[0] == 150


def test_a_new_scanner_is_flagged_in_the_first_window_after_its_onset(pools, scorer) -> None:
    result = run_scenario(
        scenario(
            phases=[{"studies": 200}, {"studies": 200, "scanners": ["vantage_15t"]}],
            onset=200,
            expect_detection_within=100,
        ),
        pools,
        scorer,
        window_size=50,
        rules=RULES,
    )
    assert result.false_alarms == 0
    assert result.detected_at == 250 and result.delay == 50 and result.met is True
    assert "new_scanner" in (result.first_alert or "")


def test_without_drift_every_alert_is_a_false_alarm(pools, scorer) -> None:
    quiet = run_scenario(scenario(phases=[{"studies": 400}]), pools, scorer, 50, RULES)
    assert quiet.false_alarms == 0 and quiet.met is True and quiet.delay is None
    touchy = [AlertRule(name="any", metric="unified_score", above=-10.0)]
    noisy = run_scenario(scenario(phases=[{"studies": 400}]), pools, scorer, 50, touchy)
    assert noisy.false_alarms == noisy.windows == 8 and noisy.met is False


def test_a_pool_without_positives_cannot_serve_a_prevalence(pools) -> None:
    with pytest.raises(ValueError, match="has no positive study"):
        draw_stream(
            scenario(phases=[{"studies": 5, "scanners": ["vantage_15t"], "prevalence": 1}]), pools
        )


def test_conditions_change_the_cohort_as_asked() -> None:
    config = compose([], conf_dir=REPO / "conf")
    cohort = validate("cohort", config["cohort"], CohortConfig)
    split = validate("split", config["split"], SplitConfig)
    assert "vantage_15t" not in training_scanners(cohort, split)
    thick = condition_cohort(cohort, split, Condition(slice_thickness_mm=5.0), 20, 3)
    for name in training_scanners(cohort, split):
        before, after = cohort.scanners[name], thick.scanners[name]
        assert after.slice_thickness == 5.0
        assert after.n_slices * 5.0 == pytest.approx(before.n_slices * before.slice_spacing, abs=5)
    assert thick.n_subjects == 20 and {s.scanner for s in thick.sites} == set(
        training_scanners(cohort, split)
    )
    with pytest.raises(ValueError, match="scenario scanner\\(s\\) nope: not among"):
        condition_cohort(cohort, split, Condition(("nope",)), 5, 1)


def test_every_scenario_in_conf_loads_and_bad_files_are_named(tmp_path: Path) -> None:
    scenarios = load_scenarios(REPO / "conf" / "monitor" / "scenarios")
    names = {s.name for s in scenarios}
    assert {"in_distribution", "new_scanner", "protocol_change", "prevalence_shift"} <= names
    assert {"gradual_drift"} <= names
    for s in scenarios:
        assert (s.onset is None) == (s.name == "in_distribution")
    (tmp_path / "bad.yaml").write_text("name: bad\nphases: []\n")
    from shiftguard.config import ConfigError

    with pytest.raises(ConfigError, match="phases"):
        load_scenarios(tmp_path)
    with pytest.raises(ValueError, match="no scenario named missing"):
        load_scenarios(REPO / "conf" / "monitor" / "scenarios", ["missing"])


def test_the_committed_scenario_run_meets_the_targets() -> None:
    """``reports/monitor/scenarios.json`` is the DVC stage's output for the committed bundle and
    scenarios (test_dvc_lock keeps it in step with them): every scenario ran, none raised a false
    alarm, and each met the target its file sets (a new scanner within 100 studies)."""
    import json

    results = json.loads((REPO / "reports" / "monitor" / "scenarios.json").read_text())
    by_name = {r["name"]: r for r in results["scenarios"]}
    files = load_scenarios(REPO / "conf" / "monitor" / "scenarios")
    assert set(by_name) == {s.name for s in files}
    assert by_name["in_distribution"]["studies"] >= 2000
    assert all(r["false_alarms"] == 0 for r in by_name.values())
    assert by_name["new_scanner"]["delay"] is not None and by_name["new_scanner"]["delay"] <= 100
    for s in files:
        if s.expect_detection_within is not None:
            assert by_name[s.name]["met"] is True, s.name
