"""The DVC pipeline for real: a tiny cohort tracked by ``data.dvc``, ``dvc repro``, ``dvc status``,
``dvc exp run`` with Hydra composition, and a ``dvc push`` / ``dvc pull`` round trip."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import pytest

from shiftguard.cohort import generate
from shiftguard.config import CohortConfig, compose, dump_params, validate

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def sh(cwd: Path, *args: str) -> str:
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "SHIFTGUARD_WORKERS": "2",
    }
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if result.returncode:
        raise AssertionError(
            f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result.stdout


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".gitignore"  # DVC's own, tracked by git
    }


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A fresh git + DVC project with this repo's conf/, pipelines/, dvc.yaml and a tiny cohort."""
    root = tmp_path_factory.mktemp("project")
    for item in ("conf", "pipelines", "src", "dvc.yaml"):
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, root / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, root / item)
    config = compose(["experiment=tiny"], conf_dir=REPO / "conf")
    (root / "params.yaml").write_text(dump_params(config))
    sh(root, "git", "init", "-q")
    sh(root, "git", "config", "user.email", "ci@example.org")
    sh(root, "git", "config", "user.name", "ci")
    sh(root, "dvc", "init", "-q")
    sh(root, "dvc", "config", "core.analytics", "false")
    sh(root, "dvc", "config", "hydra.enabled", "true")
    sh(root, "dvc", "remote", "add", "-d", "local", str(root.parent / f"{root.name}-remote"))
    cohort = validate("cohort", config["cohort"], CohortConfig)
    generate.run(cohort, root / "data", workers=2, progress=False)
    sh(root, "dvc", "add", "-q", "data")
    return root, config


def test_repro_ingests_splits_and_leaves_status_clean(project: tuple[Path, dict]) -> None:
    root, config = project
    sh(root, "dvc", "repro")
    manifest = read_rows(root / "artifacts/ingest/manifest.csv")
    n_subjects = config["cohort"]["n_subjects"]
    assert len(manifest) == n_subjects
    for row in manifest:
        volume = nib.load(root / "artifacts/ingest" / row["volume_path"])
        assert volume.shape == tuple(config["ingest"]["shape"])
        assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    assert read_rows(root / "artifacts/ingest/quarantine.csv") == []

    dataset = read_rows(root / "artifacts/split/dataset.csv")
    assert {r["series_key"] for r in dataset} == {r["series_key"] for r in manifest}
    external_models = set(config["split"]["external"]["values"])
    for row in dataset:
        assert (row["split"] == "external") == (row["scanner_model"] in external_models)
        assert row["finding"] in {"0", "1"}

    robustness = read_rows(root / "artifacts/augment/manifest.csv")
    evaluated = [r for r in dataset if r["split"] in {"val", "test"}]
    sets = config["augment"]["robustness"]
    assert evaluated
    assert len(robustness) == len(evaluated) * len(sets["profiles"]) * len(sets["severities"])
    for row in robustness:
        path = (root / "artifacts/augment" / row["volume_path"]).resolve()
        assert path.is_file(), row
        assert nib.load(path).shape == tuple(config["ingest"]["shape"])
        params = json.loads(row["params"])
        assert (row["severity"] == "0") == all(v is None for v in params.values())
    assert (root / "reports/augment/gallery.png").stat().st_size > 10_000

    # The stage logged itself to the project's embedded MLflow store.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    [run] = client.search_runs(
        [client.get_experiment_by_name("shiftguard").experiment_id],
        "tags.`shiftguard.stage` = 'augment'",
    )
    assert run.data.metrics["volumes_written"] == sum(r["severity"] != "0" for r in robustness)
    assert run.data.params["augment.robustness.seed"] == str(sets["seed"])
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"gallery.png", "manifest.csv"} <= logged

    ingest_metrics = json.loads((root / "reports/ingest/metrics.json").read_text())
    assert ingest_metrics["series_accepted"] == n_subjects
    split_metrics = json.loads((root / "reports/split/metrics.json").read_text())
    assert sum(split_metrics["series"].values()) == n_subjects

    assert json.loads(sh(root, "dvc", "status", "--json")) == {}
    assert "didn't change" in sh(root, "dvc", "repro") or "up to date" in sh(root, "dvc", "repro")


def test_changing_a_param_invalidates_only_the_stages_that_read_it(
    project: tuple[Path, dict],
) -> None:
    root, _ = project
    sh(root, "dvc", "repro")
    params = root / "params.yaml"
    original = params.read_text()
    try:
        params.write_text(original.replace("seed: 7", "seed: 8"))
        status = json.loads(sh(root, "dvc", "status", "--json"))
        assert set(status) == {"split"}
    finally:
        params.write_text(original)


def test_exp_run_composes_conf_with_hydra_overrides(project: tuple[Path, dict]) -> None:
    root, _ = project
    sh(root, "dvc", "repro")
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "tiny pipeline")
    sh(
        root,
        "dvc",
        "exp",
        "run",
        "-n",
        "seed11",
        "-S",
        "experiment=tiny",
        "-S",
        "split.seed=11",
        "-S",
        "ingest.shape=[20,24,20]",
    )
    exps = json.loads(sh(root, "dvc", "exp", "show", "--json"))
    text = json.dumps(exps)
    assert "seed11" in text
    # DVC composed conf/ with the overrides and wrote params.yaml from it.
    composed = params_yaml = (root / "params.yaml").read_text()
    assert "seed: 11" in composed and params_yaml
    volume = next((root / "artifacts/ingest/volumes").glob("*.nii"))
    assert nib.load(volume).shape == (20, 24, 20)
    sh(root, "git", "checkout", "-q", "--", ".")
    sh(root, "dvc", "checkout", "-q", "--force")


def test_push_and_pull_round_trip_the_cohort_and_the_outputs(project: tuple[Path, dict]) -> None:
    root, _ = project
    sh(root, "dvc", "repro")
    before_data = tree_digest(root / "data")
    before_out = tree_digest(root / "artifacts")
    sh(root, "dvc", "push", "-q")
    shutil.rmtree(root / ".dvc" / "cache")
    shutil.rmtree(root / "data")
    shutil.rmtree(root / "artifacts")
    sh(root, "dvc", "pull", "-q")
    assert tree_digest(root / "data") == before_data
    assert tree_digest(root / "artifacts") == before_out
    assert json.loads(sh(root, "dvc", "status", "--json")) == {}
