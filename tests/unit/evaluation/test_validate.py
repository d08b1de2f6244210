from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from shiftguard.config.schema import EvaluateConfig, TrainConfig
from shiftguard.evaluation.validate import (
    ValidationError,
    evaluate,
    headline,
    with_external_sets,
    write_reports,
)

SHAPE = (16, 20, 16)


class PeakNet(nn.Module):
    """A real (weightless) network: the logit rises with the brightest voxel of the volume."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 6.0 * (x.amax(dim=(1, 2, 3, 4)) - 1.6).reshape(-1, 1)


def volume(path: Path, blob: bool, rng: np.random.Generator) -> None:
    x, y, z = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    head = ((x - 8) ** 2 / 40 + (y - 10) ** 2 / 60 + (z - 8) ** 2 / 40) < 1
    spot = ((x - 6) ** 2 + (y - 11) ** 2 + (z - 8) ** 2) < 5
    data = head * (1 + 0.05 * rng.standard_normal(SHAPE)) + blob * 1.5 * spot
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image((800 * data).astype(np.float32), np.diag([8.0, 8.0, 8.0, 1.0])).to_filename(
        path
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    root = tmp_path_factory.mktemp("validate")
    rng = np.random.default_rng(0)
    rows, shifted = [], []
    for split, n in (("train", 4), ("val", 8), ("test", 12), ("external", 8)):
        for i in range(n):
            key = f"{split}{i:02d}"
            finding = i % 2
            volume(root / "ingest/volumes" / f"{key}.nii", bool(finding), rng)
            rows.append(
                {
                    "series_key": key,
                    "volume_path": f"volumes/{key}.nii",
                    "finding": str(finding),
                    "split": split,
                    "patient_sex": "FM"[i % 2 == 0 and i % 4 == 0],
                    "patient_age": str(30 + 7 * i),
                    "site": "Lakeshore" if split == "external" else f"site{i % 2}",
                    "manufacturer": "Canon" if split == "external" else "Siemens",
                    "scanner_model": "Orian" if split == "external" else "Skyra",
                }
            )
            if split != "test":
                continue
            for severity in (0, 1, 2):
                # severity 2 erases the finding from the image: the model cannot see it any more
                path = f"volumes/{key}_s{severity}.nii"
                volume(root / "augment" / path, bool(finding) and severity < 2, rng)
                shifted.append(
                    {"series_key": key, "split": split, "finding": finding, "profile": "erase",
                     "severity": severity, "volume_path": path}
                )  # fmt: skip
    return root, pd.DataFrame(rows), pd.DataFrame(shifted)


def cfg(**overrides: object) -> EvaluateConfig:
    return EvaluateConfig(**{"n_bootstrap": 200, "min_segment_size": 4, **overrides})


def test_evaluate_scores_every_set_at_the_val_threshold(project) -> None:
    root, table, manifest = project
    result = evaluate(
        PeakNet(), TrainConfig(), cfg(), table, root / "ingest", manifest, root / "augment"
    )
    val = result.predictions[result.predictions["set"] == "val"]
    # The threshold separates the validation classes (Youden: the highest perfect cut).
    assert val.loc[val.label == 1, "prob"].min() >= result.threshold
    assert val.loc[val.label == 0, "prob"].max() < result.threshold
    for name in ("test", "external"):
        report = result.reports[name]
        part = result.predictions[result.predictions["set"] == name]
        assert report["auroc"]["value"] == 1.0
        assert report["threshold"] == result.threshold  # chosen on val, not on this set
        positives = part.loc[part.label == 1, "prob"]
        assert report["sensitivity"]["value"] == (positives >= result.threshold).mean()
    assert "train" not in set(result.predictions["set"])

    rob = result.robustness.set_index(["profile", "severity"])
    assert rob.loc[("erase", 0), "auroc"] == 1.0
    assert rob.loc[("erase", 1), "auroc"] == 1.0
    assert rob.loc[("erase", 2), "auroc"] < 0.75  # the finding is gone
    assert rob.loc[("external", -1), "n"] == 8
    assert (rob["auroc_low"] <= rob["auroc"]).all() and (rob["auroc"] <= rob["auroc_high"]).all()

    metrics = result.to_metrics()
    assert metrics["robustness"]["worst_profile_at_max_severity"] == "erase"
    assert metrics["robustness"]["auroc_drop_at_max_severity"] > 0.25
    assert metrics["external_auroc_gap"] == 0.0
    assert headline(metrics)["test_auroc"] == 1.0
    json.dumps(metrics, allow_nan=False)  # valid JSON for dvc metrics: no NaN


def test_segments_cover_the_held_out_series_and_flag_small_ones(project) -> None:
    root, table, _manifest = project
    result = evaluate(PeakNet(), TrainConfig(), cfg(), table, root / "ingest", None, None)
    seg = result.segments
    assert set(seg["column"]) == {
        "patient_sex",
        "age_band",
        "site",
        "manufacturer",
        "scanner_model",
    }
    # test (12) + external (8) held-out series in every column's segments
    assert seg.groupby("column")["n"].sum().eq(20).all()
    vendor = seg[seg["column"] == "manufacturer"].set_index("segment")
    assert vendor.loc["Canon", "n"] == 8 and bool(vendor.loc["Canon", "judgeable"])
    small = seg[seg["n"] < 4]
    assert not small["judgeable"].any() and small["auroc_gap"].isna().all()
    # no robustness sets: only the unseen scanners, pooled and the one model on its own
    assert result.robustness["profile"].tolist() == ["external", "external:Orian"]


def test_reports_and_figures_are_written(project, tmp_path: Path) -> None:
    root, table, manifest = project
    result = evaluate(
        PeakNet(), TrainConfig(), cfg(), table, root / "ingest", manifest, root / "augment"
    )
    written = {p.name for p in write_reports(result, cfg(), tmp_path)}
    assert {"roc.csv", "reliability.csv", "robustness.png", "roc.png", "segments.csv"} <= written
    roc = pd.read_csv(tmp_path / "roc.csv")
    assert set(roc["set"]) == {"test", "external"}
    assert roc.groupby("set")["tpr"].max().eq(1.0).all()
    assert (tmp_path / "robustness.png").stat().st_size > 5_000
    # the map the bundle will carry, and the reliability curves before and after it
    from shiftguard.calibration import Calibration

    saved = Calibration.from_json(json.loads((tmp_path / "calibration.json").read_text()))
    assert saved == result.calibration
    rel = pd.read_csv(tmp_path / "reliability.csv")
    assert {"test", "test, uncalibrated"} <= set(rel["set"])


def test_a_hold_out_set_without_unseen_scanners_or_robustness_sets_is_reported(
    project, tmp_path: Path
) -> None:
    # an in-distribution hold-out (conf/cohort/holdout.yaml): val and test only, no robustness
    root, table, _manifest = project
    internal = table[table["split"].isin(["val", "test"])]
    result = evaluate(PeakNet(), TrainConfig(), cfg(), internal, root / "ingest", None, None)
    assert result.robustness.empty
    assert result.reports["test"]["auroc"]["value"] == 1.0
    written = {p.name for p in write_reports(result, cfg(), tmp_path)}
    assert {"roc.csv", "robustness.png", "segments.csv"} <= written
    assert set(pd.read_csv(tmp_path / "roc.csv")["set"]) == {"test"}


def test_a_large_external_set_replaces_the_split_tables_unseen_scanner(
    project, tmp_path: Path
) -> None:
    root, table, _manifest = project
    rng = np.random.default_rng(1)
    rows = []
    for i in range(10):  # another cohort's unseen scanner: its own folder, its own keys
        volume(tmp_path / "ext_ingest/volumes" / f"x{i}.nii", bool(i % 2), rng)
        rows.append(
            {**table.iloc[-1].to_dict(), "series_key": f"x{i}", "volume_path": f"volumes/x{i}.nii",
             "finding": str(i % 2), "split": "external", "scanner_model": "Premier"}
        )  # fmt: skip
    rows.append({**rows[0], "series_key": "xt", "split": "test"})  # not inference-only: left out
    pd.DataFrame(rows).to_csv(tmp_path / "ext.csv", index=False)

    merged = with_external_sets(table, [(tmp_path / "ext.csv", tmp_path / "ext_ingest")])
    external = merged[merged["split"] == "external"]
    assert sorted(external["series_key"]) == [f"x{i}" for i in range(10)]
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in external["volume_path"])
    assert "xt" not in set(merged["series_key"])
    result = evaluate(PeakNet(), TrainConfig(), cfg(), merged, root / "ingest", None, None)
    assert result.reports["external"]["n"] == 10
    assert set(result.to_metrics()["external_scanners"]) == {"Premier"}

    with pytest.raises(ValidationError, match="more than one"):
        with_external_sets(table, [(tmp_path / "ext.csv", tmp_path)] * 2)
    pd.DataFrame(rows[-1:]).to_csv(tmp_path / "none.csv", index=False)
    with pytest.raises(ValidationError, match="no series in the external split"):
        with_external_sets(table, [(tmp_path / "none.csv", tmp_path)])


def test_one_class_val_falls_back_and_missing_test_is_an_error(project) -> None:
    root, table, _ = project
    one_class = table[(table["split"] != "val") | (table["finding"] == "1")]
    result = evaluate(PeakNet(), TrainConfig(), cfg(), one_class, root / "ingest", None, None)
    assert result.threshold == 0.5
    no_test = table[table["split"] != "test"]
    with pytest.raises(ValidationError, match="no labelled test series"):
        evaluate(PeakNet(), TrainConfig(), cfg(), no_test, root / "ingest", None, None)
    with pytest.raises(ValidationError, match="lacks"):
        evaluate(
            PeakNet(),
            TrainConfig(),
            cfg(segments=["ethnicity"]),
            table,
            root / "ingest",
            None,
            None,
        )


def test_threshold_rule_is_validated() -> None:
    assert cfg(threshold_rule="sensitivity@0.9").threshold_rule == "sensitivity@0.9"
    with pytest.raises(ValueError, match="threshold_rule"):
        cfg(threshold_rule="best")
    assert math.isclose(cfg().alpha, 0.05)
