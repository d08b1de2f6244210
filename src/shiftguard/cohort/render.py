"""Render one subject's series on its scanner's acquisition grid.

For every voxel the template coordinates are computed once (see :mod:`.anatomy`); thick slices are
sampled at several offsets across the slice thickness and averaged (partial volume), the lesion is
applied at each sub-sample, and the scanner's image formation (:mod:`.scanner`) follows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from shiftguard.cohort import anatomy as anat
from shiftguard.cohort import scanner
from shiftguard.cohort.demographics import (
    STREAM_ANATOMY,
    STREAM_LESION,
    STREAM_SCANNER,
    SubjectPlan,
    subject_rng,
)
from shiftguard.cohort.geometry import LPS_TO_RAS, AcquisitionGeometry
from shiftguard.cohort.lesion import Lesion, draw_lesion, lesion_membership
from shiftguard.cohort.template import Template, load_template
from shiftguard.config.schema import CohortConfig, ScannerProfile

MASK_THRESHOLD = 0.5


@dataclass(frozen=True)
class RenderedSeries:
    """One subject's series before it is written.

    Attributes:
        geometry: the acquisition grid.
        stored: ``(K, R, C)`` uint16 stored pixel values.
        physical: ``(K, R, C)`` float32 values the scanner reconstructed (before quantisation).
        mask: ``(K, R, C)`` uint8 lesion mask: voxels whose partial-volume fraction of lesion is
            >= 0.5 (or, for a lesion smaller than a voxel, the voxel holding most of it); all 0
            without a lesion.
        lesion: the lesion, or ``None``.
        lesion_centre_ras: ``(3,)`` RAS mm centroid of the lesion's partial-volume fraction, or
            ``None``.
        wm: ``(K, R, C)`` float32 white-matter probability at the slice centres, only when asked
            for (checks).
        brain: ``(K, R, C)`` float32 grey + white matter probability, likewise.
    """

    geometry: AcquisitionGeometry
    stored: NDArray[np.uint16]
    physical: NDArray[np.float32]
    mask: NDArray[np.uint8]
    lesion: Lesion | None
    lesion_centre_ras: NDArray[np.float64] | None
    wm: NDArray[np.float32] | None = None
    brain: NDArray[np.float32] | None = None


#: the field of view is centred this far (mm) above the brain's bounding-box centre, so the vertex
#: and its scalp are in view and the cut falls at the foramen magnum, as a technologist would place it
FOV_RAISE_MM = 12.0


def scanner_centre_lps(template: Template) -> NDArray[np.float64]:
    """LPS mm the scanners centre their field of view on: the brain centre, raised by
    :data:`FOV_RAISE_MM` (the subject's head is then posed around it)."""
    ras = template.brain_centre + np.array([0.0, 0.0, FOV_RAISE_MM])
    return np.array([-ras[0], -ras[1], ras[2]], dtype=np.float64)


def render_subject(
    cfg: CohortConfig,
    plan: SubjectPlan,
    *,
    with_lesion: bool | None = None,
    with_tissue: bool = False,
    template: Template | None = None,
) -> RenderedSeries:
    """Render a subject's series.

    Args:
        cfg: the cohort config.
        plan: the subject (from :func:`~.demographics.sample_subjects`).
        with_lesion: override the plan's finding (``False`` renders the same subject without its
            lesion, with the same noise); ``None`` follows the plan.
        with_tissue: also sample the white-matter and brain tissue probabilities on the grid.
        template: the template; loaded (and cached) when ``None``.

    Returns:
        The rendered series.
    """
    tpl = template if template is not None else load_template()
    profile: ScannerProfile = cfg.scanners[plan.scanner]
    geometry = AcquisitionGeometry.from_profile(profile, scanner_centre_lps(tpl))
    shape = geometry.shape

    anatomy = anat.draw_anatomy(
        subject_rng(cfg.seed, plan.index, STREAM_ANATOMY), cfg.anatomy, plan.age, tpl
    )
    lesion = None
    if plan.finding if with_lesion is None else with_lesion:
        lesion = draw_lesion(subject_rng(cfg.seed, plan.index, STREAM_LESION), cfg.lesion, tpl)

    affine = anat.grid_to_template(geometry.index_to_lps(), anatomy, tpl)
    coords = anat.template_coordinates(affine, shape, anatomy)
    volume = anat.subject_volume(anatomy, tpl)

    offsets = anat.partial_volume_offsets(geometry.slice_thickness)
    signal = np.zeros(shape, dtype=np.float32)
    membership = np.zeros(shape, dtype=np.float32) if lesion is not None else None
    sub = np.empty_like(coords)
    for off in offsets:
        step = anat.slab_offset(affine, off, geometry.slice_spacing)
        for i in range(3):
            np.add(coords[i], step[i], out=sub[i])
        sample = ndi.map_coordinates(
            volume, sub, order=1, mode="constant", cval=0.0, output=np.float32
        )
        if lesion is not None and membership is not None:
            m = lesion_membership(lesion, sub)
            sample *= np.float32(1.0) + np.float32(lesion.sign * lesion.contrast) * m
            membership += m
        signal += sample
    signal /= np.float32(len(offsets))

    mask = np.zeros(shape, dtype=np.uint8)
    centre_ras = None
    if membership is not None:
        membership /= np.float32(len(offsets))
        peak = float(membership.max())
        # a lesion smaller than a voxel still marks the voxel holding most of it
        mask = (membership >= min(MASK_THRESHOLD, peak)).astype(np.uint8) if peak > 0 else mask
        total = float(membership.sum(dtype=np.float64))
        if total > 0:
            centroid = (
                np.array(
                    [
                        np.arange(n) @ membership.sum(axis=tuple(a for a in range(3) if a != ax))
                        for ax, n in enumerate(shape)
                    ],
                    dtype=np.float64,
                )
                / total
            )
            lps = geometry.index_to_lps() @ np.append(centroid, 1.0)
            centre_ras = (LPS_TO_RAS @ lps)[:3]

    wm = brain = None
    if with_tissue:
        wm = ndi.map_coordinates(tpl.wm, coords, order=1, mode="constant", output=np.float32)
        brain = ndi.map_coordinates(tpl.brain, coords, order=1, mode="constant", output=np.float32)

    physical = scanner.acquire(signal, profile, subject_rng(cfg.seed, plan.index, STREAM_SCANNER))
    stored = scanner.quantise(physical, profile)
    return RenderedSeries(
        geometry=geometry,
        stored=stored,
        physical=physical,
        mask=mask,
        lesion=lesion,
        lesion_centre_ras=centre_ras,
        wm=wm,
        brain=brain,
    )
