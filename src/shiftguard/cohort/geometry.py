"""A scanner's acquisition grid in DICOM patient coordinates (LPS) and its NIfTI (RAS) affine.

Voxel ``(k, r, c)`` is slice ``k``, row ``r``, column ``c``. Its centre lies at::

    P(k, r, c) = origin + c * col_spacing * row_dir + r * row_spacing * col_dir + k * slice_spacing * normal

with ``row_dir``/``col_dir`` the first/second triplet of ImageOrientationPatient (the direction along a
row, i.e. of increasing column index, and down a column), ``normal = row_dir x col_dir``, and
``origin`` the ImagePositionPatient of the first slice. PixelSpacing is ``(row_spacing, col_spacing)``.

Orientations, before the tilt (LPS, head-first supine, radiological display):

* axial: rows run to the patient's left, columns to posterior; slices inferior to superior.
* coronal: rows to the left, columns to inferior; slices anterior to posterior.
* sagittal: rows to posterior, columns to inferior; slices from the patient's left to right.

``tilt_deg`` rotates the plane about the left-right axis by a right-hand rotation about +x (LPS): a
positive tilt raises the posterior end of an axial plane and lowers its anterior end (an oblique,
AC-PC-like acquisition); the slice normal turns by ``tilt_deg`` from the superior axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from shiftguard.config.schema import ScannerProfile

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

_BASE_ORIENTATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
}


def tilt_matrix(tilt_deg: float) -> NDArray[np.float64]:
    """Rotation ``(3, 3)`` by ``tilt_deg`` about the LPS x (left-right) axis."""
    t = math.radians(tilt_deg)
    c, s = math.cos(t), math.sin(t)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


@dataclass(frozen=True)
class AcquisitionGeometry:
    """Where a series' voxels are, in DICOM patient coordinates (LPS, mm).

    Attributes:
        rows: pixels down a column (DICOM Rows).
        columns: pixels along a row (DICOM Columns).
        n_slices: number of slices.
        row_spacing: mm between rows (PixelSpacing[0]).
        col_spacing: mm between columns (PixelSpacing[1]).
        slice_spacing: mm between slice centres (SpacingBetweenSlices).
        slice_thickness: mm (SliceThickness).
        row_dir: ``(3,)`` unit vector along a row (ImageOrientationPatient[:3]).
        col_dir: ``(3,)`` unit vector down a column (ImageOrientationPatient[3:]).
        origin: ``(3,)`` ImagePositionPatient of slice 0.
    """

    rows: int
    columns: int
    n_slices: int
    row_spacing: float
    col_spacing: float
    slice_spacing: float
    slice_thickness: float
    row_dir: NDArray[np.float64]
    col_dir: NDArray[np.float64]
    origin: NDArray[np.float64]

    @classmethod
    def from_profile(
        cls, profile: ScannerProfile, centre_lps: NDArray[np.float64]
    ) -> AcquisitionGeometry:
        """The profile's grid (matrix, spacing, slices, orientation, tilt) centred on ``centre_lps``.

        Args:
            profile: the scanner profile.
            centre_lps: ``(3,)`` LPS mm of the centre of the field of view.
        """
        base_row, base_col = _BASE_ORIENTATION[profile.orientation]
        rot = tilt_matrix(profile.tilt_deg)
        row_dir = rot @ np.array(base_row)
        col_dir = rot @ np.array(base_col)
        normal = np.cross(row_dir, col_dir)
        rows, columns = profile.matrix
        row_spacing, col_spacing = profile.pixel_spacing
        origin = (
            np.asarray(centre_lps, dtype=np.float64)
            - (columns - 1) / 2.0 * col_spacing * row_dir
            - (rows - 1) / 2.0 * row_spacing * col_dir
            - (profile.n_slices - 1) / 2.0 * profile.slice_spacing * normal
        )
        return cls(
            rows=rows,
            columns=columns,
            n_slices=profile.n_slices,
            row_spacing=float(row_spacing),
            col_spacing=float(col_spacing),
            slice_spacing=float(profile.slice_spacing),
            slice_thickness=float(profile.slice_thickness),
            row_dir=row_dir,
            col_dir=col_dir,
            origin=origin,
        )

    def refined(self, factor: int) -> AcquisitionGeometry:
        """The same field of view sampled ``factor`` times finer in-plane, voxel ``[k, 0, 0]`` unmoved.

        Voxel ``[k, r * factor, c * factor]`` of the refined grid is voxel ``[k, r, c]`` of this one,
        which is what a discrete Fourier transform of the finer grid truncated to this matrix
        reconstructs (see :mod:`shiftguard.cohort.kspace`).
        """
        if factor == 1:
            return self
        return AcquisitionGeometry(
            rows=self.rows * factor,
            columns=self.columns * factor,
            n_slices=self.n_slices,
            row_spacing=self.row_spacing / factor,
            col_spacing=self.col_spacing / factor,
            slice_spacing=self.slice_spacing,
            slice_thickness=self.slice_thickness,
            row_dir=self.row_dir,
            col_dir=self.col_dir,
            origin=self.origin,
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(n_slices, rows, columns)``: the shape of the series' voxel array."""
        return (self.n_slices, self.rows, self.columns)

    @property
    def normal(self) -> NDArray[np.float64]:
        """``(3,)`` slice normal ``row_dir x col_dir``; slices are stacked along it."""
        return np.cross(self.row_dir, self.col_dir)

    @property
    def orientation(self) -> list[float]:
        """ImageOrientationPatient: ``row_dir`` then ``col_dir``."""
        return [*map(float, self.row_dir), *map(float, self.col_dir)]

    def position(self, k: int) -> NDArray[np.float64]:
        """ImagePositionPatient ``(3,)`` of slice ``k``."""
        return self.origin + k * self.slice_spacing * self.normal

    def slice_location(self, k: int) -> float:
        """SliceLocation of slice ``k``: its position projected on the normal (mm)."""
        return float(self.position(k) @ self.normal)

    def index_to_lps(self) -> NDArray[np.float64]:
        """``(4, 4)`` affine from ``(k, r, c, 1)`` voxel indices to LPS mm."""
        aff = np.eye(4)
        aff[:3, 0] = self.normal * self.slice_spacing
        aff[:3, 1] = self.col_dir * self.row_spacing
        aff[:3, 2] = self.row_dir * self.col_spacing
        aff[:3, 3] = self.origin
        return aff

    def nifti_affine(self) -> NDArray[np.float64]:
        """``(4, 4)`` RAS affine of the NIfTI array ``volume.transpose(2, 1, 0)``, shape ``(C, R, K)``.

        The NIfTI voxel ``(i, j, k)`` is column ``i``, row ``j``, slice ``k`` (like dcm2niix, before
        any reorientation).
        """
        aff = np.eye(4)
        aff[:3, 0] = self.row_dir * self.col_spacing
        aff[:3, 1] = self.col_dir * self.row_spacing
        aff[:3, 2] = self.normal * self.slice_spacing
        aff[:3, 3] = self.origin
        return LPS_TO_RAS @ aff
