"""Fixtures for the training tests: a tiny labelled split table on volumes written to disk."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

SHAPE = (24, 28, 24)


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str]]]:
    """12 tiny volumes with vendor-like scales; positives carry a bright blob. 8 train, 4 val."""
    root = tmp_path_factory.mktemp("ingest")
    (root / "volumes").mkdir()
    rng = np.random.default_rng(0)
    x, y, z = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    head = ((x - 12) ** 2 / 100 + (y - 14) ** 2 / 140 + (z - 12) ** 2 / 100) < 1
    blob = ((x - 9) ** 2 + (y - 16) ** 2 + (z - 12) ** 2) < 9
    out = []
    for i in range(12):
        finding = i % 2
        scale = [1000.0, 3000.0, 400.0][i % 3]
        data = head * (1 + 0.1 * rng.standard_normal(SHAPE)) + finding * 1.5 * blob
        key = f"s{i:02d}"
        nib.Nifti1Image(
            (scale * data).astype(np.float32), np.diag([7.0, 7.0, 7.0, 1.0])
        ).to_filename(root / "volumes" / f"{key}.nii")
        out.append(
            {
                "series_key": key,
                "volume_path": f"volumes/{key}.nii",
                "finding": str(finding),
                "split": "train" if i < 8 else "val",
            }
        )
    return root, out


@pytest.fixture
def dataset_csv(rows: tuple[Path, list[dict[str, str]]], tmp_path: Path) -> Path:
    """The split table of :func:`rows` written to ``tmp_path/dataset.csv``."""
    table = rows[1]
    path = tmp_path / "dataset.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    return path
