"""Canonical resampling of series volumes, NIfTI output and simple image statistics.

Every series becomes a volume on the same kind of grid: RAS+ axes, ``cfg.spacing`` mm voxels,
``cfg.shape`` voxels, centred on the centre of the series' field of view. The mapping from output
voxels to input voxels is one composed affine (output voxel -> RAS mm -> input voxel), so oblique and
sheared (gantry-tilted) series are resampled in one interpolation, never twice.

Two equivalent implementations of that one interpolation:

* ``"affine_transform"``: :func:`scipy.ndimage.affine_transform` with the composed 3x3 matrix and
  offset, after a Gaussian anti-aliasing pre-filter (:func:`scipy.ndimage.gaussian_filter`). It works
  for every orientation and interpolation order.
* ``"separable"``: when the composed matrix is a scaled permutation (the series' axes are parallel to
  RAS axes, the common case) and the order is linear, the same linear interpolation and the same
  Gaussian are applied as three banded per-axis matrices (tiled BLAS products), 5-10x faster.
* ``"block"``: when the series is tilted about one axis only (one independent axis and a 2x2 block,
  e.g. an AC-PC tilted axial), trilinear weights factor into a linear weight along the independent
  axis times bilinear weights in the tilted plane: one banded product and one sparse product with
  4 weights per output point, 5-7x faster.

Tests check that all three agree to float32 precision. ``method="auto"`` picks the fastest that
applies (linear interpolation only; cubic and nearest always use ``affine_transform``).

Example:
    >>> import numpy as np
    >>> x = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    >>> out = resample_to_grid(x, np.eye(4), np.eye(4), (4, 5, 6))
    >>> bool(np.allclose(out.array, x))
    True
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)

__all__ = [
    "InPlanePlan",
    "Resampled",
    "canonical_affine",
    "plan_in_plane",
    "resample_streamed",
    "resample_to_grid",
    "volume_stats",
    "write_nifti",
]

Method = Literal["auto", "separable", "block", "affine_transform"]
_TRUNCATE = 4.0  # Gaussian kernel radius in sigmas (scipy's default)


@dataclass(frozen=True)
class Resampled:
    """A volume on the output grid.

    Attributes:
        array: ``(X, Y, Z)`` float32, Fortran-ordered (NIfTI's on-disk order).
        affine: ``(4, 4)`` output voxel -> RAS mm.
        inside: ``(X, Y, Z)`` bool, True where the output voxel lies inside the input's field of
            view (outside voxels hold ``cval``).
        method: The implementation used: ``"separable"``, ``"block"`` or ``"affine_transform"``.
    """

    array: np.ndarray
    affine: np.ndarray
    inside: np.ndarray
    method: str


def canonical_affine(
    centre_ras: np.ndarray, spacing: tuple[float, float, float], size: tuple[int, int, int]
) -> np.ndarray:
    """Affine of an RAS+ grid of ``size`` voxels of ``spacing`` mm whose centre is ``centre_ras``.

    Args:
        centre_ras: ``(3,)`` RAS position (mm) of the grid centre.
        spacing: Voxel size ``(X, Y, Z)`` in mm.
        size: Grid shape ``(X, Y, Z)``.

    Returns:
        ``(4, 4)`` voxel -> RAS mm; voxel ``(size - 1) / 2`` maps to ``centre_ras``.

    Example:
        >>> canonical_affine(np.zeros(3), (2.0, 2.0, 2.0), (3, 3, 3))[:3, 3].tolist()
        [-2.0, -2.0, -2.0]
    """
    sp = np.asarray(spacing, dtype=float)
    affine = np.diag(np.append(sp, 1.0))
    affine[:3, 3] = (
        np.asarray(centre_ras, dtype=float) - sp * (np.asarray(size, dtype=float) - 1) / 2
    )
    return affine


def _antialias_sigmas(matrix: np.ndarray) -> np.ndarray:
    """Gaussian sigma (input voxels) per input axis for an output->input voxel matrix ``(3, 3)``.

    An output voxel spans ``|matrix[a, :]|`` input voxels along input axis ``a``; where that exceeds
    one (the output is coarser), sigma = (factor - 1) / 2, scikit-image's anti-aliasing rule.
    """
    factors = np.linalg.norm(matrix, axis=1)
    return np.where(factors > 1.0 + 1e-6, (factors - 1.0) / 2.0, 0.0)


def _as_permutation(matrix: np.ndarray, shape_out: tuple[int, ...]) -> np.ndarray | None:
    """Input axis for each output axis when ``matrix`` is a scaled permutation, else ``None``.

    Entries so small that they move no sample by more than 1e-4 voxel across the grid count as 0.
    """
    big = np.abs(matrix) * max(shape_out) > 1e-4
    if not (big.sum(axis=0) == 1).all() or not (big.sum(axis=1) == 1).all():
        return None
    return np.argmax(big, axis=0)  # perm[o] = input axis fed by output axis o


def _gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    """``(n, n)`` matrix of scipy's ``gaussian_filter1d(mode="nearest")`` on a length-n signal."""
    radius = int(_TRUNCATE * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / sigma**2 * x.astype(float) ** 2)
    phi /= phi.sum()
    g = np.zeros((n, n))
    rows = np.arange(n)
    for w, dx in zip(phi, x, strict=True):
        np.add.at(g, (rows, np.clip(rows + dx, 0, n - 1)), w)
    return g


def _linear_matrix(
    n_out: int, n_in: int, scale: float, offset: float
) -> tuple[np.ndarray, int, int]:
    """Linear-interpolation weights for coordinates ``scale * i + offset`` on an ``n_in`` signal.

    Returns:
        ``(weights (hi - lo, n_in), lo, hi)``: rows for the output indices ``lo..hi-1`` whose
        coordinate lies in ``[0, n_in - 1]`` (scipy's ``mode="constant"``: no interpolation beyond
        the edge samples); other outputs take ``cval``.
    """
    coords = scale * np.arange(n_out, dtype=float) + offset
    inside = np.flatnonzero((coords >= 0) & (coords <= n_in - 1))
    if inside.size == 0:
        return np.zeros((0, n_in)), 0, 0
    lo, hi = int(inside[0]), int(inside[-1]) + 1
    c = coords[lo:hi]
    i0 = np.minimum(np.floor(c).astype(np.intp), n_in - 1)
    frac = c - i0
    w = np.zeros((hi - lo, n_in))
    r = np.arange(hi - lo)
    w[r, i0] = 1.0 - frac
    nxt = np.minimum(i0 + 1, n_in - 1)
    w[r, nxt] += np.where(i0 + 1 <= n_in - 1, frac, 0.0)
    return w, lo, hi


#: Output rows per tile of the banded per-axis products, by buffer axis (outer, middle, inner).
_TILE_ROWS = (8, 8, 16)


@dataclass(frozen=True)
class _AxisPlan:
    """The weights of one axis cut into row tiles, each with the input columns it touches.

    Interpolation weights are banded (each output sample reads a few neighbouring inputs), so a
    dense product wastes most of its work on zeros; tiles of a few output rows times the inputs they
    touch keep BLAS efficient and skip the zeros.
    """

    weights: np.ndarray  # (m, k) float32, columns = inputs first .. first + k - 1
    first: int
    tiles: tuple[tuple[int, int, int, int], ...]  # (row0, row1, col0, col1) within weights

    @property
    def rows(self) -> int:
        return int(self.weights.shape[0])

    @property
    def work(self) -> int:
        """Multiply-adds per unit of the other two axes."""
        return sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in self.tiles)


