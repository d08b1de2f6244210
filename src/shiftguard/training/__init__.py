"""Training: MONAI datasets from the split table, and a seeded, resumable training loop."""

from __future__ import annotations

from shiftguard.training.data import (
    build_dataset,
    build_loader,
    items_from_rows,
    volume_geometry,
)
from shiftguard.training.loop import (
    EpochRecord,
    FitResult,
    TrainStep,
    build_loss,
    build_optimizer,
    fit,
    predict,
)

__all__ = [
    "EpochRecord",
    "FitResult",
    "TrainStep",
    "build_dataset",
    "build_loader",
    "build_loss",
    "build_optimizer",
    "fit",
    "items_from_rows",
    "predict",
    "volume_geometry",
]
