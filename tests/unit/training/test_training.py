from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pickle_trap import Trap

from shiftguard.config import ConfigError, compose_section
from shiftguard.config.schema import AugmentConfig, TrainConfig
from shiftguard.models import SmallCNN3d
from shiftguard.training import (
    TrainStep,
    build_dataset,
    build_loader,
    build_loss,
    fit,
    items_from_rows,
    predict,
    volume_geometry,
)

SHAPE = (24, 28, 24)


def train_cfg(**overrides: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "seed": 3,
        "epochs": 4,
        "batch_size": 4,
        "lr": 3e-3,
        "patience": 10,
        "pos_weight": "balanced",
    }
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def augment(conf_dir: Path) -> AugmentConfig:
    return compose_section("augment", AugmentConfig, ["augment.probability=0.5"], conf_dir)


def loaders(
    rows: tuple[Path, list[dict[str, str]]], cfg: TrainConfig, augment: AugmentConfig | None
):
    root, table = rows
    train = build_dataset(items_from_rows(table, root, "train"), cfg, train=True, augment=augment)
    val = build_dataset(items_from_rows(table, root, "val"), cfg)
    return build_loader(train, cfg, shuffle=True), build_loader(val, cfg, shuffle=False)


def run(rows, cfg: TrainConfig, augment, ckpt: Path, resume: bool = True, device: str = "cpu"):
    train, val = loaders(rows, cfg, augment)
    torch.manual_seed(cfg.seed)
    model = SmallCNN3d(channels=(4, 8, 16), dropout=0.1)
    result = fit(model, train, val, cfg, device=device, checkpoint_dir=ckpt, resume=resume)
    return model, result, val


def test_items_geometry_batches_and_an_augmented_epoch(rows, augment, tmp_path: Path) -> None:
    root, table = rows
    items = items_from_rows(table, root, "train")
    assert len(items) == 8 and {i["label"] for i in items} == {0.0, 1.0}
    assert volume_geometry([i["image"] for i in items]) == ((7.0, 7.0, 7.0), SHAPE)
    train, _ = loaders(rows, train_cfg(), augment)
    batch = next(iter(train))
    assert batch["image"].shape == (4, 1, *SHAPE) and batch["label"].is_floating_point()
    assert batch["label"].shape == (4,)
    # percentile scaling removes each vendor's scale
    _, result, _ = run(rows, train_cfg(epochs=1), augment, tmp_path)
    assert math.isfinite(result.history[0].train_loss)
    cached = build_dataset(items[:3], train_cfg())
    p99 = [float(np.percentile(cached[i]["image"].numpy(), 99)) for i in range(3)]
    assert p99 == pytest.approx([1.0, 1.0, 1.0], abs=0.05)
    with pytest.raises(ValueError, match="not 0/1"):
        items_from_rows([{**table[0], "finding": ""}], root)


def test_a_tiny_run_learns_the_blob(rows, tmp_path: Path) -> None:
    cfg = train_cfg(epochs=6)
    model, result, val = run(rows, cfg, None, tmp_path)
    assert result.best_val_auroc > 0.8
    _labels, probs, keys = predict(model, val, "cpu")
    assert keys == ["s08", "s09", "s10", "s11"] and probs.shape == (4,)
    assert 0.0 <= result.data_wait_fraction <= 1.0
    assert all(0.0 <= r.data_wait_fraction <= 1.0 for r in result.history)
    assert result.best_checkpoint.is_file() and result.last_checkpoint.is_file()


# Exact equality with the scanner simulation on and loader workers running: test_determinism.py.
# Here the random flip exercises the per-epoch reseeding of the dataset's random transforms.
def test_same_seed_same_losses(rows, tmp_path: Path) -> None:
    cfg = train_cfg(epochs=2)
    _, a, _ = run(rows, cfg, None, tmp_path / "a")
    _, b, _ = run(rows, cfg, None, tmp_path / "b")
    assert [r.train_loss for r in a.history] == [r.train_loss for r in b.history]
    _, c, _ = run(rows, train_cfg(epochs=2, seed=4), None, tmp_path / "c")
    assert [r.train_loss for r in a.history] != [r.train_loss for r in c.history]