def _plan_axis(w: np.ndarray, first: int, tile: int) -> _AxisPlan:
    nonzero = w != 0
    tiles = []
    for r0 in range(0, w.shape[0], tile):
        r1 = min(w.shape[0], r0 + tile)
        cols = np.flatnonzero(nonzero[r0:r1].any(axis=0))
        if cols.size:
            tiles.append((r0, r1, int(cols[0]), int(cols[-1]) + 1))
        else:
            tiles.append((r0, r1, 0, 0))
    return _AxisPlan(w.astype(np.float32), first, tuple(tiles))


def _apply_axis(a: np.ndarray, plan: _AxisPlan, axis: int) -> np.ndarray:
    """Multiply C-contiguous 3D ``a`` along ``axis`` by the planned weights; C-contiguous result."""
    s0, s1, s2 = a.shape
    w, lo = plan.weights, plan.first
    if axis == 2:
        flat = a.reshape(s0 * s1, s2)
        out = np.empty((s0 * s1, plan.rows), dtype=np.float32)
        for r0, r1, c0, c1 in plan.tiles:
            if c1 > c0:
                out[:, r0:r1] = flat[:, lo + c0 : lo + c1] @ w[r0:r1, c0:c1].T
            else:
                out[:, r0:r1] = 0.0
        return out.reshape(s0, s1, plan.rows)
    if axis == 1:
        out = np.empty((s0, plan.rows, s2), dtype=np.float32)
        for r0, r1, c0, c1 in plan.tiles:
            if c1 > c0:
                out[:, r0:r1, :] = np.matmul(w[r0:r1, c0:c1], a[:, lo + c0 : lo + c1, :])
            else:
                out[:, r0:r1, :] = 0.0
        return out
    flat = a.reshape(s0, s1 * s2)
    out = np.empty((plan.rows, s1 * s2), dtype=np.float32)
    for r0, r1, c0, c1 in plan.tiles:
        if c1 > c0:
            out[r0:r1] = w[r0:r1, c0:c1] @ flat[lo + c0 : lo + c1]
        else:
            out[r0:r1] = 0.0
    return out.reshape(plan.rows, s1, s2)


