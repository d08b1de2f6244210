"""The validate stage's figures per unseen scanner, on constructed predictions (no network, no
volumes: ``predict_paths`` is replaced by a table of probabilities)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import pytest

from shiftguard.config.schema import EvaluateConfig, TrainConfig
from shiftguard.evaluation import validate
from shiftguard.evaluation.validate import (
    ValidationResult,
    evaluate,
    scanner_slug,
    tracked_metrics,
    write_reports,
)
from shiftguard.metrics import binary_report, choose_threshold

# (scanner model, studies, positives): two judgeable scanners, one with one class only, and one
# with both classes but fewer studies than min_segment_size
EXTERNAL = [
    ("Vantage Orian", 14, 6),
    ("MAGNETOM Free.Max", 12, 4),
    ("SIGNA Premier", 5, 0),
    ("ECHELON Smart", 6, 3),
]
CFG = EvaluateConfig(n_bootstrap=200, min_segment_size=10, min_segment_positives=3)
REPORT_KEYS = {
    "n",
    "n_positive",
    "threshold",
    "alpha",
    "auroc",
    "sensitivity",
    "specificity",
    "ece",
    "ece_uncalibrated",
    "ece_change",
}


def _prob(rng: np.random.Generator, finding: int, scanner: str) -> float:
    # the model is worse on "MAGNETOM Free.Max" (a low-field scanner): its classes overlap
    spread = 0.35 if scanner == "MAGNETOM Free.Max" else 0.15
    return float(np.clip(0.3 + 0.4 * finding + spread * rng.standard_normal(), 0.01, 0.99))


@pytest.fixture(scope="module")
def scored() -> tuple[pd.DataFrame, pd.DataFrame, dict[str, float]]:
    """The split table, a robustness manifest, and each volume's constructed probability."""
    rng = np.random.default_rng(3)
    rows, probs = [], {}
    internal = [("train", "Skyra", 6, 3), ("val", "Skyra", 20, 8), ("test", "Skyra", 16, 6)]
    external = [("external", model, n, pos) for model, n, pos in EXTERNAL]
    for split, model, n, positives in internal + external:
        for i in range(n):
            key = f"{split}-{scanner_slug(model)}-{i:02d}"
            finding = int(i < positives)
            rows.append(
                {
                    "series_key": key,
                    "volume_path": f"volumes/{key}.nii",
                    "finding": str(finding),
                    "split": split,
                    "patient_sex": "FM"[i % 2],
                    "patient_age": str(30 + 3 * i),
                    "site": "Lakeshore" if split == "external" else "North",
                    "manufacturer": model.split()[0],
                    "scanner_model": model,
                }
            )
            probs[f"volumes/{key}.nii"] = _prob(rng, finding, model)
    table = pd.DataFrame(rows)
    shifted = []
    for row in rows:
        if row["split"] != "test":
            continue
        for severity in (0, 1):
            path = f"shifted/{row['series_key']}_s{severity}.nii"
            probs[path] = probs[row["volume_path"]] * (1 - 0.3 * severity)
            shifted.append(
                {"series_key": row["series_key"], "split": "test", "finding": int(row["finding"]),
                 "profile": "low_field", "severity": severity, "volume_path": path}
            )  # fmt: skip
    return table, pd.DataFrame(shifted), probs


@pytest.fixture(scope="module")
def result(scored: tuple[pd.DataFrame, pd.DataFrame, dict[str, float]]) -> ValidationResult:
    table, manifest, probs = scored

    def constructed(_net: Any, paths: list[str], *_args: Any, **_kw: Any) -> np.ndarray:
        # paths are <ingest or augment folder>/<volume_path>
        return np.array([probs[p.split("/", 1)[1]] for p in paths])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(validate, "predict_paths", constructed)
        net: Any = None  # never called: the probabilities are constructed
        return evaluate(net, TrainConfig(), CFG, table, Path("ingest"), manifest, Path("augment"))


def _rows(result: ValidationResult, model: str) -> pd.DataFrame:
    pred = result.predictions
    return pred[(pred["set"] == "external") & (pred["scanner_model"] == model)]


