"""One subject's anatomy: the template's head, posed, scaled, warped and aged.

A subject is never rendered at 1 mm. Instead, for each voxel of the scanner's grid the renderer asks
where in the template it falls: scanner grid -> patient LPS -> RAS -> inverse head pose (rotation,
translation and scaling about the brain centre) -> subject displacement field (smooth random warp
plus the age-related widening of the lateral ventricles) -> template voxel. The subject's own
intensities are a linear mix of the template's channels (see :class:`~.template.Template`), so one
interpolation per sample gives tissue contrast and atrophy at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation

from shiftguard.cohort.template import Template
from shiftguard.config.schema import AnatomyConfig

#: age above which atrophy sets in, years
ATROPHY_ONSET_AGE = 30.0
#: how much near-CSF grey matter turns CSF-like per unit of atrophy
SULCAL_GAIN = 3.0
#: relative enlargement of the lateral ventricles per unit of atrophy, and its reach (mm)
VENTRICLE_GAIN = 1.6
VENTRICLE_SIGMA_MM = 16.0
#: spacing (voxels of the template) of the grid the displacement field is tabulated on
FIELD_STEP = 6


@dataclass(frozen=True)
class SubjectAnatomy:
    """Draws that make one subject's head.

    Attributes:
        scale: ``(3,)`` head size factors (RAS axes).
        rotation: ``(3, 3)`` head rotation (RAS), about the brain centre.
        translation: ``(3,)`` mm head offset (RAS) from the scanner's isocentre.
        gm_gain: relative change of grey-matter signal.
        wm_gain: relative change of white-matter signal.
        atrophy: age-related atrophy, 0 below 30 years.
        field: ``(3, Nx, Ny, Nz)`` float32 displacement (mm = template voxels) tabulated every
            :data:`FIELD_STEP` template voxels.
    """

    scale: NDArray[np.float64]
    rotation: NDArray[np.float64]
    translation: NDArray[np.float64]
    gm_gain: float
    wm_gain: float
    atrophy: float
    field: NDArray[np.float32]


def atrophy_for_age(age: float, cfg: AnatomyConfig) -> float:
    """``atrophy_per_decade`` times the decades above :data:`ATROPHY_ONSET_AGE`.

    >>> atrophy_for_age(70, AnatomyConfig(atrophy_per_decade=0.03))
    0.12
    """
    return round(cfg.atrophy_per_decade * max(0.0, (age - ATROPHY_ONSET_AGE) / 10.0), 12)


def _truncated_normal(rng: np.random.Generator, sd: float, size: int | None = None) -> NDArray:
    return np.clip(rng.normal(0.0, 1.0, size), -2.5, 2.5) * sd


def draw_anatomy(
    rng: np.random.Generator, cfg: AnatomyConfig, age: float, template: Template
) -> SubjectAnatomy:
    """Draw a subject's pose, size, warp and tissue contrast.

    Args:
        rng: the subject's anatomy stream.
        cfg: the anatomy config.
        age: the subject's age in years (drives atrophy).
        template: the loaded template (its shape and ventricles).

    Returns:
        The subject's anatomy.
    """
    scale = (
        1.0
        + _truncated_normal(rng, cfg.head_scale_sd)
        + _truncated_normal(rng, cfg.head_scale_sd / 3.0, 3)
    )
    angles = _truncated_normal(rng, cfg.rotation_sd_deg, 3)
    rotation = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    translation = _truncated_normal(rng, cfg.translation_sd_mm, 3)
    gm_gain = float(_truncated_normal(rng, cfg.intensity_sd))
    wm_gain = float(_truncated_normal(rng, cfg.intensity_sd))
    atrophy = atrophy_for_age(age, cfg)

    shape = np.array(template.shape)
    n = cfg.deformation_grid
    coarse = rng.normal(0.0, cfg.deformation_mm, (3, n, n, n)).astype(np.float64)
    fshape = tuple(int(s) for s in (shape - 1) // FIELD_STEP + 2)
    field = np.stack(
        [
            ndi.zoom(c, np.array(fshape) / n, order=3, mode="nearest", grid_mode=False)
            for c in coarse
        ]
    )
    # ventricles: pull template coordinates towards each centre, so the ventricles look larger
    grid = np.stack(
        np.meshgrid(*[np.arange(s, dtype=np.float64) * FIELD_STEP for s in fshape], indexing="ij")
    )
    gain = VENTRICLE_GAIN * atrophy
    if gain > 0:
        for centre in template.ventricle_centres:
            d = grid - centre[:, None, None, None]
            w = np.exp(-np.sum(d * d, axis=0) / (2 * VENTRICLE_SIGMA_MM**2))
            field -= min(gain, 0.6) * d * w
    return SubjectAnatomy(
        scale=np.asarray(scale, dtype=np.float64),
        rotation=rotation,
        translation=np.asarray(translation, dtype=np.float64),
        gm_gain=gm_gain,
        wm_gain=wm_gain,
        atrophy=atrophy,
        field=field.astype(np.float32),
    )


def subject_volume(anatomy: SubjectAnatomy, template: Template) -> NDArray[np.float32]:
    """The subject's intensities on the template grid, ``(X, Y, Z)`` float32 (white matter ~ 1)."""
    ch = template.channels
    vol = ch[0].copy()
    vol += np.float32(anatomy.gm_gain) * ch[1]
    vol += np.float32(anatomy.wm_gain) * ch[2]
    if anatomy.atrophy > 0:
        vol -= np.float32(min(SULCAL_GAIN * anatomy.atrophy, 0.9)) * ch[3]
    return vol


