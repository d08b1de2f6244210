"""Lesion masks as a second training signal: found per series, moved onto the volume's grid through
both affines, flipped with the image, and turned into a lesion map the network learns."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from shiftguard.config.schema import ModelConfig, TrainConfig
from shiftguard.models import SmallCNN3d
from shiftguard.training import build_dataset, build_loader, fit, items_from_rows
from shiftguard.training.data import LesionMaskOnGridd, mask_file
from shiftguard.training.loop import lesion_map_loss
from shiftguard.training.stage import TrainingDataError
from shiftguard.training.stage import run as train_stage

SHAPE = (24, 28, 24)  # the rows fixture's volumes: 7 mm voxels, a blob of radius 3 at (9, 16, 12)
BLOB = np.array([9.0, 16.0, 12.0])


def write_masks(folder: Path, table: list[dict[str, str]]) -> Path:
    """Each series' mask on another grid than its volume: 3.5 mm voxels, the first axis reversed
    (as a left-right flipped acquisition stores it) and the field of view shifted, all in the
    affine; named by patient (``P<key>``), as the cohort names them."""
    folder.mkdir(parents=True, exist_ok=True)
    shape = (50, 58, 50)
    affine = np.diag([-3.5, 3.5, 3.5, 1.0])
    affine[:3, 3] = [7.0 * (SHAPE[0] - 1) + 3.5, -3.5, -3.5]
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    inside = (((world / 7.0) - BLOB) ** 2).sum(axis=-1) < 9
    for row in table:
        data = inside if row["finding"] == "1" else np.zeros(shape, bool)
        nib.Nifti1Image(data.astype(np.uint8), affine).to_filename(
            folder / f"P{row['series_key']}.nii.gz"
        )
    return folder


@pytest.fixture(scope="module")
def masked(rows, tmp_path_factory: pytest.TempPathFactory):
    root, table = rows
    table = [{**row, "patient_id": f"P{row['series_key']}"} for row in table]
    masks = write_masks(tmp_path_factory.mktemp("masks"), table)
    return root, table, masks


def cfg(**overrides: Any) -> TrainConfig:
    base: dict[str, Any] = {"seed": 3, "epochs": 4, "lr": 3e-3, "patience": 10}
    return TrainConfig(**{"pos_weight": "balanced", **base, **overrides})


def test_a_mask_on_another_grid_lands_on_the_lesion_and_flips_with_the_image(masked) -> None:
    root, table, masks = masked
    items = items_from_rows(table, root, "train", masks_dir=masks)
    positive = next(i for i in items if i["label"] == 1.0)
    moved = LesionMaskOnGridd()(dict(positive))["mask"]
    assert moved.shape == (1, *SHAPE) and 0.0 <= float(moved.min()) <= float(moved.max()) <= 1.0
    centre = (np.argwhere(moved[0].numpy() > 0.5)).mean(axis=0)
    np.testing.assert_allclose(centre, BLOB, atol=0.5)  # world to world, not voxel to voxel

    # through the dataset: flipped with the image (every sample flipped here), bright under the mask
    ds = build_dataset(items, cfg(flip_probability=1.0), train=True)
    for index, item in enumerate(items):
        sample = ds[index]
        image, mask = sample["image"][0].numpy(), sample["mask"][0].numpy()
        assert mask.shape == image.shape == SHAPE
        if item["label"] == 1.0:
            assert image[mask > 0.5].mean() > image[(image > 0.3) & (mask == 0)].mean() + 0.5
            centre = np.argwhere(mask > 0.5).mean(axis=0)
            assert centre[0] == pytest.approx(SHAPE[0] - 1 - BLOB[0], abs=0.5)  # flipped
        else:
            assert mask.max() == 0.0


def test_masks_are_found_by_series_then_patient_and_a_missing_one_is_named(
    masked, tmp_path: Path
) -> None:
    _root, table, masks = masked
    row = table[0]
    assert mask_file(masks, row).name == f"P{row['series_key']}.nii.gz"
    (tmp_path / f"{row['series_key']}.nii.gz").write_bytes(b"")
    assert mask_file(tmp_path, row).name == f"{row['series_key']}.nii.gz"
    with pytest.raises(ValueError, match=r"s01: no lesion mask .*s01\.nii\.gz or Ps01\.nii\.gz"):
        mask_file(tmp_path, table[1])


def test_the_lesion_loss_rewards_a_map_on_the_lesion() -> None:
    mask = torch.zeros(2, 1, 8, 8, 8)
    mask[0, 0, 2:4, 2:4, 2:4] = 1.0  # one cell of the 4x4x4 map
    right = torch.full((2, 1, 4, 4, 4), -4.0)
    right[0, 0, 1, 1, 1] = 4.0
    assert float(lesion_map_loss(right, mask)) < 0.05 < float(lesion_map_loss(-right, mask))
    # balanced: missing the one lesion cell costs as much as marking all 127 background cells
    miss = torch.full_like(right, -4.0)
    flood = torch.full_like(right, 4.0)
    flood[0, 0, 1, 1, 1] = 4.0
    assert float(lesion_map_loss(miss, mask)) == pytest.approx(
        float(lesion_map_loss(flood, mask)), rel=0.01
    )


def test_training_with_masks_learns_where_the_lesion_is(masked, tmp_path: Path) -> None:
    root, table, masks = masked
    config = cfg(epochs=20, patience=100, lesion_loss_weight=1.0)
    train = build_dataset(
        items_from_rows(table, root, "train", masks_dir=masks), config, train=True
    )
    val = build_dataset(items_from_rows(table, root, "val"), config)
    torch.manual_seed(config.seed)
    net = SmallCNN3d(channels=(4, 8, 16), lesion_head=True)
    fit(
        net,
        build_loader(train, config, True),
        build_loader(val, config, False),
        config,
        device="cpu",
        checkpoint_dir=tmp_path,
    )
    # the last epoch's weights: four validation series select an early one (AUROC 1 at once)
    net.load_state_dict(torch.load(tmp_path / "last.pt", weights_only=False)["model"])
    net.eval()
    with torch.no_grad():
        sample = train[next(i for i, item in enumerate(train.data) if item["label"] == 1.0)]
        _, lesion = net(sample["image"][None], lesion_map=True)
    peak = np.unravel_index(int(lesion[0, 0].argmax()), tuple(lesion.shape[2:]))
    target = torch.nn.functional.adaptive_max_pool3d(sample["mask"][None], lesion.shape[2:])
    assert float(target[0, 0][peak]) > 0.5  # the map's peak sits in a cell the lesion fills
    assert float(lesion[0, 0][target[0, 0] > 0.5].min()) > float(
        lesion[0, 0][target[0, 0] == 0].max()
    )


def test_masks_do_not_change_the_random_draws(masked, tmp_path: Path) -> None:
    """With weight 0 the masks ride along (flipped, resampled) and training is exactly as without."""
    root, table, masks = masked
    losses = []
    for name, folder in (("with", masks), ("without", None)):
        config = cfg(epochs=2, lesion_loss_weight=0.0)
        train = build_dataset(
            items_from_rows(table, root, "train", masks_dir=folder), config, train=True
        )
        val = build_dataset(items_from_rows(table, root, "val"), config)
        torch.manual_seed(config.seed)
        net = SmallCNN3d(channels=(4, 8, 16), lesion_head=True)
        result = fit(
            net,
            build_loader(train, config, True),
            build_loader(val, config, False),
            config,
            device="cpu",
            checkpoint_dir=tmp_path / name,
        )
        losses.append([r.train_loss for r in result.history])
    assert losses[0] == losses[1]


def test_the_stage_refuses_masks_it_cannot_use(masked, conf_dir: Path, tmp_path: Path) -> None:
    root, table, masks = masked
    dataset = tmp_path / "dataset.csv"
    with dataset.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    from shiftguard.config import compose_section
    from shiftguard.config.schema import AugmentConfig

    augment = compose_section("augment", AugmentConfig, ["augment.enabled=false"], conf_dir)
    head = ModelConfig(network={"_target_": "shiftguard.models.SmallCNN3d", "lesion_head": True})
    plain = ModelConfig(network={"_target_": "shiftguard.models.SmallCNN3d"})
    with pytest.raises(TrainingDataError, match="not a folder of lesion masks"):
        train_stage(
            cfg(epochs=1, lesion_masks=str(tmp_path / "none")),
            head,
            augment,
            dataset,
            root,
            tmp_path / "a",
            track=False,
            root=tmp_path,
        )
    with pytest.raises(TrainingDataError, match="no lesion head"):
        train_stage(
            cfg(epochs=1, lesion_masks=str(masks)),
            plain,
            augment,
            dataset,
            root,
            tmp_path / "b",
            track=False,
            root=tmp_path,
        )
    (tmp_path / "few").mkdir()
    with pytest.raises(TrainingDataError, match=r"dataset\.csv: series s00: no lesion mask"):
        train_stage(
            cfg(epochs=1, lesion_masks=str(tmp_path / "few")),
            head,
            augment,
            dataset,
            root,
            tmp_path / "c",
            track=False,
            root=tmp_path,
        )


def test_a_network_without_a_lesion_head_says_so() -> None:
    with pytest.raises(ValueError, match="needs a network built with lesion_head"):
        SmallCNN3d(channels=(2, 4))(torch.zeros(1, 1, 8, 8, 8), lesion_map=True)
