"""Scanner-simulating augmentation: drawn acquisition parameters, the TorchIO reference chain, the fused fast path.

- :mod:`~shiftguard.augment.params`: :class:`SimParams`, one simulated acquisition, and its order.
- :mod:`~shiftguard.augment.profiles`: scanner profiles (``conf/scanner_sim/``) scaled by a severity
  level 0..4, and :func:`draw` of a :class:`SimParams` from one.
- :mod:`~shiftguard.augment.transforms`: MONAI transforms :class:`ScannerSim`, :class:`ScannerSimd`
  and :class:`RandScannerSimd`.
- :mod:`~shiftguard.augment.reference` / :mod:`~shiftguard.augment.fast`: the two implementations.
- :mod:`~shiftguard.augment.randconv`: :class:`RandConvd`, random convolutions (contrast and
  texture randomisation for the intensity arm of the augmentation experiment).

The transforms (MONAI, TorchIO) are imported on first use, so ``import shiftguard.augment.params``
stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from shiftguard.augment.params import ORDER, SimParams
from shiftguard.augment.profiles import SEVERITY_MAX, draw, scaled_ranges
from shiftguard.errors import BackendUnavailableError, SimInputError

if TYPE_CHECKING:
    from shiftguard.augment.fast import FastScannerSim, apply_fast
    from shiftguard.augment.reference import apply_reference
    from shiftguard.augment.transforms import (
        RandScannerSimd,
        ScannerSim,
        ScannerSimd,
    )

_LAZY = {
    "FastScannerSim": "shiftguard.augment.fast",
    "apply_fast": "shiftguard.augment.fast",
    "apply_reference": "shiftguard.augment.reference",
    "RandScannerSimd": "shiftguard.augment.transforms",
    "ScannerSim": "shiftguard.augment.transforms",
    "ScannerSimd": "shiftguard.augment.transforms",
}

__all__ = [
    "ORDER",
    "SEVERITY_MAX",
    "BackendUnavailableError",
    "FastScannerSim",
    "RandScannerSimd",
    "ScannerSim",
    "ScannerSimd",
    "SimInputError",
    "SimParams",
    "apply_fast",
    "apply_reference",
    "draw",
    "scaled_ranges",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