def grid_to_template(
    index_to_lps: NDArray[np.float64], anatomy: SubjectAnatomy, template: Template
) -> NDArray[np.float64]:
    """``(4, 4)`` affine from scanner voxel ``(k, r, c, 1)`` to template voxel, before the warp.

    Args:
        index_to_lps: the scanner grid's affine (see ``AcquisitionGeometry.index_to_lps``).
        anatomy: the subject (pose and size).
        template: the template (its origin and brain centre).
    """
    centre = template.brain_centre
    # patient RAS = R @ diag(scale) @ (subject - centre) + centre + t ; invert it
    inv_lin = np.diag(1.0 / anatomy.scale) @ anatomy.rotation.T
    pose_inv = np.eye(4)
    pose_inv[:3, :3] = inv_lin
    pose_inv[:3, 3] = centre - inv_lin @ (centre + anatomy.translation)
    to_voxel = np.eye(4)
    to_voxel[:3, 3] = -template.origin
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    return to_voxel @ pose_inv @ lps_to_ras @ index_to_lps


def template_coordinates(
    affine: NDArray[np.float64],
    shape: tuple[int, int, int],
    anatomy: SubjectAnatomy,
    warp_step: int = 1,
) -> NDArray[np.float32]:
    """Template voxel coordinates of every scanner voxel, warp included.

    Args:
        affine: ``(4, 4)`` from :func:`grid_to_template`.
        shape: ``(K, R, C)`` of the scanner grid.
        anatomy: the subject (its displacement field).
        warp_step: evaluate the smooth displacement field at every ``warp_step``-th row and column
            and repeat it in between (the field varies over centimetres; a finer grid than the
            reconstructed one needs no finer warp). ``R`` and ``C`` must be multiples of it.

    Returns:
        ``(3, K, R, C)`` float32 template voxel coordinates.
    """
    k = np.arange(shape[0], dtype=np.float32)[:, None, None]
    r = np.arange(shape[1], dtype=np.float32)[None, :, None]
    c = np.arange(shape[2], dtype=np.float32)[None, None, :]
    a = affine.astype(np.float32)
    coords = np.empty((3, *shape), dtype=np.float32)
    for i in range(3):
        coords[i] = a[i, 0] * k + (a[i, 1] * r + (a[i, 2] * c + a[i, 3]))
    step = max(1, warp_step)
    scaled = coords[:, :, ::step, ::step] / np.float32(FIELD_STEP)
    for i in range(3):
        shift = ndi.map_coordinates(
            anatomy.field[i], scaled, order=1, mode="nearest", output=np.float32
        )
        if step > 1:
            shift = np.repeat(np.repeat(shift, step, axis=1), step, axis=2)
        coords[i] += shift
    return coords


def slab_offset(affine: NDArray[np.float64], offset_mm: float, slice_spacing: float) -> NDArray:
    """``(3,)`` template-voxel step for moving ``offset_mm`` along the slice normal."""
    return np.asarray(affine[:3, 0] * (offset_mm / slice_spacing), dtype=np.float32)


def partial_volume_offsets(slice_thickness: float, step_mm: float = 1.0) -> list[float]:
    """Offsets (mm, along the normal) of the sub-samples averaged across a slice's thickness.

    >>> partial_volume_offsets(3.0)
    [-1.0, 0.0, 1.0]
    >>> partial_volume_offsets(1.0)
    [0.0]
    """
    n = max(1, min(16, math.ceil(slice_thickness / step_mm - 1e-9)))
    return [round(((j + 0.5) / n - 0.5) * slice_thickness, 9) for j in range(n)]
