from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from shiftguard.tracking import MetricLogger, data_version, provenance_tags, stage_run


def git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    git(tmp_path, "init", "-q")
    git(tmp_path, "config", "user.email", "t@example.org")
    git(tmp_path, "config", "user.name", "t")
    (tmp_path / "data.dvc").write_text(
        "outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  size: 10\n  nfiles: 2\n  path: data\n"
    )
    git(tmp_path, "add", "data.dvc")
    git(tmp_path, "commit", "-qm", "data")
    return tmp_path


def test_provenance_names_commit_dirtiness_experiment_and_data(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    tags = provenance_tags(repo)
    assert tags["mlflow.source.git.commit"] == git(repo, "rev-parse", "HEAD")
    assert tags["shiftguard.git_dirty"] == "False"
    assert tags["shiftguard.dvc_exp"] == "workspace"
    assert tags["shiftguard.data_dvc_md5"] == "0123456789abcdef0123456789abcdef.dir"

    (repo / "data.dvc").write_text("outs:\n- md5: ffff.dir\n  path: data\n")
    monkeypatch.setenv("DVC_EXP_NAME", "sim-off")
    tags = provenance_tags(repo)
    assert tags["shiftguard.git_dirty"] == "True"
    assert tags["shiftguard.dvc_exp"] == "sim-off"
    assert tags["shiftguard.data_dvc_md5"] == "ffff.dir"


def test_outside_git_and_without_data_dvc_nothing_is_invented(tmp_path: Path) -> None:
    tags = provenance_tags(tmp_path)
    assert "mlflow.source.git.commit" not in tags
    assert data_version(tmp_path) is None
    (tmp_path / "data.dvc").write_text(": not yaml : [")
    assert data_version(tmp_path) is None


def test_stage_run_logs_params_tags_and_batched_metrics(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mlflow.tracking import MlflowClient

    params = {"train": {"lr": 0.001, "epochs": 3}, "big": {f"k{i}": i for i in range(150)}}
    with stage_run("train", params, root=repo, tags={"extra": "yes"}) as run:
        logger = MetricLogger(run.info.run_id)
        for step in range(3):
            logger.log({"loss": 1.0 / (step + 1), "auroc": float("nan")}, step=step)
    assert logger.calls == 3 and logger.seconds > 0
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    stored = client.get_run(run.info.run_id)
    assert stored.data.params["train.lr"] == "0.001"
    assert stored.data.params["big.k149"] == "149"  # more than one 100-param batch
    assert stored.data.tags["extra"] == "yes"
    assert stored.data.tags["shiftguard.stage"] == "train"
    assert stored.data.tags["shiftguard.data_dvc_md5"].endswith(".dir")
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, round(m.value, 3)) for m in history] == [(0, 1.0), (1, 0.5), (2, 0.333)]
    assert "auroc" not in stored.data.metrics  # NaN is skipped, not stored
    experiment = client.get_experiment_by_name("shiftguard")
    assert experiment.artifact_location == (repo / "mlruns").resolve().as_uri()


