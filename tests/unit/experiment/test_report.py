"""The experiment report on constructed cells: pairing by seed and case, the aims, the files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from shiftguard.experiment.report import (
    FILES,
    ExperimentReportError,
    compare_arms,
    load_runs,
    read_design,
    run,
)
from shiftguard.experiment.runner import CELL_FILE, HOLDOUT, PREDICTION_COLUMNS, PREDICTIONS_FILE
from shiftguard.metrics import auroc

SCANNERS = ("Scanner A", "Scanner B")
N = 80


def labels() -> np.ndarray:
    return np.tile([0, 1], N // 2)


def scores(arm: str, seed: int, name: str) -> np.ndarray:
    """The reference arm separates less on Scanner A; the other arm separates as well there as in
    distribution. Each seed adds its own noise."""
    rng = np.random.default_rng([seed, len(name), len(arm)])
    y = labels()
    separation = 0.5 if (arm == "none" and name == "Scanner A") else 2.0
    return 1 / (1 + np.exp(-(separation * (y - 0.5) + rng.normal(0, 1, y.size))))


def write_sweep(folder: Path, arms=("none", "artifact"), seeds=(0, 1), skip=()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "multirun.yaml").write_text(
        yaml.safe_dump({"design": {"name": "constructed", "epochs": 2, "n_boot": 300}})
    )
    job = 0
    for arm in arms:
        for seed in seeds:
            if (arm, seed) in skip:
                continue
            cell_dir = folder / str(job)
            job += 1
            cell_dir.mkdir()
            rows, figures = [], {}
            for name in (HOLDOUT, *SCANNERS):
                s = scores(arm, seed, name)
                figures[name] = {"auroc": auroc(labels(), s), "ece": 0.1}
                for i, (label, prob) in enumerate(zip(labels(), s, strict=True)):
                    rows.append(
                        {
                            "set": HOLDOUT if name == HOLDOUT else "external",
                            "series_key": f"{name[-1]}{i:03d}",
                            "scanner_model": "" if name == HOLDOUT else name,
                            "label": int(label),
                            "prob": f"{prob:.8f}",
                        }
                    )
            with (cell_dir / PREDICTIONS_FILE).open("w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=PREDICTION_COLUMNS)
                writer.writeheader()
                writer.writerows(rows[::-1])  # any order: the report pairs by series key
            cell = {
                "design": "constructed", "arm": arm, "train_seed": seed, "split_seed": 7,
                "epochs": 2, "keep": "last", "n_train": 10, "n_train_positive": 5,
                "threshold": 0.5, "n_threshold": 40, "figures": figures,
                "train_seconds": 1.0, "seconds": 2.0,
            }  # fmt: skip
            (cell_dir / CELL_FILE).write_text(json.dumps(cell))
    return folder


def test_paired_differences_follow_their_definition(tmp_path: Path) -> None:
    result = compare_arms(
        load_runs(write_sweep(tmp_path / "sweep")), read_design(tmp_path / "sweep")
    )
    assert result.arms == ["none", "artifact"] and result.sets == [HOLDOUT, *SCANNERS]
    p = result.paired.set_index(["set", "metric"])
    for name in result.sets:
        expected = np.mean(
            [auroc(labels(), scores("artifact", k, name)) for k in (0, 1)]
        ) - np.mean([auroc(labels(), scores("none", k, name)) for k in (0, 1)])
        assert p.loc[(name, "auroc"), "diff"] == pytest.approx(expected)
        assert p.loc[(name, "auroc"), "low"] <= p.loc[(name, "auroc"), "diff"]
        assert len(p.loc[(name, "auroc"), "delong_p"].split(";")) == 2  # one test per run pair
    # the arm that keeps its separation on Scanner A beats the reference clearly there
    assert p.loc[("Scanner A", "auroc"), "low"] > 0
    assert p.loc[("Scanner A", "auroc"), "delong_significant"] == 2
    s = result.summary.set_index(["arm", "set", "metric"])
    mean_none = np.mean([auroc(labels(), scores("none", k, "Scanner A")) for k in (0, 1)])
    assert s.loc[("none", "Scanner A", "auroc"), "value"] == pytest.approx(mean_none)
    assert s.loc[("none", "Scanner A", "ece"), "value"] == pytest.approx(0.1)
    a = result.aims
    assert a["best_arm"] == "artifact"
    assert a["reference_loss"]["Scanner A"] > 0.10 and a["reference_loses"]


def test_power_uses_the_correlation_measured_on_the_runs(tmp_path: Path) -> None:
    from shiftguard.experiment.stats import auroc_correlation, cases_for_power

    sweep = write_sweep(tmp_path / "sweep", seeds=(0, 1, 2))
    result = compare_arms(load_runs(sweep), read_design(sweep))
    power = result.power.set_index("set")
    paired = result.paired[result.paired["metric"] == "auroc"].set_index("set")
    y = labels()
    for name in result.sets:
        per_seed = auroc_correlation(
            y,
            [scores("artifact", k, name) for k in (0, 1, 2)],
            [scores("none", k, name) for k in (0, 1, 2)],
        )
        assert paired.loc[name, "delong_correlation"] == pytest.approx(np.mean(per_seed))
        row = power.loc[name]
        assert row["correlation_measured"] == pytest.approx(np.median(per_seed))
        assert row["cases_needed"] == cases_for_power(
            0.05, row["reference_auroc"], 0.5, row["correlation_measured"]
        )
        assert row["power_measured"] != row["power_one_pair"]  # another correlation than 0.5


def test_a_sweep_that_gave_the_sets_paths_names_their_cohorts(tmp_path: Path) -> None:
    """Sweeps run before designs named their cohorts stored the split tables' paths."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    legacy = {
        "name": "reduced", "epochs": 20,
        "holdout": "artifacts/experiment/cohorts/holdout/split/dataset.csv",
        "holdout_ingest": "artifacts/experiment/cohorts/holdout/ingest",
        "external": "artifacts/experiment/cohorts/external/split/dataset.csv",
        "external_ingest": "artifacts/experiment/cohorts/external/ingest",
    }  # fmt: skip
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"design": legacy}))
    design = read_design(sweep)
    assert (design.holdout_cohort, design.external_cohort) == ("holdout", "external")
    assert (
        design.external == legacy["external"] and design.holdout_ingest == legacy["holdout_ingest"]
    )


