"""Acquisition grids: orientation, tilt, and the NIfTI affine agreeing with the DICOM geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shiftguard.cohort.anatomy import partial_volume_offsets
from shiftguard.cohort.geometry import LPS_TO_RAS, AcquisitionGeometry
from shiftguard.config.schema import ScannerProfile


def profile(**kw: object) -> ScannerProfile:
    base: dict[str, object] = {
        "manufacturer": "ACME",
        "model": "One",
        "field_strength": 3.0,
        "matrix": (40, 30),
        "pixel_spacing": (2.0, 1.5),
        "slice_thickness": 3.0,
        "slice_spacing": 3.5,
        "n_slices": 9,
    }
    return ScannerProfile(**{**base, **kw})


@pytest.mark.parametrize(
    ("orientation", "normal"),
    [("axial", (0, 0, 1)), ("coronal", (0, 1, 0)), ("sagittal", (-1, 0, 0))],
)
def test_planes_have_the_documented_normals(orientation: str, normal: tuple[int, ...]) -> None:
    g = AcquisitionGeometry.from_profile(profile(orientation=orientation), np.zeros(3))
    np.testing.assert_allclose(g.normal, normal, atol=1e-12)
    assert abs(g.row_dir @ g.col_dir) < 1e-12


@pytest.mark.parametrize("tilt", [-20.0, 0.0, 12.0, 33.0])
def test_tilt_turns_the_axial_normal_about_left_right(tilt: float) -> None:
    g = AcquisitionGeometry.from_profile(profile(tilt_deg=tilt), np.zeros(3))
    angle = math.degrees(math.acos(float(g.normal @ np.array([0.0, 0.0, 1.0]))))
    assert angle == pytest.approx(abs(tilt), abs=1e-9)
    assert g.normal[0] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(g.row_dir, [1, 0, 0], atol=1e-12)


def test_grid_is_centred_and_the_nifti_affine_matches_the_voxels() -> None:
    centre = np.array([3.0, -20.0, 15.0])
    g = AcquisitionGeometry.from_profile(profile(tilt_deg=12.0), centre)
    k, r, c = 8, 39, 29
    far = g.index_to_lps() @ np.array([k, r, c, 1.0])
    mid = (g.index_to_lps() @ np.array([0, 0, 0, 1.0]) + far) / 2
    np.testing.assert_allclose(mid[:3], centre, atol=1e-9)
    # voxel (k, r, c) of the (K, R, C) array is voxel (c, r, k) of the (C, R, K) NIfTI array
    ras = g.nifti_affine() @ np.array([c, r, k, 1.0])
    np.testing.assert_allclose(ras, LPS_TO_RAS @ far, atol=1e-9)
    np.testing.assert_allclose(g.position(k), (g.index_to_lps() @ [k, 0, 0, 1.0])[:3], atol=1e-9)
    assert g.slice_location(1) - g.slice_location(0) == pytest.approx(3.5)


def test_partial_volume_sub_samples_span_the_slice_thickness() -> None:
    assert partial_volume_offsets(1.0) == [0.0]
    assert partial_volume_offsets(2.0) == [-0.5, 0.5]
    offs = partial_volume_offsets(4.0)
    assert len(offs) == 4 and offs[0] == -1.5 and offs[-1] == 1.5