def _contraction_order(sizes: list[int], plans: list[_AxisPlan]) -> tuple[int, ...]:
    """Order of the three per-axis products (buffer axes) with the fewest multiply-adds."""
    best: tuple[float, tuple[int, ...]] = (math.inf, (0, 1, 2))
    for order in itertools.permutations(range(3)):
        cur = list(sizes)
        cost = 0.0
        for ax in order:
            cost += math.prod(cur) / max(cur[ax], 1) * plans[ax].work
            cur[ax] = plans[ax].rows
        best = min(best, (cost, order))
    return best[1]


def _nothing_inside(out_shape: tuple[int, int, int], cval: float) -> tuple[np.ndarray, np.ndarray]:
    """The result when the output grid misses the input entirely: all ``cval``, nothing inside."""
    return (
        np.full(out_shape, cval, dtype=np.float32, order="F"),
        np.zeros(out_shape, dtype=bool, order="F"),
    )


def _axis_plan(
    n_out: int, n_in: int, scale: float, offset: float, sigma: float, buffer_axis: int
) -> tuple[_AxisPlan, slice] | None:
    """One output axis from one input axis: linear weights (after the Gaussian pre-filter when
    ``sigma > 0``), trimmed to the input samples they use, and the output rows inside the input;
    ``None`` when no output row falls inside."""
    w, lo, hi = _linear_matrix(n_out, n_in, scale, offset)
    if w.shape[0] == 0:
        return None
    if sigma > 0:
        w = w @ _gaussian_matrix(n_in, float(sigma))
    used = np.flatnonzero(np.any(w != 0, axis=0))
    first = int(used[0]) if used.size else 0
    last = int(used[-1]) + 1 if used.size else 1
    return _plan_axis(w[:, first:last], first, _TILE_ROWS[buffer_axis]), slice(lo, hi)


def _separable(
    x: np.ndarray,
    matrix: np.ndarray,
    offset: np.ndarray,
    perm: np.ndarray,
    out_shape: tuple[int, int, int],
    sigmas: np.ndarray,
    cval: float,
) -> tuple[np.ndarray, np.ndarray]:
    in_shape = x.shape
    plans: list[_AxisPlan | None] = [None, None, None]  # by buffer axis b = 2 - input axis
    box: list[slice] = [slice(0, 0)] * 3
    for o in range(3):
        a = int(perm[o])
        axis = _axis_plan(out_shape[o], in_shape[a], matrix[a, o], offset[a], sigmas[a], 2 - a)
        if axis is None:
            return _nothing_inside(out_shape, cval)
        plans[2 - a], box[o] = axis
    ready = [p for p in plans if p is not None]
    # Work on the C-ordered buffer (Z, Y, X) of the (X, Y, Z) input: buffer axis 2 - a is input a.
    buf = np.ascontiguousarray(x.transpose(2, 1, 0), dtype=np.float32)
    for b in _contraction_order(list(buf.shape), ready):
        buf = _apply_axis(buf, ready[b], b)
    return _place(buf, perm, box, out_shape, cval)


