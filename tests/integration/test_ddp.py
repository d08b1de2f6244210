"""``shiftguard train`` under ``torchrun --nproc_per_node 2``: DDP with gloo on CPU, for real."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from shiftguard.training.stage import load_model

pytestmark = pytest.mark.integration

SHAPE = (16, 20, 16)
N_TRAIN, N_VAL = 10, 4


def write_split(root: Path) -> Path:
    """Tiny volumes (positives carry a bright blob) and their split table."""
    (root / "volumes").mkdir(parents=True)
    rng = np.random.default_rng(1)
    x, y, z = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    head = ((x - 8) ** 2 / 40 + (y - 10) ** 2 / 60 + (z - 8) ** 2 / 40) < 1
    blob = ((x - 6) ** 2 + (y - 11) ** 2 + (z - 8) ** 2) < 5
    rows = []
    for i in range(N_TRAIN + N_VAL):
        finding = i % 2
        data = head * (1 + 0.1 * rng.standard_normal(SHAPE)) + finding * 1.5 * blob
        key = f"s{i:02d}"
        nib.Nifti1Image(
            (1000 * data).astype(np.float32), np.diag([8.0, 8.0, 8.0, 1.0])
        ).to_filename(root / "volumes" / f"{key}.nii")
        rows.append(
            {
                "series_key": key,
                "volume_path": f"volumes/{key}.nii",
                "finding": str(finding),
                "split": "train" if i < N_TRAIN else "val",
            }
        )
    table = root / "dataset.csv"
    with table.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return table


def test_two_gloo_processes_train_one_model_on_disjoint_shards(tmp_path: Path) -> None:
    table = write_split(tmp_path / "ingest")
    out = tmp_path / "train"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "shiftguard.cli", "train", "--no-track", "--device", "cpu",
        "--dataset", str(table), "--ingest", str(tmp_path / "ingest"), "--out", str(out),
        "experiment=tiny", "train.epochs=2", "train.batch_size=2", "train.patience=5",
        "augment.enabled=false", "train.lesion_masks=null",
    ]  # fmt: skip
    result = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    # Each rank trained on its half of every epoch: 5 of the 10 training series, twice.
    assert metrics["samples_per_rank"] == [N_TRAIN // 2 * 2, N_TRAIN // 2 * 2]
    # Gradients were all-reduced: both ranks ended with the same weights.
    assert metrics["weights_in_sync"] is True
    assert metrics["epochs_run"] == 2

    net, payload = load_model(out / "model.pt")
    assert payload["input"]["ingest_shape"] == list(SHAPE)
    assert net(torch.zeros(1, 1, *SHAPE)).shape == (1, 1)
    # Only rank 0 wrote checkpoints; there is exactly one set of them.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
