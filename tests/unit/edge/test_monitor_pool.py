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
