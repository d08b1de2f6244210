"""The augmentation experiment end to end on tiny data: the design's cohorts prepared, a Hydra
multirun sweep of two arms run in parallel by Hydra's joblib launcher (as the full design runs on a
GPU machine), and the paired report read back from the cells."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from shiftguard.cohort import generate
from shiftguard.config import CohortConfig, IngestConfig, compose_section
from shiftguard.config.schema import DesignConfig
from shiftguard.data import ingest
from shiftguard.experiment.prepare import prepare

pytestmark = [pytest.mark.integration, pytest.mark.slow(seconds=130)]

REPO = Path(__file__).resolve().parents[2]
TINY = ["experiment=tiny"]


def test_a_tiny_sweep_runs_in_parallel_and_reports_its_arms(tmp_path: Path) -> None:
    # the "embedded" cohort the cells train on, and the design's two scored cohorts
    embedded = tmp_path / "data"  # where train.lesion_masks and the label maps are looked for
    generate.run(compose_section("cohort", CohortConfig, TINY), embedded, workers=1, progress=False)
    ingest.run(
        compose_section("ingest", IngestConfig, TINY),
        embedded / "dicom",
        tmp_path / "ingest",
        workers=1,
        progress=False,
    )
    paths = {
        "design.manifest": tmp_path / "ingest" / "manifest.csv",
        "design.diagnoses": embedded / "ris" / "verified_diagnoses.csv",
        "design.ingest": tmp_path / "ingest",
        "design.cohorts": tmp_path / "cohorts",
    }
    design = DesignConfig(name="reduced", epochs=2, cohorts=str(paths["design.cohorts"]))
    prepare(design, workers=1, progress=False, overrides=[*TINY, "cohort.n_subjects=40"])

    runs = tmp_path / "runs"
    command = [
        sys.executable, "-m", "shiftguard.experiment.runner", "--multirun", "+design=reduced",
        *TINY, "augment=none,artifact", "train.seed=0", "split.seed=7",
        "design.epochs=2", "train.epochs=2", "train.patience=2", "design.n_boot=200",
        *(f"{k}={v}" for k, v in paths.items()),
        "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={runs}",
    ]  # fmt: skip
    env = {**os.environ, "SHIFTGUARD_LOADER_WORKERS": "1", "HYDRA_FULL_ERROR": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Joblib" in done.stdout + done.stderr  # the cells went through the parallel launcher

    cells = sorted(runs.rglob("cell.json"))
    assert len(cells) == 2
    arms = {json.loads(c.read_text())["arm"] for c in cells}
    assert arms == {"none", "artifact"}
    for cell_file in cells:
        cell = json.loads(cell_file.read_text())
        assert cell["epochs"] == 2 and cell["keep"] == "last" and cell["n_threshold"] > 0
        predictions = pd.read_csv(cell_file.parent / "predictions.csv")
        assert set(predictions["set"]) == {"in_distribution", "external"}
        assert predictions["prob"].between(0, 1).all()

    report = subprocess.run(
        [sys.executable, "-m", "shiftguard.cli", "experiment", "report", "--runs", str(runs),
         "--out", str(tmp_path / "report"), "--no-track"],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr[-3000:]
    power = pd.read_csv(tmp_path / "report" / "power.csv")
    assert len(power) >= 2 and {"correlation_measured", "cases_needed"} <= set(power.columns)
    table = (tmp_path / "report" / "table.md").read_text()
    assert "design `reduced`: 2 arms x 1 training seeds [0] x 1 split seed(s) [7]" in table