def _helper_report(rows: pd.DataFrame, threshold: float) -> dict[str, Any]:
    return binary_report(
        rows["label"].to_numpy(),
        rows["prob"].to_numpy(),
        threshold,
        n_boot=CFG.n_bootstrap,
        seed=CFG.seed,
        alpha=CFG.alpha,
        n_bins=CFG.ece_bins,
    )


def test_threshold_is_the_one_chosen_on_val(result: ValidationResult) -> None:
    val = result.predictions[result.predictions["set"] == "val"]
    expected = choose_threshold(val["label"].to_numpy(), val["prob"].to_numpy(), "youden")
    assert result.threshold == expected
    for model, report in result.scanners.items():
        assert report["threshold"] == expected, model


def test_each_scanner_gets_the_helpers_figures_on_its_own_rows(result: ValidationResult) -> None:
    assert list(result.scanners) == sorted(model for model, _, _ in EXTERNAL)
    for model, n, positives in EXTERNAL:
        report = result.scanners[model]
        rows = _rows(result, model)
        assert (report["n"], report["n_positive"], report["n_negative"]) == (
            n,
            positives,
            n - positives,
        )
        expected = _helper_report(rows, result.threshold)
        for name in ("sensitivity", "specificity", "ece"):
            assert report[name] == pytest.approx(expected[name], nan_ok=True), (model, name)
        spec = expected["specificity"]
        assert report["false_positive_rate"] == pytest.approx(
            {"value": 1 - spec["value"], "low": 1 - spec["high"], "high": 1 - spec["low"]},
            nan_ok=True,
        )
        if report["judgeable"]:
            assert report["auroc"] == pytest.approx(expected["auroc"])
            assert report["reason"] == ""
        else:
            assert all(math.isnan(v) for v in report["auroc"].values()), model
            assert report["reason"]


def test_the_worse_scanner_shows_up_on_its_own(result: ValidationResult) -> None:
    worse = result.scanners["MAGNETOM Free.Max"]["auroc"]["value"]
    better = result.scanners["Vantage Orian"]["auroc"]["value"]
    assert worse < better
    pooled = result.reports["external"]["auroc"]["value"]
    assert worse < pooled  # the pooled figure hides it


def test_small_and_one_class_scanners_are_reported_without_auroc(
    result: ValidationResult,
) -> None:
    metrics = result.to_metrics()["external_scanners"]
    one_class = metrics["SIGNA Premier"]
    assert one_class["n"] == 5 and one_class["n_positive"] == 0
    assert one_class["auroc"] == {"value": None, "low": None, "high": None}
    assert one_class["reason"] == "one class only (0 positive, 5 negative)"
    assert one_class["sensitivity"]["value"] is None  # no positives
    assert one_class["specificity"]["value"] is not None
    small = metrics["ECHELON Smart"]
    assert small["auroc"]["value"] is None and small["judgeable"] is False
    assert small["reason"] == "n=6 < min_n=10"
    assert metrics["Vantage Orian"]["judgeable"] is True
    json.dumps(result.to_metrics(), allow_nan=False)  # valid JSON for dvc metrics: no NaN


def test_pooled_external_block_is_unchanged(result: ValidationResult) -> None:
    pooled_rows = result.predictions[result.predictions["set"] == "external"]
    assert len(pooled_rows) == sum(n for _, n, _ in EXTERNAL)
    assert set(result.reports["external"]) == REPORT_KEYS
    # the same seed and rows give the same resamples: equal, not only close
    report = dict(result.reports["external"])
    before, change = report.pop("ece_uncalibrated"), report.pop("ece_change")
    assert report == _helper_report(pooled_rows, result.threshold)
    raw = _helper_report(pooled_rows.assign(prob=pooled_rows["raw_prob"]), result.threshold)
    assert before == raw["ece"]  # the network's own ECE, on the same resamples
    assert change["value"] == pytest.approx(report["ece"]["value"] - before["value"])
    assert change["low"] <= change["value"] <= change["high"]
    metrics = result.to_metrics()
    assert set(metrics["external"]) == REPORT_KEYS
    assert metrics["external_auroc_gap"] == pytest.approx(
        metrics["external"]["auroc"]["value"] - metrics["test"]["auroc"]["value"], abs=1e-3
    )


