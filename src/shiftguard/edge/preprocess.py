"""The model's input from a canonical volume, in numpy alone.

Training scales intensities with :func:`scale_percentiles` itself (MONAI's
``ScaleIntensityRangePercentiles`` definition, without its full sort) and resamples with MONAI's
``Resized`` with ``mode="area"`` (see :mod:`shiftguard.training.data`); the edge runner has no
torch, so :func:`area_resize` redoes that in numpy. A parity test holds the two within 1e-5 on the
same series.

The specification travels in the bundle's manifest (``preprocessing``), so a bundle carries the
exact recipe its model was trained with::

    {"intensity_percentiles": [1.0, 99.0], "input_shape": [40, 48, 40]}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def scale_percentiles(volume: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """Map the ``lower`` and ``upper`` percentiles of ``volume`` to 0 and 1, without clipping.

    As MONAI's ``ScaleIntensityRangePercentiles(lower, upper, 0, 1, clip=False)``: linear
    interpolation between order statistics; a constant volume becomes all zeros.
    """
    values = np.asarray(volume, dtype=np.float32)
    lo, hi = np.percentile(values, [lower, upper])
    if hi - lo == 0:
        return (values - lo).astype(np.float32)
    return ((values - lo) / (hi - lo)).astype(np.float32)


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` weights of adaptive average pooling along one axis (PyTorch's bins:
    output ``i`` averages inputs ``floor(i * n_in / n_out)`` to ``ceil((i + 1) * n_in / n_out)``)."""
    w = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)
        w[i, start:end] = 1.0 / (end - start)
    return w


def area_resize(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Resample a 3D ``volume`` to ``shape`` by area averaging, as ``F.interpolate(mode="area")``.

    >>> area_resize(np.arange(8, dtype=np.float32).reshape(2, 2, 2), (1, 1, 1)).item()
    3.5
    """
    if volume.ndim != 3 or len(shape) != 3:
        raise ValueError(
            f"area_resize needs a 3D volume and a 3D shape, got {volume.shape} -> {shape}"
        )
    out = np.asarray(volume, dtype=np.float64)
    for axis, n_out in enumerate(shape):
        n_in = out.shape[axis]
        if n_in == n_out:
            continue
        out = np.moveaxis(
            np.tensordot(_area_matrix(n_in, int(n_out)), out, axes=(1, axis)), 0, axis
        )
    return out.astype(np.float32)


def preprocess(volume: np.ndarray, spec: Mapping[str, Any]) -> np.ndarray:
    """The network input ``(1, 1, X, Y, Z)`` float32 for a canonical ``(X, Y, Z)`` volume.

    Args:
        volume: the series on the canonical grid (:func:`shiftguard.data.ingest.canonical_volume`).
        spec: the manifest's ``preprocessing`` section: ``intensity_percentiles`` and
            ``input_shape`` (``null``: keep the canonical grid).
    """
    lower, upper = spec["intensity_percentiles"]
    out = scale_percentiles(volume, float(lower), float(upper))
    if spec.get("input_shape"):
        out = area_resize(out, spec["input_shape"])
    return out[None, None]


def linear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` weights of linear interpolation between cell-centred grids, edges clamped
    (``scipy.ndimage.zoom(order=1, grid_mode=True, mode="nearest")`` along one axis)."""
    centres = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(centres).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = np.zeros((n_out, n_in), dtype=np.float32)
    np.add.at(w, (np.arange(n_out), lo), 1 - (centres - lo))
    np.add.at(w, (np.arange(n_out), hi), centres - lo)
    return w


def linear_resize(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Linear resampling of a coarse map onto ``shape``, one small matrix per axis.

    >>> linear_resize(np.array([[[0.0, 1.0]]], dtype=np.float32), (1, 1, 4)).round(2).tolist()
    [[[0.0, 0.25, 0.75, 1.0]]]
    """
    out = np.asarray(volume, dtype=np.float32)
    for axis, n_out in enumerate(shape):
        if out.shape[axis] != n_out:
            w = linear_matrix(out.shape[axis], int(n_out))
            out = np.moveaxis(np.tensordot(w, out, axes=(1, axis)), 0, axis)
    return np.ascontiguousarray(out, dtype=np.float32)