def test_run_names_say_what_and_which(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Repeated runs must not all be called ``train``: the name carries what ran (the caller's
    name) and the DVC experiment it ran in."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    with stage_run("validate", {}, root=repo) as plain:
        pass
    monkeypatch.setenv("DVC_EXP_NAME", "lusty-kiln")
    with stage_run("train", {}, root=repo, name="train artifact seed 3") as named:
        pass
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    assert client.get_run(plain.info.run_id).info.run_name == "validate"
    stored = client.get_run(named.info.run_id)
    assert stored.info.run_name == "train artifact seed 3 [lusty-kiln]"
    assert stored.data.tags["shiftguard.stage"] == "train"  # the stage stays filterable


def test_stage_run_logs_the_params_to_review_and_the_whole_config_as_yaml(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runs list shows what a reviewer compares; nothing of the config is lost: the run's
    ``config.yaml`` holds all of it, nested as the stage was given it."""
    import yaml
    from mlflow.tracking import MlflowClient

    from shiftguard.tracking import CONFIG_ARTIFACT

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = {
        "train": {"lr": 0.001, "seed": 3, "optimizer": {"_target_": "torch.optim.AdamW"}},
        "cohort": {f"k{i}": i for i in range(150)},
        "model": {"network": {"channels": [4, 8], "dropout": 0.1}},
    }
    logged = ["train.lr", "train.optimizer", "model"]
    with stage_run("train", params, root=repo, logged_params=logged) as run:
        pass
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    stored = client.get_run(run.info.run_id)
    assert stored.data.params == {
        "train.lr": "0.001",
        "train.optimizer._target_": "torch.optim.AdamW",
        "model.network.channels": "[4, 8]",
        "model.network.dropout": "0.1",
    }
    local = client.download_artifacts(run.info.run_id, CONFIG_ARTIFACT, str(repo / "dl"))
    assert yaml.safe_load(Path(local).read_text()) == params


def test_the_experiment_is_marked_as_model_training_new_or_old(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's UI reads the experiment kind from a tag; an experiment made before (untagged)
    is tagged on its next run."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from shiftguard.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, embedded_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = MlflowClient(embedded_uri(repo))
    older = client.create_experiment("older", (repo / "mlruns").as_uri())
    with stage_run("train", {}, root=repo):
        pass
    with stage_run("validate", {}, root=repo, experiment="older"):
        pass
    for name in ("shiftguard", "older"):
        found = client.get_experiment_by_name(name)
        assert found.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    assert client.get_experiment(older).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert mlflow.get_experiment_by_name("older").experiment_id == older


def test_metrics_logged_for_a_model_are_on_the_model_and_the_run(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A logged model's page lists the metrics logged with its id; a run's later metrics without
    it are not the model's."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from shiftguard.tracking import embedded_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with stage_run("train", {}, root=repo) as run:
        model = mlflow.initialize_logged_model(name="model", source_run_id=run.info.run_id)
        logger = MetricLogger(run.info.run_id)
        logger.log({"best_val_auroc": 0.91, "epochs_run": 4}, model_id=model.model_id)
        logger.log({"train_seconds": 12.5})
    client = MlflowClient(embedded_uri(repo))
    on_model = {m.key: m.value for m in client.get_logged_model(model.model_id).metrics or []}
    assert on_model == {"best_val_auroc": 0.91, "epochs_run": 4.0}
    assert client.get_run(run.info.run_id).data.metrics == {
        "best_val_auroc": 0.91,
        "epochs_run": 4.0,
        "train_seconds": 12.5,
    }


def test_model_versions_and_runs_name_each_other(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bundle's content version leads to the newest model version exported to it; linking tags
    the version with the run and the run with the version."""
    from mlflow.tracking import MlflowClient

    from shiftguard.tracking import (
        MODEL_VERSION_TAG,
        VALIDATE_RUN_TAG,
        bundle_model_version,
        embedded_uri,
        link_run,
    )

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = MlflowClient(embedded_uri(repo))
    client.create_registered_model("m")
    for _ in range(3):
        client.create_model_version("m", (repo / "x").as_uri())
    for version in ("1", "2"):
        client.set_model_version_tag("m", version, "bundle_version", "0c0ffee")
    assert bundle_model_version(client, "m", "0c0ffee") == "2"
    assert bundle_model_version(client, "m", "unknown") is None
    assert bundle_model_version(client, "", "0c0ffee") is None
    with stage_run("validate", {}, root=repo) as run:
        pass
    link_run(client, "m", "2", run.info.run_id, VALIDATE_RUN_TAG)
    assert client.get_model_version("m", "2").tags[VALIDATE_RUN_TAG] == run.info.run_id
    assert client.get_run(run.info.run_id).data.tags[MODEL_VERSION_TAG] == "m/2"


def test_pointing_mlflow_at_a_store_leaves_the_environment_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # mlflow.set_tracking_uri exports its argument: every later subprocess (dvc repro, a notebook
    # kernel) would log into this store as if the user had chosen it
    import mlflow

    from shiftguard.tracking import embedded_uri, set_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    set_store(embedded_uri(tmp_path))
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert mlflow.get_tracking_uri() == embedded_uri(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    set_store(embedded_uri(tmp_path / "other"))
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"