def test_the_report_files_name_the_design(tmp_path: Path) -> None:
    result = run(write_sweep(tmp_path / "sweep"), tmp_path / "out", tracking=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(FILES)
    table = (tmp_path / "out" / "table.md").read_text()
    assert "design `constructed`: 2 arms x 2 training seeds [0, 1] x 1 split seed(s) [7]" in table
    assert "80, 80 studies per unseen scanner" in table
    design = json.loads((tmp_path / "out" / "design.json").read_text())
    assert design["aims"]["best_arm"] == "artifact" and len(design["cells"]) == len(result.cells)


def test_a_missing_cell_or_reference_is_named(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path / "gap", skip={("artifact", 1)})
    with pytest.raises(ExperimentReportError, match=r"arm artifact lacks .*\(1, 7\)"):
        compare_arms(load_runs(sweep), read_design(sweep))
    sweep = write_sweep(tmp_path / "noref", arms=("artifact",))
    with pytest.raises(ExperimentReportError, match="reference arm 'none'"):
        compare_arms(load_runs(sweep), read_design(sweep))
    with pytest.raises(ExperimentReportError, match="no finished cell"):
        load_runs(tmp_path / "empty")


def test_the_report_goes_to_mlflow_and_compare_reads_it_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ``experiment`` run holds the files and each arm's figures, a nested run per cell, and
    ``shiftguard compare --experiment`` prints the newest run's table."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mlflow.tracking import MlflowClient

    from shiftguard.experiment.report import track, write_report
    from shiftguard.tracking.compare import experiment_table

    root = tmp_path / "project"
    root.mkdir()
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    sweep = write_sweep(tmp_path / "sweep")
    result = compare_arms(load_runs(sweep), read_design(sweep))
    files = write_report(result, tmp_path / "out")
    run_id = track(result, files, root=root)
    stored = client.get_run(run_id)
    assert stored.data.tags["shiftguard.stage"] == "experiment"
    mean_none = np.mean([auroc(labels(), scores("none", k, "Scanner A")) for k in (0, 1)])
    assert stored.data.metrics["auroc.none.scanner_a"] == pytest.approx(mean_none)
    assert "diff.auroc.artifact.scanner_a" in stored.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert set(FILES) <= artifacts
    children = client.search_runs(
        [stored.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'"
    )
    assert len(children) == len(result.cells) == 4
    found = experiment_table(client)
    assert found is not None and found[0] == run_id
    assert found[1] == (tmp_path / "out" / "table.md").read_text()