def test_resume_reaches_the_uninterrupted_state(rows, tmp_path: Path) -> None:
    whole_model, whole, _ = run(rows, train_cfg(epochs=3), None, tmp_path / "whole")
    _, first, _ = run(rows, train_cfg(epochs=1), None, tmp_path / "split")
    assert first.epochs_run == 1
    resumed_model, resumed, _ = run(rows, train_cfg(epochs=3), None, tmp_path / "split")
    assert resumed.epochs_run == 2
    assert [r.train_loss for r in resumed.history] == [r.train_loss for r in whole.history]
    assert resumed.best_epoch == whole.best_epoch
    for (name, a), (_, b) in zip(
        whole_model.state_dict().items(), resumed_model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_a_checkpoint_that_would_run_code_is_refused_unrun(rows, tmp_path: Path) -> None:
    from shiftguard.training.stage import ModelFileError

    run(rows, train_cfg(epochs=1), None, tmp_path)
    last = tmp_path / "last.pt"
    state = torch.load(last, weights_only=True)
    marker = tmp_path / "the trap ran"
    state["history"].append(Trap(marker))
    torch.save(state, last)
    with pytest.raises(ModelFileError, match=r"last\.pt: not a readable checkpoint"):
        run(rows, train_cfg(epochs=2), None, tmp_path)
    assert not marker.exists()


def test_early_stopping_when_val_auroc_does_not_improve(rows, tmp_path: Path) -> None:
    # min_delta=1 makes any gain in AUROC too small to count
    _, result, _ = run(rows, train_cfg(epochs=10, patience=2, min_delta=1.0), None, tmp_path)
    assert result.stopped_early and result.epochs_run == 3 and result.best_epoch == 0
    # a resumed, stopped run does nothing more
    _, again, _ = run(rows, train_cfg(epochs=10, patience=2, min_delta=1.0), None, tmp_path)
    assert again.epochs_run == 0 and again.stopped_early


def test_loss_pos_weight() -> None:
    loss = build_loss(train_cfg(), np.array([0, 0, 0, 1.0]))
    assert float(loss.pos_weight) == 3.0  # type: ignore[arg-type]
    assert build_loss(train_cfg(pos_weight=None)).pos_weight is None  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="one class"):
        build_loss(train_cfg(), np.array([1.0, 1.0]))


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("train.optimizer._partial_=false", "train.optimizer"),
        ("train.intensity_percentiles=[99,1]", "train.intensity_percentiles"),
        ("train.batch_size=0", "train.batch_size"),
    ],
)
def test_bad_train_values_fail_naming_the_key(conf_dir: Path, override: str, names: str) -> None:
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        compose_section("train", TrainConfig, [override], conf_dir)


def test_gpu_preset_uses_amp(conf_dir: Path) -> None:
    cfg = compose_section("train", TrainConfig, ["train=gpu"], conf_dir)
    assert cfg.amp and cfg.batch_size > TrainConfig().batch_size
    assert not math.isnan(cfg.lr)


def test_train_step_updates_weights_and_ignores_amp_off_cuda() -> None:
    torch.manual_seed(0)
    model = SmallCNN3d(channels=(2, 4, 8), dropout=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = TrainStep(model, optimizer, torch.nn.BCEWithLogitsLoss(), torch.device("cpu"), amp=True)
    assert not step.amp and not step.scaler.is_enabled()
    image = torch.randn(4, 1, *SHAPE)
    label = torch.tensor([[0.0], [1.0], [0.0], [1.0]])
    before = [p.detach().clone() for p in model.parameters()]
    losses = [step(image, label) for _ in range(5)]
    assert all(isinstance(v, float) and math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_amp_on_cuda_learns_the_blob_and_resumes(rows, tmp_path: Path) -> None:
    cfg = train_cfg(epochs=6, amp=True)
    model, result, val = run(rows, cfg, None, tmp_path, device="cuda")
    assert result.best_val_auroc > 0.8
    assert all(p.dtype == torch.float32 and p.is_cuda for p in model.parameters())
    state = torch.load(result.last_checkpoint, map_location="cpu", weights_only=False)
    assert state["scaler"]["scale"] > 0  # the gradient scaler ran and is checkpointed
    _labels, probs, _ = predict(model, val, "cuda")
    assert np.all((probs >= 0) & (probs <= 1))
    _, resumed, _ = run(rows, train_cfg(epochs=7, amp=True), None, tmp_path, device="cuda")
    assert resumed.epochs_run == 1 and len(resumed.history) == 7


def test_the_train_stage_twice_gives_the_same_network(
    rows, dataset_csv: Path, augment: AugmentConfig, tmp_path: Path
) -> None:
    """The stage seeds the initial weights too (it once built the network before seeding)."""

    from shiftguard.config.schema import ModelConfig
    from shiftguard.training.stage import load_model
    from shiftguard.training.stage import run as train_stage

    root = rows[0]
    dataset = dataset_csv
    model = ModelConfig(
        network={"_target_": "shiftguard.models.SmallCNN3d", "channels": [4, 8, 16]}
    )
    weights = []
    for i in range(2):
        torch.manual_seed(1000 + i)  # whatever the global state before the stage
        train_stage(
            train_cfg(epochs=1), model, augment, dataset, root, tmp_path / f"run{i}", track=False
        )
        net, _ = load_model(tmp_path / f"run{i}" / "model.pt", "cpu")
        weights.append(net.state_dict())
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
