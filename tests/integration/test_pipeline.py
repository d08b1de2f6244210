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
import yaml

from shiftguard.cohort import generate
from shiftguard.config import CohortConfig, compose, dump_params, validate

pytestmark = [pytest.mark.integration, pytest.mark.slow(seconds=780)]

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
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "tiny cohort")  # runs record the commit they ran at
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


def test_repro_trains_validates_and_registers_a_tracked_challenger(
    project: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, config = project
    sh(root, "dvc", "repro")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("shiftguard").experiment_id
    [train] = client.search_runs([experiment], "tags.`shiftguard.stage` = 'train'")
    [validate] = client.search_runs([experiment], "tags.`shiftguard.stage` = 'validate'")

    # The resolved config as params, provenance as tags, the split table as the dataset input.
    assert train.data.params["train.epochs"] == str(config["train"]["epochs"])
    assert train.data.params["cohort.n_subjects"] == str(config["cohort"]["n_subjects"])
    commit = sh(root, "git", "rev-parse", "HEAD").strip()
    assert train.data.tags["mlflow.source.git.commit"] == commit
    assert train.data.tags["shiftguard.dvc_exp"] == "workspace"
    data_md5 = (root / "data.dvc").read_text().split("md5: ")[1].split()[0]
    assert train.data.tags["shiftguard.data_dvc_md5"] == data_md5
    [dataset_input] = train.inputs.dataset_inputs
    assert dataset_input.dataset.name == "shiftguard-cohort"

    # One point per epoch run, in one batched call each; the final figures match metrics.json.
    metrics = json.loads((root / "reports/train/metrics.json").read_text())
    history = client.get_metric_history(train.info.run_id, "val_auroc")
    assert [m.step for m in history] == list(range(metrics["epochs_run"]))
    assert len(read_rows(root / "reports/train/history.csv")) == metrics["epochs_run"]
    # timings go to MLflow only: metrics.json and history.csv are committed, same run same bytes
    assert not {"data_wait_fraction", "logging_overhead", "train_seconds"} & set(metrics)
    assert read_rows(root / "reports/train/history.csv")[0].keys() == {
        "epoch",
        "train_loss",
        "val_auroc",
    }
    assert 0 <= train.data.metrics["data_wait_fraction"] <= 1
    assert 0 <= train.data.metrics["logging_overhead"] < 1

    # The model: logged with a signature, registered, aliased challenger, loadable by MLflow. No
    # DVC output names the run or the registry's number (a fresh store counts from 1): the run is
    # found by the SHA-256 of the model.pt it wrote.
    from shiftguard.tracking import file_sha256, trained_model

    assert not (root / "artifacts/train/model.json").exists()
    info = trained_model(root / "artifacts/train/model.pt", root)
    assert info is not None and info.run_id == train.info.run_id and info.registered_model
    version = client.get_model_version_by_alias(info.registered_model, "challenger")
    assert str(version.version) == info.version and version.run_id == train.info.run_id
    import mlflow.pytorch
    import torch

    # models:/ URIs resolve against the process-wide store: point it at the project's for this test
    monkeypatch.setattr(
        "mlflow.tracking._tracking_service.utils._tracking_uri", f"sqlite:///{root / 'mlflow.db'}"
    )
    monkeypatch.setattr("mlflow.tracking._model_registry.utils._registry_uri", None)
    loaded = mlflow.pytorch.load_model(f"models:/{info.registered_model}@challenger")
    grid = tuple(config["ingest"]["shape"])
    assert loaded(torch.zeros(2, 1, *grid)).shape == (2, 1)

    # Validation: reports, plots, the validate run tied to the training run.
    report = json.loads((root / "reports/validate/metrics.json").read_text())
    assert {"threshold", "test", "segments"} <= set(report)
    assert validate.data.tags["shiftguard.train_run_id"] == train.info.run_id
    for name in ("roc.png", "reliability.png", "robustness.png", "segments.csv", "predictions.csv"):
        assert (root / "reports/validate" / name).is_file(), name
    predictions = read_rows(root / "reports/validate/predictions.csv")
    sets = config["augment"]["robustness"]
    tests = [r for r in read_rows(root / "artifacts/split/dataset.csv") if r["split"] == "test"]
    shifted = [r for r in predictions if r["set"] == "robustness"]
    assert len(shifted) == len(tests) * len(sets["profiles"]) * len(sets["severities"])
    assert all(0.0 <= float(r["prob"]) <= 1.0 for r in predictions)
    logged = {a.path for a in client.list_artifacts(validate.info.run_id)}
    assert {"roc.png", "robustness.csv", "segments.csv"} <= logged
    plots = json.loads(sh(root, "dvc", "plots", "show", "--json"))
    assert {"reports/validate/roc.png", "reports/validate/robustness.png"} <= set(plots["data"])
    # Export: a verified bundle with the validated threshold, logged and tagged in MLflow.
    from shiftguard.edge.bundle import open_bundle

    exported = json.loads((root / "artifacts/export/export.json").read_text())
    bundle = open_bundle(root / exported["bundle"])
    assert Path(exported["bundle"]).name == f"{info.registered_model}.sgbundle"
    assert bundle.name == info.registered_model and bundle.version == exported["version"]
    assert bundle.threshold == pytest.approx(report["threshold"])
    assert "mlflow" not in bundle.manifest
    assert train.info.run_id.encode() not in (root / exported["bundle"]).read_bytes()
    assert bundle.manifest["trained_model"]["sha256"] == file_sha256(
        root / "artifacts/train/model.pt"
    )
    assert bundle.manifest["training_data"]["data_dvc_md5"] == data_md5
    assert exported["onnx_max_abs_diff"] < 1e-4 and exported["preprocessing_max_abs_diff"] < 1e-5
    assert {"model.onnx", "reference.csv", "model_card.md"} <= set(bundle.members)
    reference = bundle.text("reference.csv").splitlines()
    splits = [r["split"] for r in read_rows(root / "artifacts/split/dataset.csv")]
    assert len(reference) == 1 + sum(s in ("train", "val", "test") for s in splits)
    assert not {"patient_id", "study_uid", "series_uid", "accession_number"} & set(
        reference[0].split(",")
    )
    tags = client.get_model_version(info.registered_model, info.version).tags
    assert tags["bundle_sha256"] == exported["bundle_sha256"]
    assert tags["bundle_version"] == bundle.version
    assert [a.path for a in client.list_artifacts(train.info.run_id, "bundle")] == [
        f"bundle/{Path(exported['bundle']).name}"
    ]
    # edge_predict: the unseen scanner's series, one SR and one key image each, shadow mode.
    external = [
        r for r in read_rows(root / "artifacts/split/dataset.csv") if r["split"] == "external"
    ]
    results = read_rows(root / "artifacts/edge/results.csv")
    assert sorted(r["series_uid"] for r in results) == sorted(r["series_uid"] for r in external)
    assert all(r["shadow"] == "1" for r in results)
    assert not {"read_s", "infer_s", "write_s"} & set(results[0] if results else {})
    timings = read_rows(root / "reports/edge/timings.csv")  # neither DVC's nor git's
    assert [t["series_uid"] for t in timings] == [r["series_uid"] for r in results]
    for row in results:
        assert (root / "artifacts/edge" / row["sr_file"]).is_file()
        assert (root / "artifacts/edge" / row["sc_file"]).is_file()
    # monitor: the unseen scanner's records judged against the reference, an Evidently workspace
    drift = json.loads((root / "reports/monitor/metrics.json").read_text())
    assert drift["n_studies"] == len(results)
    assert (root / "reports/monitor/drift.html").stat().st_size > 0
    if drift["judged"]:  # the tiny cohort's unseen scanner may have fewer than min_size studies
        assert (root / "artifacts/monitor/workspace").is_dir()
        # windows of consecutive studies in time, dated by the studies' own times
        times = sorted(r["study_datetime"] for r in results)
        assert drift["windows"][0]["start"] == f"{times[0]}Z"
        assert drift["windows"][-1]["end"] == f"{times[-1]}Z" == drift["window"]["end"]
        assert sum(w["n"] for w in drift["windows"]) == len(results)
        assert "ShiftGuard drift report" in (root / "reports/monitor/drift.html").read_text()
    else:
        assert "fewer than monitor.window.min_size" in drift["reason"]
    # scenarios: every scenario of conf/monitor/scenarios ran on simulated pools
    scenarios = json.loads((root / "reports/monitor/scenarios.json").read_text())
    assert {s["name"] for s in scenarios["scenarios"]} >= {"in_distribution", "new_scanner"}
    assert all(n > 0 for n in scenarios["pools"].values())
    # `shiftguard compare` reads the same figures back from MLflow.
    table = sh(root, "shiftguard", "compare").splitlines()
    assert table[0].split()[:3] == ["dvc_exp", "augment", "test"]
    assert table[1].split()[:2] == ["workspace", "True"]
    assert json.loads(sh(root, "dvc", "status", "--json")) == {}


def test_running_the_stages_again_gives_the_same_outputs(project: tuple[Path, dict]) -> None:
    """Train and everything after it once more, in the same MLflow store: a new run id and the
    next registry number (v2), new timings, new Evidently ids; the same bytes in every DVC output,
    so ``dvc.lock`` does not change (a fresh clone's ``make demo`` reproduces the committed one)."""
    root, _ = project
    sh(root, "dvc", "repro")
    lock = (root / "dvc.lock").read_text()
    reports = {p: p.read_bytes() for p in sorted((root / "reports").rglob("*.json")) if p.is_file()}
    sh(root, "dvc", "repro", "--force", "--downstream", "train")
    assert (root / "dvc.lock").read_text() == lock
    assert {p: p.read_bytes() for p in reports} == reports
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    name = json.loads((root / "artifacts/export/export.json").read_text())["name"]
    assert len(client.search_model_versions(f"name = '{name}'")) >= 2  # it did train again


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
    """``dvc exp run -S`` composes conf/ with the override and re-runs only the stage that reads
    it: an 80 % interval for the shadow evaluation, which must come out inside the 95 % one."""
    root, _ = project
    sh(root, "dvc", "repro")
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "tiny pipeline")
    summary = root / "reports/shadow/summary.json"
    before = json.loads(summary.read_text())["roles"]["challenger"]["overall"]
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    out = sh(root, "dvc", "exp", "run", "-n", "alpha20", "-S", "experiment=tiny",
             "-S", "shadow.alpha=0.2")  # fmt: skip
    assert "Running stage 'shadow'" in out
    assert "Running stage 'train'" not in out and "Running stage 'ingest'" not in out
    exps = json.loads(sh(root, "dvc", "exp", "show", "--json"))
    assert "alpha20" in json.dumps(exps)
    # DVC composed conf/ with the override and wrote params.yaml from it
    assert yaml.safe_load((root / "params.yaml").read_text())["shadow"]["alpha"] == 0.2
    relocked = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert relocked["shadow"]["params"]["params.yaml"]["shadow"]["alpha"] == 0.2
    after = json.loads(summary.read_text())["roles"]["challenger"]["overall"]
    # the same estimates; every interval the tiny log supports is now an 80 % one, inside the 95 %
    for metric in ("auroc", "sensitivity", "specificity"):
        assert after.get(metric) == before.get(metric)
        lo, hi = f"{metric}_low", f"{metric}_high"
        if before.get(lo) is not None and before.get(hi) is not None:
            assert before[lo] <= after[lo] <= after[hi] <= before[hi]
    assert {k: v for k, v in relocked.items() if k != "shadow"} == {
        k: v for k, v in lock.items() if k != "shadow"
    }
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
