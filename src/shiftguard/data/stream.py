"""A series resampled slice by slice while it arrives, with no full-resolution volume held.

The edge service receives a study instance by instance over seconds; waiting for the last one
before reading any pixels makes its latency grow with the study's size. A :class:`SeriesStream`
takes each slice as it is stored: it decodes the stored values, applies the slice's rescale,
keeps the slice's minimum (the value outside the field of view is the series' minimum) and, when
the series' axes are parallel to the canonical grid's (the usual axial, coronal and sagittal
acquisitions), reduces the slice to the grid's in-plane rows at once
(:func:`~shiftguard.data.volume.plan_in_plane`, planned from the first slice). Once the study is
complete, :meth:`SeriesStream.resample` validates the series exactly as ingest does and applies
the one remaining product across the slices (:func:`~shiftguard.data.volume.resample_streamed`):
the volume :func:`~shiftguard.data.canonical.canonical_volume` gives, to float32 rounding.

It holds each slice's reduced plane (the grid's in-plane size, float32) and nothing else of the
pixels: for a 512 x 512 x 1000 study and a 128 x 160 grid, 80 MB instead of 1 GB of float32
volume. A series it cannot stream (tilted, multi-frame, non-linear interpolation, a geometry that
moves the plan) is resampled the usual way; a slice it has not seen is read when the series is
finished, so a stream that missed slices costs only the time it did not save.

Thread-safe: :meth:`add` (a receiving thread) and :meth:`resample` (the worker) may overlap.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import numpy as np

from shiftguard.data.volume import (
    InPlanePlan,
    Resampled,
    canonical_affine,
    plan_in_plane,
    resample_streamed,
)
from shiftguard.dicom.pixels import read_stored
from shiftguard.dicom.series import SeriesGroup, ValidatedSeries, validate_series
from shiftguard.errors import InvalidSeriesError

if TYPE_CHECKING:
    from shiftguard.config.schema import IngestConfig
    from shiftguard.dicom.scan import SliceHeader

log = logging.getLogger(__name__)

__all__ = ["SeriesStream", "reduce_slice", "stream_plan"]

_Key = tuple[str, int]  # (path, frame)


def _key(h: SliceHeader) -> _Key:
    return (h.path, h.frame)


def stream_plan(rules: IngestConfig, h: SliceHeader) -> InPlanePlan | None:
    """The in-plane plan of ``h``'s series onto the canonical grid of ``rules``, made from this one
    slice's geometry; ``None`` when the series cannot stream (non-linear interpolation, several
    frames or samples, a slice that does not validate, axes not parallel to the grid's)."""
    if rules.interpolation_order != 1 or h.n_frames != 1 or h.samples_per_pixel != 1:
        return None
    try:
        one = validate_series(
            SeriesGroup(h.study_uid, h.series_uid, (h,)),
            modalities=rules.modalities,
            min_slices=1,
            spacing_tolerance=rules.spacing_tolerance,
            orientation_tolerance=rules.orientation_tolerance,
        )
    except InvalidSeriesError:
        return None  # the series will be refused, or resampled, the usual way
    geometry = one.geometry
    grid = canonical_affine(geometry.fov_centre_ras, rules.spacing, rules.shape)
    return plan_in_plane(
        h.rows, h.cols, geometry.affine_ras, grid, rules.shape, antialias=rules.antialias
    )


def reduce_slice(plan: InPlanePlan, h: SliceHeader) -> tuple[np.ndarray, float]:
    """Read, rescale and reduce one slice: its reduced plane and its minimum (after rescaling).
    Raises what :func:`~shiftguard.dicom.pixels.read_stored` raises."""
    values = read_stored([h])[0].astype(np.float32)
    # as assemble() rescales: float32 products per slice (x * 1 and x + 0 are exact)
    if h.rescale_slope != 1.0:
        values *= np.float32(h.rescale_slope)
    if h.rescale_intercept != 0.0:
        values += np.float32(h.rescale_intercept)
    return plan.reduce(values), float(values.min())


class SeriesStream:
    """The slices of one series seen so far, each reduced to the canonical grid's in-plane rows.

    Args:
        rules: The canonical grid and validation rules (a bundle's, or ingest's).
        first: The first slice header seen; the in-plane plan is made from its geometry.
    """

    def __init__(self, rules: IngestConfig, first: SliceHeader) -> None:
        self.rules = rules
        self.series_uid = first.series_uid
        self._lock = threading.Lock()
        self._planes: dict[_Key, np.ndarray] = {}
        self._minima: dict[_Key, float] = {}
        self.plan: InPlanePlan | None = stream_plan(rules, first)

    @property
    def streaming(self) -> bool:
        """Whether the slices are reduced as they come (else :meth:`resample` gives ``None``)."""
        return self.plan is not None

    def __len__(self) -> int:
        with self._lock:
            return len(self._planes)

    def add(self, h: SliceHeader) -> None:
        """Read, rescale and reduce one slice (a no-op when the series does not stream or the slice
        was seen). Raises what :func:`~shiftguard.dicom.pixels.read_stored` raises."""
        if self.plan is None or h.rows != self.plan.rows or h.cols != self.plan.cols:
            return
        with self._lock:
            if _key(h) not in self._planes:
                self._reduce(h)

    def put(
        self, h: SliceHeader, plane: np.ndarray, minimum: float, key: tuple[object, ...]
    ) -> bool:
        """A slice reduced elsewhere (another process) by a plan whose :attr:`InPlanePlan.key` is
        ``key``; kept only when that is this stream's plan (returns whether it was kept)."""
        if self.plan is None or key != self.plan.key or h.series_uid != self.series_uid:
            return False
        with self._lock:
            self._planes.setdefault(_key(h), plane)
            self._minima.setdefault(_key(h), minimum)
        return True

    def _reduce(self, h: SliceHeader) -> None:
        assert self.plan is not None
        self._planes[_key(h)], self._minima[_key(h)] = reduce_slice(self.plan, h)

    def resample(self, series: ValidatedSeries) -> Resampled | None:
        """The validated ``series`` on the canonical grid from the reduced slices (reading any
        slice not seen yet), or ``None`` when it cannot be streamed: resample it the usual way.

        Raises:
            PixelDecodeError: A slice not seen yet cannot be decoded.
        """
        plan = self.plan
        if plan is None or series.series_uid != self.series_uid:
            return None
        headers = series.headers
        if any((h.rows, h.cols, h.n_frames) != (plan.rows, plan.cols, 1) for h in headers):
            return None
        rules = self.rules
        geometry = series.geometry
        grid = canonical_affine(geometry.fov_centre_ras, rules.spacing, rules.shape)
        keys = [_key(h) for h in headers]
        with self._lock:
            missing = [h for h in headers if _key(h) not in self._planes]
            for h in missing:
                self._reduce(h)
            if missing:
                log.debug("series %s: %d of %d slices read at the end",
                          self.series_uid, len(missing), len(headers))  # fmt: skip
            cval = min(self._minima[k] for k in keys)
            planes = [self._planes[k] for k in keys]
        return resample_streamed(
            plan,
            planes,
            geometry.affine_ras,
            grid,
            rules.shape,
            antialias=rules.antialias,
            cval=cval,
        )
