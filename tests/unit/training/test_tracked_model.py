"""What the train stage leaves in MLflow for a reviewer (a temporary SQLite store): the logged
model carries the metrics of the epoch its weights are from, the new version is the challenger, the
run is named after it, and the runs list holds the params worth comparing, not the whole config."""

from __future__ import annotations

from pathlib import Path

import pytest

from shiftguard.config import compose_section
from shiftguard.config.schema import AugmentConfig, ModelConfig, TrainConfig


@pytest.mark.parametrize("keep", ["last", "best"])
def test_the_logged_model_carries_the_saved_epochs_metrics(
    rows: tuple[Path, list[dict[str, str]]],
    dataset_csv: Path,
    conf_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    keep: str,
) -> None:
    from mlflow.tracking import MlflowClient

    from shiftguard.tracking import (
        CHALLENGER,
        CONFIG_ARTIFACT,
        MODEL_VERSION_TAG,
        embedded_uri,
        trained_model,
    )
    from shiftguard.training.stage import LOGGED_PARAMS, saved_epoch
    from shiftguard.training.stage import run as train_stage

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    root = rows[0]
    dataset = dataset_csv
    augment = compose_section("augment", AugmentConfig, ["augment.enabled=false"], conf_dir)
    model = ModelConfig(network={"_target_": "shiftguard.models.SmallCNN3d", "channels": [4, 8]})
    cfg = TrainConfig(seed=1, epochs=3, batch_size=4, num_workers=0, keep=keep, lr=0.01)
    params = {
        "train": cfg.model_dump(mode="json"),
        "model": model.model_dump(mode="json"),
        "augment": augment.model_dump(mode="json"),
        "cohort": {"seed": 5, "anatomy": {"head_scale_sd": 0.05}},
    }
    summary = train_stage(
        cfg, model, augment, dataset, root, tmp_path / "train", params=params, root=tmp_path
    )
    client = MlflowClient(embedded_uri(tmp_path))
    found = trained_model(tmp_path / "train" / "model.pt", tmp_path)
    assert found is not None and found.model_id is not None
    assert (found.run_id, found.version) == (summary.run_id, summary.version)

    # the model's metrics: the saved epoch's (not the first one's) and the run's summary
    epoch = saved_epoch(summary.fit, keep)
    record = summary.fit.history[epoch]
    assert epoch == (summary.fit.best_epoch if keep == "best" else 2)
    logged = client.get_logged_model(found.model_id)
    on_model = {(m.key, m.step): m.value for m in logged.metrics or []}
    assert on_model[("train_loss", epoch)] == pytest.approx(record.train_loss)
    assert on_model[("val_auroc", epoch)] == pytest.approx(record.val_auroc)
    assert on_model[("best_epoch", 0)] == summary.fit.best_epoch
    assert on_model[("epochs_run", 0)] == 3
    assert {key for key, step in on_model if key == "train_loss"} == {"train_loss"}
    assert [step for key, step in on_model if key == "train_loss"] == [epoch]
    assert "train_seconds" not in {key for key, _ in on_model}  # timings stay on the run

    # the registry: the new version is the challenger; the run is named after it and names it
    version = client.get_model_version(summary.registered_model, summary.version)
    assert version.aliases == [CHALLENGER]
    run = client.get_run(summary.run_id)
    assert run.info.run_name == f"train v{summary.version} none seed 1"
    assert run.data.tags[MODEL_VERSION_TAG] == f"{summary.registered_model}/{summary.version}"

    # params: the reviewer's selection; the whole config is config.yaml
    assert run.data.params["train.lr"] == "0.01"
    assert run.data.params["cohort.seed"] == "5"
    assert "cohort.anatomy.head_scale_sd" not in run.data.params
    assert all(any(k == p or k.startswith(f"{p}.") for p in LOGGED_PARAMS) for k in run.data.params)
    artifacts = {a.path for a in client.list_artifacts(summary.run_id)}
    assert CONFIG_ARTIFACT in artifacts
