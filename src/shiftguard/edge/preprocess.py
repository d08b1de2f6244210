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
    interpolation between order statistics; a constant volume becomes all zeros. The percentiles
    are :func:`percentiles`, bit for bit ``np.percentile``'s.
    """
    values = np.asarray(volume, dtype=np.float32)
    lo, hi = percentiles(values, (lower, upper))
    if hi - lo == 0:
        return (values - lo).astype(np.float32)
    return ((values - lo) / (hi - lo)).astype(np.float32)


#: below this many values :func:`percentiles` leaves the work to ``np.percentile``
_SELECT_MIN = 8192
#: values sampled to find a cut-off near each tail
_SELECT_SAMPLE = 8192


def percentiles(values: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """``np.percentile(values, qs)`` (linear interpolation), bit for bit, for percentiles near the
    tails of a large float32 array, without partitioning all of it.

    ``np.percentile`` copies the array and partitions the copy (about 5 ms for a 80x96x80 volume).
    Here each tail's order statistics come from a cut-off drawn from an even sample of the values:
    the values beyond it (about twice the tail's share, plus 64 sampled places) are gathered and
    partitioned; a rank whose value equals the cut-off takes it directly, so long runs of ties (an
    empty background) cost nothing. The interpolation is then ``np.percentile``'s own arithmetic on
    the two order statistics. Whenever a cut-off falls short of its ranks, or the array is small, not
    float32, or holds a NaN or an infinity, the answer is ``np.percentile``'s.

    Args:
        values: any shape; its memory order does not matter.
        qs: percentiles in ``[0, 100]``.

    Returns:
        ``(len(qs),)`` float64, as ``np.percentile`` returns them.

    >>> x = np.random.default_rng(0).gamma(2.0, 300.0, 50_000).astype(np.float32)
    >>> bool(np.array_equal(percentiles(x, [1, 99]), np.percentile(x, [1, 99])))
    True
    """
    flat = np.asarray(values).ravel(order="K")
    n = flat.size
    if flat.dtype != np.float32 or n < _SELECT_MIN:
        return np.asarray(np.percentile(values, qs))
    if not (np.isfinite(flat.max()) and np.isfinite(flat.min())):
        return np.asarray(np.percentile(values, qs))
    # np.percentile's "linear" method: virtual index (n - 1) q and its two neighbours
    virtual = (n - 1) * np.true_divide(qs, 100)
    previous = np.floor(virtual)
    following = previous + 1
    past = virtual >= n - 1
    previous[past], following[past] = n - 1, n - 1
    before = virtual < 0
    previous[before], following[before] = 0, 0
    gamma = np.asarray(virtual - np.floor(virtual), dtype=virtual.dtype)
    prev_rank, next_rank = previous.astype(np.intp).tolist(), following.astype(np.intp).tolist()
    ranks = sorted(set(prev_rank) | set(next_rank))
    step = max(1, n // _SELECT_SAMPLE)
    found: dict[int, np.float32] = {}
    for low in (True, False):
        group = [r for r in ranks if (r < n // 2) == low]
        if group:
            got = _tail_order_statistics(flat, group, low, flat[::step])
            if got is None:
                return np.asarray(np.percentile(values, qs))
            found.update(got)
    a = np.array([found[r] for r in prev_rank], dtype=flat.dtype)
    b = np.array([found[r] for r in next_rank], dtype=flat.dtype)
    diff_b_a = b - a  # numpy's _lerp, exactly: from a below one half, from b above it
    lerp: np.ndarray = np.add(a, diff_b_a * gamma)
    np.subtract(
        b, diff_b_a * (1 - gamma), out=lerp, where=gamma >= 0.5, casting="unsafe", dtype=lerp.dtype
    )
    return lerp


def _tail_order_statistics(
    flat: np.ndarray, ranks: Sequence[int], low: bool, sample: np.ndarray
) -> dict[int, np.float32] | None:
    """The values at sorted positions ``ranks`` of ``flat`` (1D, finite), all in its lower
    (``low``) or upper half; ``None`` when the sample's cut-off does not reach them."""
    n, s = flat.size, sample.size
    reach = (max(ranks) + 1) if low else (n - min(ranks))  # how many values the tail must hold
    m = min(s - 1, int(reach * s * 2 / n) + 64)
    cut = np.partition(sample, m if low else s - 1 - m)[m if low else s - 1 - m]
    beyond = flat < cut if low else flat > cut
    n_beyond = int(np.count_nonzero(beyond))
    if n_beyond + int(np.count_nonzero(flat == cut)) < reach:
        return None
    # ranks of the values beyond the cut-off, counted from the array's start
    first = 0 if low else n - n_beyond
    inside = [r for r in ranks if first <= r < first + n_beyond]
    out: dict[int, np.float32] = {r: cut for r in ranks if r not in inside}
    if inside:
        part = np.partition(flat[beyond], [r - first for r in inside])
        out.update({r: part[r - first] for r in inside})
    return out


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
        volume: the series on the canonical grid (:func:`shiftguard.data.canonical.canonical_volume`).
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
