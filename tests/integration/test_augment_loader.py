"""Online augmentation as a training loader runs it: deterministic preprocessing cached once by MONAI's
CacheDataset, the scanner simulation drawn per sample in the loader, reproducible from the run's seed."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import CacheDataset, DataLoader
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    ScaleIntensityRangePercentilesd,
)
from monai.utils import set_determinism

from shiftguard.augment import RandScannerSimd
from shiftguard.config import AugmentConfig, compose, validate

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def volumes(tmp_path: Path, n: int = 3) -> list[dict[str, str]]:
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        x, y, z = np.mgrid[:24, :28, :24]
        head = ((x - 12) ** 2 / 100 + (y - 14) ** 2 / 140 + (z - 12) ** 2 / 100) < 1
        data = (head * (100 + 20 * rng.standard_normal(head.shape))).astype(np.float32)
        path = tmp_path / f"v{i}.nii"
        nib.Nifti1Image(data, np.diag([4.0, 4.0, 4.0, 1.0])).to_filename(path)
        items.append({"image": str(path)})
    return items


def pipeline(cfg: AugmentConfig) -> Compose:
    return Compose(
        [
            LoadImaged("image", image_only=True),
            EnsureChannelFirstd("image"),
            ScaleIntensityRangePercentilesd("image", 1, 99, 0.0, 1.0, clip=False),
            RandScannerSimd.from_config("image", cfg, spacing=(4.0, 4.0, 4.0)),
        ]
    )


def epoch(loader: DataLoader) -> list[torch.Tensor]:
    return [batch["image"].as_tensor().clone() for batch in loader]


def test_cached_preprocessing_and_per_sample_simulation(tmp_path: Path) -> None:
    config = compose(["augment.probability=1.0"], conf_dir=REPO / "conf")
    cfg = validate("augment", config["augment"], AugmentConfig)
    items = volumes(tmp_path)

    set_determinism(seed=11)
    dataset = CacheDataset(items, pipeline(cfg), cache_rate=1.0, num_workers=0, progress=False)
    # CacheDataset caches up to the first random transform: the deterministic part only.
    cached = dataset._cache[0]["image"]
    assert float(cached.min()) >= -0.1 and float(
        np.percentile(cached.numpy(), 99)
    ) == pytest.approx(1.0, abs=0.05)
    loader = DataLoader(dataset, batch_size=1, num_workers=0)
    first, second = epoch(loader), epoch(loader)
    assert all(a.shape == (1, 1, 24, 28, 24) for a in first)
    # A new draw every time a sample is served, and none equals the cached input.
    assert all(not torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert all(not torch.allclose(a[0], cached) for a in first[:1])
    records = [batch["scanner_sim"] for batch in loader]
    assert all(r["applied"][0] for r in records)

    # Same seed, same sequence of simulated acquisitions.
    set_determinism(seed=11)
    again = CacheDataset(items, pipeline(cfg), cache_rate=1.0, num_workers=0, progress=False)
    repeat = epoch(DataLoader(again, batch_size=1, num_workers=0))
    assert all(torch.equal(a, b) for a, b in zip(first, repeat, strict=True))
    set_determinism(seed=None)


def test_augment_none_leaves_the_cached_images_untouched(tmp_path: Path) -> None:
    config = compose(["augment=none"], conf_dir=REPO / "conf")
    cfg = validate("augment", config["augment"], AugmentConfig)
    dataset = CacheDataset(volumes(tmp_path, 2), pipeline(cfg), cache_rate=1.0, progress=False)
    for i, batch in enumerate(DataLoader(dataset, batch_size=1)):
        assert torch.equal(batch["image"][0].as_tensor(), dataset._cache[i]["image"].as_tensor())
        assert not batch["scanner_sim"]["applied"][0]