def _place(
    buf: np.ndarray,
    perm: np.ndarray,
    box: Sequence[slice],
    out_shape: tuple[int, int, int],
    cval: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The output grid and its inside mask from the separable products' buffer ``(Z, Y, X)``
    (input axes reversed, each cut to the output rows inside the input): ``buf`` fills ``box``,
    the rest holds ``cval``."""
    result = buf.transpose(2, 1, 0).transpose(perm)  # output axes, box lengths
    out = np.empty(out_shape, dtype=np.float32, order="F")
    inside = np.zeros(out_shape, dtype=bool, order="F")
    out[box[0], box[1], box[2]] = result
    inside[box[0], box[1], box[2]] = True
    # Fill only the outside (usually thin slabs, often nothing) with cval.
    for o in range(3):
        before = [slice(None)] * 3
        after = [slice(None)] * 3
        before[o] = slice(0, box[o].start)
        after[o] = slice(box[o].stop, out_shape[o])
        out[tuple(before)] = cval
        out[tuple(after)] = cval
    return out, inside


def _as_blocks(matrix: np.ndarray, shape_out: tuple[int, ...]) -> tuple[int, int] | None:
    """``(input axis, output axis)`` of a 1x1 block when ``matrix`` is, up to axis order, one
    independent axis plus a 2x2 block (an acquisition tilted about one axis), else ``None``."""
    big = np.abs(matrix) * max(shape_out) > 1e-4
    for a in range(3):
        for o in range(3):
            if big[a, o] and big[a].sum() == 1 and big[:, o].sum() == 1:
                rest_a = [i for i in range(3) if i != a]
                rest_o = [i for i in range(3) if i != o]
                block = matrix[np.ix_(rest_a, rest_o)]
                if abs(np.linalg.det(block)) > 1e-9:
                    return a, o
    return None


def _block_separable(
    x: np.ndarray,
    matrix: np.ndarray,
    offset: np.ndarray,
    axes: tuple[int, int],
    out_shape: tuple[int, int, int],
    sigmas: np.ndarray,
    cval: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation for a matrix made of one independent axis and a 2x2 block.

    Trilinear weights factor into a linear weight along the independent axis times bilinear
    weights in the plane of the other two, so the same interpolation is done as one banded product
    along the independent axis and one sparse product (4 weights per output point) in the plane.
    """
    from scipy import sparse

    a1, o1 = axes
    in_shape = x.shape
    b1 = 2 - a1
    axis = _axis_plan(out_shape[o1], in_shape[a1], matrix[a1, o1], offset[a1], sigmas[a1], b1)
    if axis is None:
        return _nothing_inside(out_shape, cval)
    plan1, rows1 = axis
    lo1, hi1 = rows1.start, rows1.stop
    buf = np.ascontiguousarray(x.transpose(2, 1, 0), dtype=np.float32)
    buf = _apply_axis(buf, plan1, b1)
    rest_b = [b for b in range(3) if b != b1]  # the plane's buffer axes, in buffer order
    for b in rest_b:
        if sigmas[2 - b] > 0:
            buf = ndimage.gaussian_filter1d(
                buf, float(sigmas[2 - b]), axis=b, mode="nearest", truncate=_TRUNCATE
            )
    # Bilinear weights of the plane: output (o2, o3) grid -> the plane's input axes.
    o2, o3 = (o for o in range(3) if o != o1)
    a_first, a_second = 2 - rest_b[0], 2 - rest_b[1]
    n_first, n_second = in_shape[a_first], in_shape[a_second]
    jj, kk = np.meshgrid(np.arange(out_shape[o2]), np.arange(out_shape[o3]), indexing="ij")
    j, k = jj.ravel().astype(float), kk.ravel().astype(float)
    c_first = matrix[a_first, o2] * j + matrix[a_first, o3] * k + offset[a_first]
    c_second = matrix[a_second, o2] * j + matrix[a_second, o3] * k + offset[a_second]
    inside2 = (c_first >= 0) & (c_first <= n_first - 1) & (c_second >= 0)
    inside2 &= c_second <= n_second - 1
    rows = np.flatnonzero(inside2)
    weights, cols = [], []
    i_first = np.minimum(np.floor(c_first[rows]).astype(np.intp), max(n_first - 2, 0))
    i_second = np.minimum(np.floor(c_second[rows]).astype(np.intp), max(n_second - 2, 0))
    f_first = c_first[rows] - i_first
    f_second = c_second[rows] - i_second
    for d_first, w_first in ((0, 1.0 - f_first), (1, f_first)):
        for d_second, w_second in ((0, 1.0 - f_second), (1, f_second)):
            idx_first = np.minimum(i_first + d_first, n_first - 1)
            idx_second = np.minimum(i_second + d_second, n_second - 1)
            cols.append(idx_first * n_second + idx_second)
            weights.append(w_first * w_second)
    operator = sparse.csr_matrix(
        (
            np.concatenate(weights).astype(np.float32),
            (np.tile(np.arange(rows.size), 4), np.concatenate(cols)),
        ),
        shape=(rows.size, n_first * n_second),
    )
    plane_last = np.moveaxis(buf, b1, 2).reshape(n_first * n_second, -1)  # (plane, m1)
    values = operator @ plane_last  # (inside plane points, m1)
    grid = np.full((out_shape[o2] * out_shape[o3], plan1.rows), cval, dtype=np.float32)
    grid[rows] = values
    grid3 = grid.reshape(out_shape[o2], out_shape[o3], plan1.rows)  # axes (o2, o3, o1)
    out = np.full(out_shape, cval, dtype=np.float32, order="F")
    target = [slice(None)] * 3
    target[o1] = slice(lo1, hi1)
    out[tuple(target)] = np.moveaxis(grid3, [0, 1, 2], [o2, o3, o1])
    inside = np.zeros(out_shape, dtype=bool, order="F")
    inside[tuple(target)] = np.moveaxis(
        np.broadcast_to(inside2.reshape(out_shape[o2], out_shape[o3], 1), grid3.shape),
        [0, 1, 2],
        [o2, o3, o1],
    )
    return out, inside


def _grid_terms(
    affine_in: np.ndarray,
    affine_out: np.ndarray,
    out_shape: tuple[int, int, int],
    antialias: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """``(matrix, offset, sigmas, perm)``: output voxel -> input voxel, the anti-aliasing sigmas
    per input axis, and the input axis of each output axis when the matrix is a permutation."""
    composed = np.linalg.inv(np.asarray(affine_in, dtype=float)) @ np.asarray(affine_out, float)
    matrix = composed[:3, :3]
    offset = composed[:3, 3]
    sigmas = _antialias_sigmas(matrix) if antialias else np.zeros(3)
    return matrix, offset, sigmas, _as_permutation(matrix, out_shape)


_Terms = tuple[int, int, float, float, float]

#: how far the in-plane terms of a streamed resampling may move between the slice they were planned
#: on and the whole series before the slices are reduced again (input voxels; relative for scales)
STREAM_TOLERANCE = 1e-6


@dataclass(frozen=True)
class InPlanePlan:
    """The in-plane half of a separable resampling, planned from one slice of a series.

    When a series' axes are parallel to the output grid's, the resampling is three banded products,
    one per input axis (:func:`resample_to_grid`, ``"separable"``). The two in-plane ones need only
    the slice's own geometry, so each slice can be reduced to the output's in-plane rows as it
    arrives (:meth:`reduce`); once every slice is there, :func:`resample_streamed` applies the
    product across the slices. No full-resolution volume is ever held.

    Attributes:
        rows: Rows of each slice (Y).
        cols: Columns of each slice (X).
        terms: Per in-plane input axis (X, then Y): ``(output axis, output size, scale, offset,
            sigma)``, the terms the axis' weights were built from.
        boxes: Per in-plane input axis: the output rows that fall inside the input.
    """

    rows: int
    cols: int
    terms: tuple[_Terms, ...]
    boxes: tuple[slice, slice]
    _x: _AxisPlan
    _y: _AxisPlan

    @property
    def key(self) -> tuple[object, ...]:
        """What decides the reduction (the slice's size, the axes' terms and boxes): two plans with
        the same key reduce a slice to the same plane."""
        return (self.rows, self.cols, self.terms, tuple((b.start, b.stop) for b in self.boxes))

    def reduce(self, pixels: np.ndarray) -> np.ndarray:
        """One slice ``(rows, cols)`` (Y, X) to the output's in-plane rows: ``(ry, rx)`` float32."""
        buf = np.ascontiguousarray(pixels, dtype=np.float32).reshape(1, self.rows, self.cols)
        buf = _apply_axis(buf, self._x, 2)
        return _apply_axis(buf, self._y, 1)[0]


def _in_plane_terms(
    rows: int,
    cols: int,
    affine_in: np.ndarray,
    affine_out: np.ndarray,
    out_shape: tuple[int, int, int],
    antialias: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[_Terms]] | None:
    """The grid terms, and the in-plane axes' :data:`InPlanePlan.terms`; ``None`` when the
    matrix is not a permutation."""
    matrix, offset, sigmas, perm = _grid_terms(affine_in, affine_out, out_shape, antialias)
    if perm is None:
        return None
    terms: list[_Terms] = []
    for a in (0, 1):
        o = int(np.flatnonzero(perm == a)[0])
        terms.append(
            (o, int(out_shape[o]), float(matrix[a, o]), float(offset[a]), float(sigmas[a]))
        )
    return matrix, offset, sigmas, perm, terms


def plan_in_plane(
    rows: int,
    cols: int,
    affine_in: np.ndarray,
    affine_out: np.ndarray,
    out_shape: tuple[int, int, int],
    *,
    antialias: bool = True,
) -> InPlanePlan | None:
    """The in-plane plan of a slice ``(rows, cols)`` whose voxel -> RAS affine is ``affine_in``
    (the slice's axis is its third column), onto the grid ``(affine_out, out_shape)``.

    Returns:
        The plan, or ``None`` when the slice's axes are not parallel to the grid's (no separable
        resampling) or no output row falls inside the slice: resample the whole volume instead.
    """
    found = _in_plane_terms(rows, cols, affine_in, affine_out, out_shape, antialias)
    if found is None:
        return None
    plans, boxes = [], []
    for a, (_axis, n_out, scale, offset, sigma) in enumerate(found[4]):
        axis = _axis_plan(n_out, (cols, rows)[a], scale, offset, sigma, 2 - a)
        if axis is None:
            return None
        plans.append(axis[0])
        boxes.append(axis[1])
    return InPlanePlan(rows, cols, tuple(found[4]), (boxes[0], boxes[1]), _x=plans[0], _y=plans[1])


def resample_streamed(
    plan: InPlanePlan,
    reduced: Sequence[np.ndarray],
    affine_in: np.ndarray,
    affine_out: np.ndarray,
    out_shape: tuple[int, int, int],
    *,
    antialias: bool = True,
    cval: float = 0.0,
) -> Resampled | None:
    """Finish a streamed resampling: the product across the slices of their reduced planes.

    Args:
        plan: The in-plane plan the slices were reduced with (:func:`plan_in_plane`).
        reduced: Every slice (Z of them, in the order of ``affine_in``'s third axis) reduced
            by ``plan.reduce``.
        affine_in: ``(4, 4)`` the whole series' voxel -> RAS mm.
        affine_out: ``(4, 4)`` output voxel -> RAS mm.
        out_shape: Output shape ``(X, Y, Z)``.
        antialias: As :func:`resample_to_grid`.
        cval: The value outside the input (:func:`resample_to_grid` takes the input's minimum).

    Returns:
        The volume :func:`resample_to_grid` gives for the assembled series (linear, separable),
        to float32 rounding, with method ``"streamed"``; ``None`` when the series' geometry moves
        the in-plane terms from the plan's (by more than :data:`STREAM_TOLERANCE`) or is not
        separable: resample the assembled volume instead.
    """
    found = _in_plane_terms(plan.rows, plan.cols, affine_in, affine_out, out_shape, antialias)
    if found is None:
        return None
    matrix, offset, sigmas, perm, terms = found
    for (o, n, scale, off, sigma), (o2, n2, scale2, off2, sigma2) in zip(
        terms, plan.terms, strict=True
    ):
        if (o, n) != (o2, n2) or abs(off - off2) > STREAM_TOLERANCE:
            return None
        if abs(scale - scale2) > STREAM_TOLERANCE * abs(scale2):
            return None
        if abs(sigma - sigma2) > STREAM_TOLERANCE * max(sigma2, 1.0):
            return None
    oz = int(np.flatnonzero(perm == 2)[0])
    axis = _axis_plan(out_shape[oz], len(reduced), matrix[2, oz], offset[2], sigmas[2], 0)
    if axis is None:
        out, inside = _nothing_inside(out_shape, cval)
        return Resampled(out, np.asarray(affine_out, float), inside, "streamed")
    z_plan, z_box = axis
    first, used = z_plan.first, z_plan.weights.shape[1]
    stack = np.stack(reduced[first : first + used])  # (used, ry, rx)
    buf = _apply_axis(stack, dataclasses.replace(z_plan, first=0), 0)
    box = [slice(0, 0)] * 3
    box[oz] = z_box
    for a, (o, *_rest) in enumerate(terms):
        box[o] = plan.boxes[a]
    out, inside = _place(buf, perm, box, out_shape, cval)
    return Resampled(out, np.asarray(affine_out, float), inside, "streamed")


def resample_to_grid(
    array: np.ndarray,
    affine_in: np.ndarray,
    affine_out: np.ndarray,
    out_shape: tuple[int, int, int],
    *,
    order: int = 1,
    antialias: bool = True,
    cval: float | None = None,
    method: Method = "auto",
) -> Resampled:
    """Resample ``array`` onto the grid ``(affine_out, out_shape)`` in one interpolation.

    Args:
        array: ``(X, Y, Z)`` input volume.
        affine_in: ``(4, 4)`` input voxel -> world mm.
        affine_out: ``(4, 4)`` output voxel -> world mm (same world frame).
        out_shape: Output shape ``(X, Y, Z)``.
        order: Spline order: 0 nearest, 1 linear, 3 cubic.
        antialias: Gaussian pre-filter along input axes where the output is coarser.
        cval: Value outside the input's field of view; ``None`` takes the input's minimum.
        method: ``"auto"``, ``"separable"`` (axis-aligned, linear only), ``"block"`` (tilted about
            one axis, linear only) or ``"affine_transform"`` (anything).

    Returns:
        The resampled volume ``(X, Y, Z)`` float32 and its field-of-view mask.

    Raises:
        ValueError: ``method="separable"`` was asked for where it does not apply.
    """
    if array.ndim != 3:
        raise ValueError(
            f"resample_to_grid: expected a 3D (X, Y, Z) array, got shape {array.shape}"
        )
    matrix, offset, sigmas, perm = _grid_terms(affine_in, affine_out, out_shape, antialias)
    if cval is None:
        cval = float(array.min()) if array.size else 0.0
    blocks = _as_blocks(matrix, out_shape) if perm is None else None
    if method == "auto" and order == 1:
        method = "separable" if perm is not None else "block" if blocks is not None else method
    if method in ("separable", "block") and order != 1:
        raise ValueError(
            f"resample_to_grid: method={method!r} needs linear interpolation (order=1); "
            "use method='affine_transform' or 'auto'"
        )
    if method == "separable":
        if perm is None:
            raise ValueError(
                "resample_to_grid: method='separable' needs input axes parallel to the output "
                "axes; use method='affine_transform' or 'auto'"
            )
        out, inside = _separable(array, matrix, offset, perm, out_shape, sigmas, cval)
        return Resampled(out, np.asarray(affine_out, float), inside, "separable")
    if method == "block":
        if blocks is None:
            raise ValueError(
                "resample_to_grid: method='block' needs a series tilted about one axis only; "
                "use method='affine_transform' or 'auto'"
            )
        out, inside = _block_separable(array, matrix, offset, blocks, out_shape, sigmas, cval)
        return Resampled(out, np.asarray(affine_out, float), inside, "block")

    src = np.asarray(array, dtype=np.float32)
    if np.any(sigmas > 0):
        src = ndimage.gaussian_filter(src, sigma=sigmas, mode="nearest", truncate=_TRUNCATE)
    out = np.empty(out_shape, dtype=np.float32, order="F")
    ndimage.affine_transform(
        src,
        matrix,
        offset=offset,
        output_shape=out_shape,
        output=out,
        order=order,
        mode="constant",
        cval=np.nan,  # marks the outside exactly; replaced by cval below
        prefilter=order > 1,
    )
    inside = ~np.isnan(out)
    out[~inside] = cval
    return Resampled(out, np.asarray(affine_out, float), inside, "affine_transform")


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Write an uncompressed NIfTI-1 file with both qform and sform set to ``affine`` (code 1).

    The header comes from nibabel; header and voxels are written with two ``write`` calls and no
    copy of a Fortran-ordered array (nibabel's own writer converts in small chunks, 2-3x slower).

    Args:
        path: Output file (``.nii``).
        array: ``(X, Y, Z)`` volume; its dtype is kept.
        affine: ``(4, 4)`` voxel -> RAS mm.
    """
    header = nib.Nifti1Header()
    header.set_data_shape(array.shape)
    header.set_data_dtype(array.dtype)
    header.set_xyzt_units("mm")
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header["vox_offset"] = 352  # 348-byte header + 4-byte extension flag (no extensions)
    data = np.asfortranarray(array)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.write(header.binaryblock)
        f.write(b"\x00\x00\x00\x00")
        f.write(data.T.data)  # the transpose of a Fortran array is C-contiguous


#: Statistics are computed on a regular subsample of at most about this many voxels.
STATS_SAMPLE = 1 << 15


def _percentile_sorted(values: np.ndarray, q: float) -> float:
    """``np.percentile(values, q)`` (linear method) of an already sorted 1D array."""
    pos = q / 100.0 * (values.size - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, values.size - 1)
    frac = pos - lo
    return float(values[lo]) * (1.0 - frac) + float(values[hi]) * frac


def volume_stats(array: np.ndarray, inside: np.ndarray | None = None) -> dict[str, float | None]:
    """Simple intensity statistics of a volume, over the voxels inside the field of view.

    They are computed on a regular, deterministic subsample: every k-th voxel in memory order with
    ``k = ceil(size / STATS_SAMPLE)`` (k = 1, exact, up to 32768 voxels). On a brain-sized grid
    this estimates percentiles and moments to about 1 % at a small fraction of the cost of exact
    order statistics over the whole grid; ``min``/``max`` are those of the subsample.

    Foreground is every voxel above ``p01 + 10 % (p99 - p01)`` (works for MR, where background is
    about 0, and CT, where it is about -1000); ``snr`` is the foreground mean over the background
    standard deviation, a crude estimate (``None`` when the background is empty or constant).

    Args:
        array: ``(X, Y, Z)`` volume.
        inside: ``(X, Y, Z)`` bool mask of voxels to use; ``None`` uses all.

    Returns:
        ``mean, std, min, max, p01, p50, p99, foreground_fraction, snr``.

    Example:
        >>> stats = volume_stats(np.arange(1000, dtype=np.float32).reshape(10, 10, 10))
        >>> stats["p50"], stats["max"]
        (499.5, 999.0)
    """
    keys = ("mean", "std", "min", "max", "p01", "p50", "p99", "foreground_fraction", "snr")
    order: Literal["C", "F"] = (
        "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"
    )
    flat = array.ravel(order=order)  # a view for contiguous arrays
    step = max(1, -(-flat.size // STATS_SAMPLE))
    sample = flat[::step]
    if inside is not None:
        sample = sample[inside.ravel(order=order)[::step]]
    if sample.size == 0:
        return dict.fromkeys(keys)
    values = np.sort(sample.astype(np.float32, copy=False))
    p01, p50, p99 = (_percentile_sorted(values, q) for q in (1.0, 50.0, 99.0))
    split = int(np.searchsorted(values, p01 + 0.1 * (p99 - p01), side="right"))
    fg, bg = values[split:], values[:split]
    fg_mean = float(fg.mean(dtype=np.float64)) if fg.size else None
    bg_std = float(bg.std(dtype=np.float64)) if bg.size > 1 else 0.0
    return {
        "mean": float(values.mean(dtype=np.float64)),
        "std": float(values.std(dtype=np.float64)),
        "min": float(values[0]),
        "max": float(values[-1]),
        "p01": p01,
        "p50": p50,
        "p99": p99,
        "foreground_fraction": fg.size / values.size,
        "snr": fg_mean / bg_std if (fg_mean is not None and bg_std > 0) else None,
    }


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Read a NIfTI volume as float32.

    Returns:
        The ``(X, Y, Z)`` array (scaling applied), its ``(4, 4)`` voxel -> RAS affine, and the voxel
        size in mm.
    """
    image = nib.Nifti1Image.from_filename(path)
    zooms = image.header.get_zooms()
    array = np.asarray(image.dataobj, dtype=np.float32)
    return array, np.asarray(image.affine), (float(zooms[0]), float(zooms[1]), float(zooms[2]))
