from __future__ import annotations

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
