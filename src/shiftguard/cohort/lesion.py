"""The finding: one focal, ellipsoid-ish lesion with a soft edge, inside grey/white matter.

The lesion is defined in template space (so it follows the subject's warp like the tissue around it)
at a site where grey + white matter probability is high over the whole lesion: its centre is drawn
among template voxels whose depth inside the tissue exceeds the lesion's largest semi-axis plus its
soft edge. Its effect is multiplicative: ``signal * (1 + sign * contrast * m)``, with ``m`` the soft
membership in ``[0, 1]``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.spatial.transform import Rotation

from shiftguard.cohort.template import Template
from shiftguard.config.schema import LesionConfig

log = logging.getLogger(__name__)

#: semi-axes are ``radius * ratio`` with ratios drawn in this range and renormalised so their
#: geometric mean is 1 (the volume is that of a sphere of ``radius``)
AXIS_RATIO_RANGE = (0.75, 1.3)


@dataclass(frozen=True)
class Lesion:
    """One lesion, in template voxel coordinates (1 mm).

    Attributes:
        centre: ``(3,)`` template voxel coordinates of the centre.
        radius_mm: nominal radius (that of the sphere of equal volume).
        semi_axes: ``(3,)`` mm.
        rotation: ``(3, 3)``, columns are the axes' directions.
        contrast: relative intensity change at the core.
        sign: ``+1`` hyperintense, ``-1`` hypointense.
        edge_mm: width of the soft edge.
    """

    centre: NDArray[np.float64]
    radius_mm: float
    semi_axes: NDArray[np.float64]
    rotation: NDArray[np.float64]
    contrast: float
    sign: int
    edge_mm: float


def draw_lesion(rng: np.random.Generator, cfg: LesionConfig, template: Template) -> Lesion:
    """Draw a lesion's size, shape, contrast and a site deep enough in tissue to hold it.

    Args:
        rng: the subject's lesion stream.
        cfg: the lesion config.
        template: the loaded template (its lesion sites).

    Returns:
        The lesion.
    """
    radius = float(rng.uniform(*cfg.radius_mm))
    contrast = float(rng.uniform(*cfg.contrast))
    sign = 1 if rng.random() < cfg.hyperintense_fraction else -1
    ratios = rng.uniform(*AXIS_RATIO_RANGE, 3)
    ratios /= np.prod(ratios) ** (1.0 / 3.0)
    semi_axes = radius * ratios
    rotation = Rotation.from_quat(rng.normal(size=4)).as_matrix()
    needed = float(semi_axes.max()) + 0.5 * cfg.edge_softness_mm
    n_ok = int(np.searchsorted(-template.lesion_depth, -needed, side="right"))
    if n_ok == 0:
        n_ok = max(1, len(template.lesion_depth) // 100)
        log.debug(  # expected now and then for the largest, most elongated lesions
            "a lesion of %.1f mm semi-axis does not fit inside the template's grey/white matter; "
            "placing it at one of the deepest sites",
            needed,
        )
    site = template.lesion_sites[int(rng.integers(0, n_ok))]
    jitter = rng.uniform(-1.0, 1.0, 3)  # sites lie on a 2 mm grid
    return Lesion(
        centre=site + jitter,
        radius_mm=radius,
        semi_axes=semi_axes,
        rotation=rotation,
        contrast=contrast,
        sign=sign,
        edge_mm=float(cfg.edge_softness_mm),
    )


def lesion_membership(lesion: Lesion, coords: NDArray[np.float32]) -> NDArray[np.float32]:
    """Soft membership of each point in the lesion.

    Args:
        lesion: the lesion.
        coords: ``(3, ...)`` template voxel coordinates.

    Returns:
        ``(...)`` float32 in ``[0, 1]``: 1 inside, 0 outside, a linear ramp ``edge_mm`` wide centred
        on the ellipsoid's surface (0.5 on the surface).
    """
    # axis-aligned coordinates scaled by the semi-axes: rho = 1 on the surface
    proj = (lesion.rotation / lesion.semi_axes[None, :]).T.astype(np.float32)  # (3 axes, 3 xyz)
    c = lesion.centre.astype(np.float32)
    d = [coords[i] - c[i] for i in range(3)]
    rho2 = np.zeros(coords.shape[1:], dtype=np.float32)
    for a in range(3):
        u = proj[a, 0] * d[0] + proj[a, 1] * d[1] + proj[a, 2] * d[2]
        rho2 += u * u
    # signed distance to the surface, approximately, in mm
    sd = (np.sqrt(rho2) - np.float32(1.0)) * np.float32(lesion.radius_mm)
    if lesion.edge_mm <= 0:
        return (sd <= 0).astype(np.float32)
    return np.clip(np.float32(0.5) - sd / np.float32(lesion.edge_mm), 0.0, 1.0).astype(np.float32)
