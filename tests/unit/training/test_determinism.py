"""Training is reproducible bit for bit with the scanner simulation on and loader workers running.

Every sample's random draws (simulated scanner, flip) come from a seed derived from ``train.seed``,
the epoch and the sample's index, so the result depends neither on which process transforms the
sample nor on the number of loader workers; torch's global generator (dropout) is reseeded every
epoch and nothing else draws from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from shiftguard.config import compose_section
from shiftguard.config.schema import AugmentConfig, TrainConfig
from shiftguard.models import SmallCNN3d
from shiftguard.training import build_dataset, build_loader, fit, items_from_rows


@dataclass
class Run:
    best: dict[str, torch.Tensor]  # the weights fit returns (the best epoch's)
    last: dict[str, torch.Tensor]  # the weights after the last epoch
    history: list[tuple[int, float, float]]  # (epoch, train loss, val AUROC)


@pytest.fixture(scope="module")
def augment(conf_dir: Path) -> AugmentConfig:
    """Every sample simulated, every profile drawable (the thick-slice profile's anisotropy too)."""
    return compose_section("augment", AugmentConfig, ["augment.probability=1.0"], conf_dir)


def train(
    rows: tuple[Path, list[dict[str, str]]],
    augment: AugmentConfig,
    out: Path,
    workers: int,
    **overrides: Any,
) -> Run:
    root, table = rows
    cfg = TrainConfig(
        **{
            "seed": 3,
            "epochs": 2,
            "batch_size": 4,
            "lr": 3e-3,
            "patience": 10,
            "pos_weight": "balanced",
            "num_workers": workers,
            **overrides,
        }
    )
    train_set = build_dataset(items_from_rows(table, root, "train"), cfg, True, augment)
    val_set = build_dataset(items_from_rows(table, root, "val"), cfg)
    torch.manual_seed(cfg.seed)
    model = SmallCNN3d(channels=(4, 8, 16), dropout=0.1)  # dropout draws from torch's generator
    result = fit(
        model,
        build_loader(train_set, cfg, shuffle=True),
        build_loader(val_set, cfg, shuffle=False),
        cfg,
        device="cpu",
        checkpoint_dir=out,
        resume=False,
    )
    last = torch.load(result.last_checkpoint, map_location="cpu", weights_only=False)["model"]
    return Run(
        best={k: v.detach().clone() for k, v in model.state_dict().items()},
        last=last,
        history=[(r.epoch, r.train_loss, r.val_auroc) for r in result.history],
    )


def assert_same(a: Run, b: Run) -> None:
    assert a.history == b.history
    for weights_a, weights_b in ((a.best, b.best), (a.last, b.last)):
        assert weights_a.keys() == weights_b.keys()
        different = [k for k in weights_a if not torch.equal(weights_a[k], weights_b[k])]
        assert not different, f"weights differ: {different}"


@pytest.fixture(scope="module")
def two_workers(
    rows: tuple[Path, list[dict[str, str]]],
    augment: AugmentConfig,
    tmp_path_factory: pytest.TempPathFactory,
) -> Run:
    return train(rows, augment, tmp_path_factory.mktemp("two-workers"), workers=2)


def test_augmented_training_with_two_loader_workers_is_bit_identical(
    rows: tuple[Path, list[dict[str, str]]],
    augment: AugmentConfig,
    two_workers: Run,
    tmp_path: Path,
) -> None:
    first = two_workers
    second = train(rows, augment, tmp_path / "b", workers=2)
    assert len(first.history) == 2
    assert_same(first, second)
    # the seed matters: the same test with another seed would pass vacuously otherwise
    other = train(rows, augment, tmp_path / "c", workers=2, seed=4)
    assert other.history != first.history


def test_the_number_of_loader_workers_does_not_change_the_network(
    rows: tuple[Path, list[dict[str, str]]],
    augment: AugmentConfig,
    two_workers: Run,
    tmp_path: Path,
) -> None:
    two = two_workers
    # In the main process: the simulation's draws must not touch torch's generator, which dropout
    # uses (TorchIO did, once per new slice-thickness geometry, so a second run in the same process
    # differed from the first).
    main = train(rows, augment, tmp_path / "w0", workers=0)
    again = train(rows, augment, tmp_path / "w0-again", workers=0)
    one = train(rows, augment, tmp_path / "w1", workers=1)
    assert_same(main, again)
    assert_same(two, main)
    assert_same(two, one)


def test_the_train_stage_twice_writes_the_same_bytes(
    rows: tuple[Path, list[dict[str, str]]],
    dataset_csv: Path,
    augment: AugmentConfig,
    tmp_path: Path,
) -> None:
    """What the stage writes into DVC outputs and committed reports (weights, checkpoints,
    metrics.json, history.csv) holds no timings and nothing of MLflow's: two runs, each tracked in
    a fresh store where the model gets another run id and registry number (v1, v3), give the same
    files. Each store finds its run, and the version registered from it, by the model's SHA-256."""

    from mlflow.tracking import MlflowClient

    from shiftguard.config.schema import ModelConfig
    from shiftguard.tracking import embedded_uri, trained_model
    from shiftguard.training.stage import run as train_stage
    from shiftguard.utils import write_json

    root = rows[0]
    dataset = dataset_csv
    model = ModelConfig(
        network={"_target_": "shiftguard.models.SmallCNN3d", "channels": [4, 8, 16]}
    )
    cfg = TrainConfig(seed=3, epochs=2, batch_size=4, pos_weight="balanced", num_workers=2)
    files, found = [], []
    for name, earlier in (("a", 0), ("b", 2)):
        project = tmp_path / name
        if earlier:  # this store's registry has counted other models already
            client = MlflowClient(embedded_uri(project))
            client.create_registered_model(cfg.registered_model)
            for _ in range(earlier):
                client.create_model_version(cfg.registered_model, (project / "x").as_uri())
        out = project / "out"
        summary = train_stage(
            cfg,
            model,
            augment,
            dataset,
            root,
            out / "train",
            history_csv=out / "history.csv",
            root=project,
        )
        write_json(out / "metrics.json", summary.to_metrics())
        assert summary.timings()["train_seconds"] > 0  # measured, just not written
        assert summary.version == str(earlier + 1)
        files.append(
            {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
        )
        found.append(trained_model(out / "train" / "model.pt", project))
        assert found[-1] is not None
        assert (found[-1].run_id, found[-1].version) == (summary.run_id, summary.version)
    assert set(files[0]) >= {
        Path("metrics.json"),
        Path("history.csv"),
        Path("train/model.pt"),
        Path("train/checkpoints/last.pt"),
    }
    assert Path("train/model.json") not in files[0]
    assert found[0].run_id != found[1].run_id  # type: ignore[union-attr]
    assert files[0].keys() == files[1].keys()
    assert [p for p in files[0] if files[0][p] != files[1][p]] == []
    assert files[0][Path("history.csv")].decode().splitlines()[0] == "epoch,train_loss,val_auroc"
