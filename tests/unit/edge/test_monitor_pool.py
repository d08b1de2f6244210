"""A scenario pool through the real path: the cohort generator writes DICOM under a condition, the
edge runner reads it and computes each series' monitor features."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shiftguard.config import CohortConfig, SplitConfig, validate
from shiftguard.edge.bundle import open_bundle
from shiftguard.edge.predict import Predictor
from shiftguard.monitor.scenarios import Condition, PoolCache
from shiftguard.records.features import FEATURE_NAMES


@pytest.mark.integration
def test_pools_hold_runner_features_per_condition_and_are_cached(
    tmp_path: Path, tiny: dict[str, Any], bundle_path: Path
) -> None:
    cohort = validate("cohort", tiny["cohort"], CohortConfig)
    split = validate("split", tiny["split"], SplitConfig)
    predictor = Predictor(open_bundle(bundle_path))
    cache = PoolCache(tmp_path / "pools")
    thick = cache.get(
        cohort, split, Condition(("skyra_3t",), 20.0), 4, 5, predictor, "sha", workers=1
    )
    canon = cache.get(cohort, split, Condition(("vantage_15t",)), 4, 5, predictor, "sha", workers=1)
    assert len(thick) == len(canon) == 4
    assert set(FEATURE_NAMES) <= set(thick.columns) and set(thick["finding"]) <= {0, 1}
    assert set(thick["scanner_model"]) == {"Skyra"} and set(canon["scanner_model"]) == {
        "Vantage Orian"
    }
    assert (thick["slice_thickness"] == 20.0).all()
    assert thick["n_slices"].iloc[0] == 8  # 16 slices of 10 mm -> 8 of 20 mm, same extent
    assert canon["probability"].between(0, 1).all()
    files = sorted((tmp_path / "pools").glob("pool-*.csv"))
    assert len(files) == 2
    again = cache.get(cohort, split, Condition(("vantage_15t",)), 4, 5, None, "sha")  # cached
    assert again.equals(canon)


@pytest.mark.integration
def test_generated_studies_through_the_runner_and_the_monitor_get_judged_estimates(
    tmp_path: Path, tiny: dict[str, Any], bundle_path: Path
) -> None:
    """End to end on generated studies: pools through the edge runner, a labelled reference from
    the training scanners' pool, a new scanner's records judged by the monitor with label-free
    estimates, and the estimates judged against the pools' findings."""
    from shiftguard.config import MonitorConfig
    from shiftguard.monitor.estimates import summarise, window_table
    from shiftguard.monitor.performance import PerformanceEstimator
    from shiftguard.monitor.report import BundleInfo
    from shiftguard.monitor.runner import Monitor, typed

    cohort = validate("cohort", tiny["cohort"], CohortConfig)
    split = validate("split", tiny["split"], SplitConfig)
    bundle = open_bundle(bundle_path)
    predictor = Predictor(bundle)
    cache = PoolCache(tmp_path / "pools")
    train = cache.get(cohort, split, Condition(), 24, 7, predictor, "sha", workers=1)
    canon = cache.get(
        cohort, split, Condition(("vantage_15t",)), 10, 8, predictor, "sha", workers=1
    )
    assert train["finding"].nunique() == 2
    reference = train.assign(split="test")  # held out and labelled: what export writes

    monitor = Monitor(
        MonitorConfig(
            window={"size": 10, "min_size": 5},
            drift={"bootstrap": 20},
            estimation={"n_draws": 200, "n_boot": 20},
        ),
        reference,
        tmp_path / "monitor.db",
        bundle=BundleInfo("test-model", "7", threshold=bundle.threshold),
    )
    try:
        records = canon.drop(columns=["finding"]).assign(site="north")
        (window,) = monitor.update(typed(records))
    finally:
        monitor.close()
    cbpe = window.estimates["cbpe"]
    assert cbpe["supported"] and cbpe["n"] == 10
    shown = float((canon["probability"] >= bundle.threshold).mean())
    assert cbpe["metrics"]["positive_rate"]["value"] == pytest.approx(shown, abs=1e-4)
    assert window.estimates["reference"]["prevalence"] == pytest.approx(train["finding"].mean())

    estimator = PerformanceEstimator(reference, bundle.threshold, n_draws=200, n_boot=20)
    rows = window_table({"training": train, "canon": canon}, estimator, 10, 4, seed=0)
    assert set(rows["condition"]) == {"training", "canon"} and len(rows) == 2 * 4 * 2 * 3
    table = summarise(rows)
    cbpe_rows = table[table["method"] == "cbpe"]
    assert (cbpe_rows["supported"] == 4).all()
    assert cbpe_rows["mae"].notna().any()
