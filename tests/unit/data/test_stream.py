"""A series resampled slice by slice (the edge service's path while a study arrives) gives the
volume ingest's whole-series path gives, to float32 rounding, whatever the order and the number of
slices seen before the end; what it cannot stream falls back to the whole-series path."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from shiftguard.config.schema import IngestConfig
from shiftguard.data.canonical import canonical_volume
from shiftguard.data.stream import SeriesStream
from shiftguard.dicom.scan import scan_files
from shiftguard.dicom.series import group_series
from shiftguard.dicom.testing import SeriesSpec, write_series

RULES = IngestConfig(spacing=(3.0, 2.5, 2.0), shape=(14, 16, 18), min_slices=2)

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
FLIPPED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0)


def _series(tmp_path: Path, **spec: object) -> list:
    paths = write_series(tmp_path, SeriesSpec(**spec))  # type: ignore[arg-type]
    headers, issues = scan_files(paths)
    assert not issues
    return headers


def _compare(headers: list, order: np.ndarray, fed: int, rules: IngestConfig = RULES) -> str:
    """Feed ``fed`` slices in ``order``, finish, and hold the result to the whole-series path."""
    [group] = group_series(headers)
    _, whole, _ = canonical_volume(group, rules)
    stream = SeriesStream(rules, headers[int(order[0])])
    for k in order[:fed]:
        stream.add(headers[int(k)])
    assert len(stream) == (fed if stream.streaming else 0)
    _, got, _ = canonical_volume(group, rules, stream)
    np.testing.assert_array_equal(got.inside, whole.inside)
    np.testing.assert_array_equal(got.affine, whole.affine)
    span = float(whole.array.max() - whole.array.min())
    assert np.abs(got.array - whole.array).max() <= 1e-5 * span
    return got.method


@pytest.mark.parametrize(
    ("iop", "rows", "cols", "n", "slope", "intercept"),
    [
        (AXIAL, 40, 36, 24, 1.0, 0.0),
        (CORONAL, 30, 44, 20, 2.5, -100.0),
        (SAGITTAL, 44, 30, 18, 1.0, 0.0),
        (FLIPPED, 36, 36, 22, [0.5 + 0.1 * k for k in range(22)], [float(k) for k in range(22)]),
    ],
)
def test_streamed_matches_the_whole_series_in_any_order(
    tmp_path: Path,
    iop: tuple[float, ...],
    rows: int,
    cols: int,
    n: int,
    slope: object,
    intercept: object,
) -> None:
    headers = _series(
        tmp_path, iop=iop, rows=rows, cols=cols, n_slices=n, pixel_spacing=(0.9, 1.1),
        slice_spacing=1.5, rescale_slope=slope, rescale_intercept=intercept,
    )  # fmt: skip
    rng = np.random.default_rng(n)
    assert _compare(headers, rng.permutation(n), n) == "streamed"
    # the last slices (or all but one) read when the series is finished: the same volume
    assert _compare(headers, rng.permutation(n), n // 2) == "streamed"
    assert _compare(headers, rng.permutation(n), 0) == "streamed"


def test_a_tilted_series_is_resampled_whole(tmp_path: Path) -> None:
    c, s = np.cos(np.radians(12)), np.sin(np.radians(12))
    headers = _series(tmp_path, iop=(1.0, 0.0, 0.0, 0.0, c, s), rows=30, cols=30, n_slices=16)
    assert _compare(headers, np.arange(16), 16) == "block"


def test_cubic_interpolation_is_resampled_whole(tmp_path: Path) -> None:
    headers = _series(tmp_path, rows=24, cols=24, n_slices=12)
    cubic = RULES.model_copy(update={"interpolation_order": 3})
    assert _compare(headers, np.arange(12), 12, cubic) == "affine_transform"


def test_a_plan_the_whole_series_does_not_bear_out_falls_back(tmp_path: Path) -> None:
    """The plan comes from the first slice seen; when the validated series' geometry gives other
    in-plane terms (here that slice's pixel spacing was 0.01 % off), the reduced slices are
    dropped and the series is resampled whole."""
    headers = _series(tmp_path, rows=24, cols=24, n_slices=12, pixel_spacing=(0.9, 1.1))
    odd = headers[5]._replace(pixel_spacing=(0.9, 1.1001))
    [group] = group_series(headers)
    stream = SeriesStream(RULES, odd)
    for h in headers:
        stream.add(h)
    assert len(stream) == 12
    _, got, _ = canonical_volume(group, RULES, stream)
    _, whole, _ = canonical_volume(group, RULES)
    assert got.method == "separable"
    np.testing.assert_array_equal(got.array, whole.array)


def test_slices_added_while_the_series_is_finished(tmp_path: Path) -> None:
    """The receiving thread may still be adding when the worker finishes: no slice is lost or
    reduced twice, and the result is the same."""
    headers = _series(tmp_path, rows=48, cols=48, n_slices=40)
    [group] = group_series(headers)
    _, whole, _ = canonical_volume(group, RULES)
    stream = SeriesStream(RULES, headers[0])
    feeder = threading.Thread(target=lambda: [stream.add(h) for h in headers[::-1]])
    feeder.start()
    _, got, _ = canonical_volume(group, RULES, stream)
    feeder.join()
    assert len(stream) == 40 and got.method == "streamed"
    span = float(whole.array.max() - whole.array.min())
    assert np.abs(got.array - whole.array).max() <= 1e-5 * span


def test_a_stream_for_another_series_or_grid_is_not_used(tmp_path: Path) -> None:
    a = _series(tmp_path / "a", rows=20, cols=20, n_slices=8)
    b = _series(tmp_path / "b", rows=20, cols=20, n_slices=8)
    stream = SeriesStream(RULES, a[0])
    for h in a:
        stream.add(h)
    [group_b] = group_series(b)
    _, got, _ = canonical_volume(group_b, RULES, stream)
    assert got.method == "separable"
    assert stream.plan is not None and SeriesStream(RULES, a[0]).plan is not None
    assert len(stream) == 8