def test_robustness_has_one_row_per_scanner_and_the_summary_ignores_them(
    result: ValidationResult,
) -> None:
    rob = result.robustness.set_index("profile")
    assert rob.loc["external", "n"] == sum(n for _, n, _ in EXTERNAL)
    for model, n, positives in EXTERNAL:
        row = rob.loc[f"external:{model}"]
        assert (row["severity"], row["n"], row["n_positive"]) == (-1, n, positives)
        assert row["auroc"] == pytest.approx(result.scanners[model]["auroc"]["value"], nan_ok=True)
    summary = result.to_metrics()["robustness"]
    assert set(summary["mean_auroc_by_severity"]) == {"0", "1"}
    assert summary["worst_profile_at_max_severity"] == "low_field"


def test_mlflow_names_are_slugged(result: ValidationResult) -> None:
    names = tracked_metrics(result.to_metrics())
    assert "external.auroc.value" in names  # the pooled names stay as they were
    assert "external_scanners.magnetom_free_max.auroc.value" in names
    assert "external_scanners.signa_premier.n" in names
    assert "external_scanners.signa_premier.auroc.value" not in names  # null: not logged
    scanner_names = [k for k in names if k.startswith("external_scanners.")]
    assert all(re.fullmatch(r"[a-z0-9_.]+", k) for k in scanner_names), scanner_names
    assert all(math.isfinite(v) for v in names.values())
    # the same in every set, or another figure restated: metrics.json keeps them, MLflow does not
    assert not [k for k in names if k.rsplit(".", 1)[-1] in {"alpha", "threshold"} and "." in k]
    assert not [k for k in names if ".false_positive_rate." in k]
    assert "threshold" in names


def test_slugs_stay_unique() -> None:
    frame = pd.DataFrame(
        {
            "label": [0.0, 1.0, 0.0, 1.0],
            "prob": [0.2, 0.8, 0.3, 0.7],
            "scanner_model": ["Free.Max", "Free.Max", "free max", "free max"],
        }
    )
    reports = validate.scanner_reports(CFG, frame, 0.5)
    assert sorted(r["slug"] for r in reports.values()) == ["free_max", "free_max_2"]
    assert validate.scanner_reports(CFG, frame.drop(columns="scanner_model"), 0.5) == {}


def test_reports_carry_the_scanners(result: ValidationResult, tmp_path: Path) -> None:
    backend = matplotlib.get_backend()
    write_reports(result, CFG, tmp_path)
    assert matplotlib.get_backend() == backend  # a notebook's backend is left alone
    rob = pd.read_csv(tmp_path / "robustness.csv")
    assert {f"external:{m}" for m, _, _ in EXTERNAL} | {"external"} <= set(rob["profile"])
    pred = pd.read_csv(tmp_path / "predictions.csv")
    assert "scanner_model" in pred.columns
    assert pred["scanner_model"].notna().all()  # robustness rows: the scanner simulated from
    assert (tmp_path / "robustness.png").stat().st_size > 5_000


def test_calibration_is_fitted_on_val_only_and_applied_to_every_set(
    result: ValidationResult, scored: tuple[pd.DataFrame, pd.DataFrame, dict[str, float]]
) -> None:
    from shiftguard.calibration import fit_calibration

    pred = result.predictions
    val = pred[pred["set"] == "val"]
    # the same fit from the val rows alone: test or external rows did not enter it
    again = fit_calibration(CFG.calibration, val["label"], val["raw_prob"], "val")
    assert result.calibration == again and again.method == "platt"
    assert result.calibration.n == len(val) == 20
    assert pred["prob"].to_numpy() == pytest.approx(again.apply(pred["raw_prob"].to_numpy()))
    shifted = pred[pred["set"] == "robustness"]
    assert len(shifted) and shifted["raw_prob"].notna().all()
    # the operating point is on the calibrated scale: it classifies val as the raw one would
    assert 0.0 < result.threshold < 1.0
    section = result.to_metrics()["calibration"]
    assert section["method"] == "platt" and set(section) >= {"a", "b", "n", "fitted_on"}
