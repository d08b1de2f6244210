"""Benchmark: a training sample of each augmentation arm where the loader's workers make it (the CPU
implementations: SimpleITK, scipy, MONAI and TorchIO's ``RandomLabelsToImage``) against the same
arm in the training process on a device (``augment.device``: the torch implementations; CUDA when
available, else the CPU).

A sample is what the training set serves: the cached ingest volume through the arm (at
``augment.probability`` 1, so every sample pays for it), percentile scaling, the flip and the area
resampling to the network's grid. The volumes and tissue label maps are the embedded cohort's
training split (``make demo`` first: ``artifacts/split/dataset.csv``, ``artifacts/ingest``,
``data/ground_truth/labels``). Each side is timed over ``--samples`` samples after two warm-ups, on
``--threads`` CPU threads (default 1: one loader worker's share), synchronised on CUDA. It prints
milliseconds per sample, the ratio, and what the full design's training samples
(``conf/design/full.yaml``) cost each way. Nothing is asserted; it prints figures.

Usage::

    python benchmarks/arms_on_device.py                      # every arm, 1 thread, 16 samples
    python benchmarks/arms_on_device.py --device cpu --arms labels physics --samples 8
"""

from __future__ import annotations

import argparse
import csv
import platform
import time
from pathlib import Path

import torch

from shiftguard.config.loader import compose, validate_all
from shiftguard.config.schema import ARMS, AugmentConfig, TrainConfig
from shiftguard.training.data import build_dataset, items_from_rows


def per_sample_ms(
    arm: str, device: str | None, rows: list[dict[str, str]], samples: int, root: Path
) -> float:
    """Milliseconds per training sample of ``arm`` with ``augment.device`` = ``device``."""
    sections = validate_all(compose([f"augment={arm}"]))
    train, augment = sections["train"], sections["augment"]
    assert isinstance(train, TrainConfig) and isinstance(augment, AugmentConfig)
    train = train.model_copy(update={"num_workers": 0})
    augment = augment.model_copy(update={"probability": 1.0, "device": device})
    labels = root / "data/ground_truth/labels" if arm in ("labels", "physics") else None
    items = items_from_rows(rows, root / "artifacts/ingest", "train", labels_dir=labels)
    items = items[: samples + 2]
    dataset = build_dataset(items, train, train=True, augment=augment if arm != "none" else None)
    sync = torch.cuda.synchronize if device and device.startswith("cuda") else (lambda: None)
    for i in range(2):
        dataset[i]["image"].sum().item()
    sync()
    began = time.perf_counter()
    for i in range(2, len(items)):
        dataset[i]["image"].sum().item()
    sync()
    return (time.perf_counter() - began) / max(len(items) - 2, 1) * 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--root", type=Path, default=Path.cwd())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    table = args.root / "artifacts/split/dataset.csv"
    if not table.is_file():
        raise SystemExit(f"{table}: missing; run `make demo` first (the embedded cohort's split)")
    with table.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))

    full = validate_all(compose(["+design=full"]))
    n_train = sum(1 for r in rows if r["split"] == "train")
    cells = 5 * 3  # training seeds x split seeds per arm (conf/design/full.yaml)
    per_arm = cells * int(full["train"].epochs) * n_train  # type: ignore[attr-defined]
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
    print(
        f"per training sample, loader (CPU, {args.threads} thread) against augment.device="
        f"{args.device} ({gpu or 'cpu'}); {args.samples} samples after 2 warm-ups"
    )
    print(
        f"{'arm':10s} {'loader ms':>10s} {'device ms':>10s} {'ratio':>7s} {'full design, core-h':>20s}"
    )
    for arm in args.arms:
        loader = per_sample_ms(arm, None, rows, args.samples, args.root)
        device = per_sample_ms(arm, args.device, rows, args.samples, args.root)
        hours = per_arm * loader / 1000.0 / 3600.0
        print(f"{arm:10s} {loader:10.1f} {device:10.1f} {loader / device:6.1f}x {hours:19.2f}")
    print(
        f"full design: {per_arm:,} training samples per arm ({cells} cells x "
        f"{full['train'].epochs} epochs x {n_train} series); core-hours at the loader's cost"  # type: ignore[attr-defined]
    )


if __name__ == "__main__":
    main()
