"""Canonical resampling: identity, RAS orientation, oblique geometry, anti-aliasing, NIfTI output."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from shiftguard.data.volume import canonical_affine, resample_to_grid, volume_stats, write_nifti
from shiftguard.dicom.scan import iter_files, scan_files
from shiftguard.dicom.series import SeriesVolume, group_series, load_series
from shiftguard.dicom.testing import SeriesSpec, phantom, slice_positions, write_series


def _affine(columns: list[list[float]], origin: list[float]) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = np.array(columns, dtype=float).T
    a[:3, 3] = origin
    return a


def _load(folder: Path) -> SeriesVolume:
    headers, issues = scan_files(iter_files(folder))
    assert issues == []
    (group,) = group_series(headers)
    volume, _ = load_series(group)
    return volume


def _centroid_ras(array: np.ndarray, affine: np.ndarray, threshold: float) -> np.ndarray:
    idx = np.argwhere(array > threshold).astype(float)
    weights = array[array > threshold].astype(float)
    centre = (idx * weights[:, None]).sum(axis=0) / weights.sum()
    return (affine @ np.append(centre, 1.0))[:3]


@pytest.mark.parametrize("method", ["auto", "separable", "affine_transform"])
def test_identity_when_the_input_is_already_on_the_grid(method: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 12, 9)).astype(np.float32)
    affine = canonical_affine(np.array([3.0, -4.0, 5.0]), (2.0, 2.0, 2.0), (10, 12, 9))
    out = resample_to_grid(x, affine, affine, (10, 12, 9), method=method)  # type: ignore[arg-type]
    np.testing.assert_allclose(out.array, x, atol=1e-6)
    assert out.inside.all()
    assert out.array.flags.f_contiguous


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize(
    ("columns", "out_shape"),
    [
        ([[-1.3, 0, 0], [0, 0.9, 0], [0, 0, 2.5]], (22, 30, 28)),  # flip x, finer in y
        ([[0, -1.1, 0], [0, 0, 1.4], [-2.5, 0, 0]], (30, 25, 28)),  # sagittal-like permutation
        ([[0, 0, 3.0], [0.7, 0, 0], [0, -0.8, 0]], (16, 20, 40)),
    ],
)
def test_separable_and_affine_transform_agree(
    columns: list[list[float]], out_shape: tuple[int, int, int], antialias: bool
) -> None:
    rng = np.random.default_rng(1)
    x = (rng.random((37, 41, 23)) * 100).astype(np.float32)
    a_in = _affine(columns, [10.0, 20.0, -5.0])
    centre = (a_in @ np.append((np.array(x.shape) - 1) / 2, 1.0))[:3]
    a_out = canonical_affine(centre, (2.0, 2.0, 2.0), out_shape)
    fast = resample_to_grid(x, a_in, a_out, out_shape, antialias=antialias, method="separable")
    ref = resample_to_grid(
        x, a_in, a_out, out_shape, antialias=antialias, method="affine_transform"
    )
    assert (fast.method, ref.method) == ("separable", "affine_transform")
    np.testing.assert_array_equal(fast.inside, ref.inside)
    np.testing.assert_allclose(fast.array, ref.array, atol=1e-3, rtol=1e-5)
    assert 0 < fast.inside.sum() < fast.inside.size


def _rotation(axis: int, deg: float) -> np.ndarray:
    t = np.radians(deg)
    r = np.eye(3)
    i, j = (k for k in range(3) if k != axis)
    r[i, i], r[i, j], r[j, i], r[j, j] = np.cos(t), -np.sin(t), np.sin(t), np.cos(t)
    return r


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize(
    ("perm", "flip"), [((0, 1, 2), (1, 1, 1)), ((2, 0, 1), (-1, 1, -1)), ((1, 2, 0), (1, -1, 1))]
)
def test_block_path_agrees_with_affine_transform_for_single_axis_tilts(
    axis: int, perm: tuple[int, int, int], flip: tuple[int, int, int], antialias: bool
) -> None:
    rng = np.random.default_rng(4)
    x = (rng.random((37, 41, 23)) * 100).astype(np.float32)
    a_in = np.eye(4)
    a_in[:3, :3] = _rotation(axis, 17.0)[:, list(perm)] * np.array(flip) * [1.3, 0.9, 2.5]
    a_in[:3, 3] = [4.0, -3.0, 2.0]
    centre = (a_in @ np.append((np.array(x.shape) - 1) / 2, 1.0))[:3]
    a_out = canonical_affine(centre, (2.0, 2.0, 2.0), (22, 26, 24))
    fast = resample_to_grid(x, a_in, a_out, (22, 26, 24), antialias=antialias)
    ref = resample_to_grid(
        x, a_in, a_out, (22, 26, 24), antialias=antialias, method="affine_transform"
    )
    assert fast.method == "block"
    np.testing.assert_array_equal(fast.inside, ref.inside)
    np.testing.assert_allclose(fast.array, ref.array, atol=1e-3, rtol=1e-5)


def test_auto_picks_the_implementation() -> None:
    x = np.zeros((8, 8, 8), np.float32)
    grid = canonical_affine(np.zeros(3), (1.0, 1.0, 1.0), (8, 8, 8))
    tilted = np.eye(4)
    tilted[:3, :3] = _rotation(0, 20.0)
    double = np.eye(4)
    double[:3, :3] = _rotation(0, 20.0) @ _rotation(2, 15.0)
    assert resample_to_grid(x, grid, grid, (8, 8, 8)).method == "separable"
    assert resample_to_grid(x, tilted, grid, (8, 8, 8)).method == "block"
    assert resample_to_grid(x, double, grid, (8, 8, 8)).method == "affine_transform"
    assert resample_to_grid(x, grid, grid, (8, 8, 8), order=3).method == "affine_transform"
    assert resample_to_grid(x, tilted, grid, (8, 8, 8), order=0).method == "affine_transform"
    with pytest.raises(ValueError, match="separable"):
        resample_to_grid(x, tilted, grid, (8, 8, 8), method="separable")
    with pytest.raises(ValueError, match="block"):
        resample_to_grid(x, double, grid, (8, 8, 8), method="block")


def test_outside_the_field_of_view_takes_the_minimum() -> None:
    x = np.full((4, 4, 4), 7.0, np.float32)
    x[0, 0, 0] = 3.0
    grid = canonical_affine(np.full(3, 1.5), (1.0, 1.0, 1.0), (8, 8, 8))
    out = resample_to_grid(x, np.eye(4), grid, (8, 8, 8), antialias=False)
    assert out.array[~out.inside].min() == out.array[~out.inside].max() == 3.0
    assert out.inside.sum() == 4 * 4 * 4


def _marker_series(folder: Path, spec: SeriesSpec, at: tuple[int, int, int]) -> np.ndarray:
    """Write a series with a bright 3x3x3 block centred on (slice, row, col); return its LPS."""
    stored = np.full((spec.n_slices, spec.rows, spec.cols), 100, np.uint16)
    k, r, c = at
    stored[k - 1 : k + 2, r - 1 : r + 2, c - 1 : c + 2] = 3000
    write_series(folder, spec, stored=stored)
    rot = np.asarray(spec.iop, dtype=float).reshape(2, 3)
    return np.asarray(
        slice_positions(spec)[k]
        + c * spec.pixel_spacing[1] * rot[0]
        + r * spec.pixel_spacing[0] * rot[1]
    )


def test_output_is_ras_plus_and_a_marker_lands_where_dicom_puts_it(tmp_path: Path) -> None:
    # Standard axial DICOM: columns run to the patient's left, rows to posterior.
    spec = SeriesSpec(rows=30, cols=28, n_slices=20, pixel_spacing=(1.0, 1.0), slice_spacing=1.0)
    lps = _marker_series(tmp_path, spec, at=(6, 7, 4))  # right, anterior, inferior corner
    volume = _load(tmp_path)
    grid = canonical_affine(volume.geometry.fov_centre_ras, (1.0, 1.0, 1.0), (32, 32, 24))
    out = resample_to_grid(volume.array, volume.affine, grid, (32, 32, 24))
    assert nib.aff2axcodes(out.affine) == ("R", "A", "S")
    expected_ras = lps * np.array([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(_centroid_ras(out.array, out.affine, 1000), expected_ras, atol=0.3)
    # Right of the patient is +x in RAS: the marker sits at high i, since it was on the right.
    i, j, k = np.unravel_index(np.argmax(out.array), out.array.shape)
    assert i > 16 and j > 16 and k < 12


def test_oblique_series_marker_lands_at_its_patient_position(tmp_path: Path) -> None:
    t, u = np.radians(25), np.radians(10)
    rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]]) @ np.array(
        [[np.cos(u), -np.sin(u), 0], [np.sin(u), np.cos(u), 0], [0, 0, 1]]
    )
    iop = tuple(float(v) for v in np.concatenate([rot[:, 0], rot[:, 1]]))
    spec = SeriesSpec(
        rows=32,
        cols=30,
        n_slices=18,
        pixel_spacing=(1.2, 1.1),
        slice_spacing=1.5,
        iop=iop,  # type: ignore[arg-type]
    )
    lps = _marker_series(tmp_path, spec, at=(12, 9, 20))
    volume = _load(tmp_path)
    assert volume.geometry.orientation == "axial oblique"
    grid = canonical_affine(volume.geometry.fov_centre_ras, (1.0, 1.0, 1.0), (48, 48, 40))
    out = resample_to_grid(volume.array, volume.affine, grid, (48, 48, 40), antialias=False)
    assert out.method == "affine_transform"  # tilted about two axes
    centroid = _centroid_ras(out.array, out.affine, 1000)
    np.testing.assert_allclose(centroid, lps * np.array([-1.0, -1.0, 1.0]), atol=0.5)


def test_antialiasing_smooths_when_the_output_is_coarser() -> None:
    x = np.indices((64, 64, 8)).sum(axis=0) % 2 * 100.0  # finest checkerboard
    x = x.astype(np.float32)
    a_in = canonical_affine(np.zeros(3), (0.5, 0.5, 0.5), x.shape)  # type: ignore[arg-type]
    a_out = canonical_affine(np.zeros(3), (1.6, 1.6, 0.5), (16, 16, 8))
    plain = resample_to_grid(x, a_in, a_out, (16, 16, 8), antialias=False)
    smooth = resample_to_grid(x, a_in, a_out, (16, 16, 8), antialias=True)
    assert smooth.array.std() < 0.5 * plain.array.std()
    assert smooth.array.mean() == pytest.approx(50.0, abs=5)


def test_no_antialiasing_when_the_output_is_finer() -> None:
    rng = np.random.default_rng(2)
    x = rng.random((10, 10, 10)).astype(np.float32)
    a_in = canonical_affine(np.zeros(3), (2.0, 2.0, 2.0), (10, 10, 10))
    a_out = canonical_affine(np.zeros(3), (1.0, 1.0, 1.0), (19, 19, 19))
    on = resample_to_grid(x, a_in, a_out, (19, 19, 19), antialias=True)
    off = resample_to_grid(x, a_in, a_out, (19, 19, 19), antialias=False)
    np.testing.assert_array_equal(on.array, off.array)


@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_write_nifti_round_trip(tmp_path: Path, dtype: type) -> None:
    data = np.asfortranarray(np.arange(4 * 5 * 6, dtype=dtype).reshape(4, 5, 6))
    affine = canonical_affine(np.array([1.0, 2.0, 3.0]), (2.0, 2.5, 3.0), (4, 5, 6))
    path = tmp_path / "v.nii"
    write_nifti(path, data, affine)
    img = nib.load(path)
    assert img.header.get_data_dtype() == np.dtype(dtype)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), data)
    np.testing.assert_allclose(img.affine, affine)
    assert int(img.header["qform_code"]) == int(img.header["sform_code"]) == 1
    assert img.header.get_xyzt_units()[0] == "mm"
    assert path.stat().st_size == 352 + data.nbytes


def test_volume_stats_small_volume_is_exact() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(50, 10, size=(10, 12, 14)).astype(np.float32)
    x[:3] = rng.normal(0, 1, size=(3, 12, 14))  # background
    stats = volume_stats(x)
    assert stats["mean"] == pytest.approx(float(x.mean()), rel=1e-6)
    assert stats["std"] == pytest.approx(float(x.std()), rel=1e-5)
    assert (stats["min"], stats["max"]) == (float(x.min()), float(x.max()))
    for key, q in (("p01", 1), ("p50", 50), ("p99", 99)):
        assert stats[key] == pytest.approx(float(np.percentile(x, q)), rel=1e-5)
    assert stats["foreground_fraction"] == pytest.approx(0.7, abs=0.01)
    assert stats["snr"] == pytest.approx(float(x[3:].mean() / x[:3].std()), rel=0.05)


def test_snr_is_none_for_a_constant_background() -> None:
    x = np.zeros((10, 10, 10), np.float32)
    x[5:] = 100.0
    assert volume_stats(x)["snr"] is None


def test_volume_stats_use_only_voxels_inside() -> None:
    x = np.zeros((6, 6, 6), np.float32)
    inside = np.zeros_like(x, dtype=bool)
    inside[1:5, 1:5, 1:5] = True
    x[inside] = 10.0
    stats = volume_stats(x, inside)
    assert stats["min"] == stats["max"] == stats["mean"] == 10.0
    assert volume_stats(x, np.zeros_like(inside))["mean"] is None


def test_canonical_affine_is_centred() -> None:
    affine = canonical_affine(np.array([10.0, -20.0, 30.0]), (2.0, 3.0, 4.0), (11, 21, 31))
    centre = affine @ np.array([5.0, 10.0, 15.0, 1.0])
    np.testing.assert_allclose(centre[:3], [10.0, -20.0, 30.0])
    np.testing.assert_allclose(np.diag(affine)[:3], [2.0, 3.0, 4.0])


def test_phantom_is_asymmetric() -> None:
    p = phantom(SeriesSpec())
    assert not np.array_equal(p, p[::-1]) and not np.array_equal(p, p[:, ::-1])
    assert not np.array_equal(p, p[:, :, ::-1])
