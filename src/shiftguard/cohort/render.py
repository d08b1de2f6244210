"""Render one subject's series on its scanner's acquisition grid.

For every voxel the template coordinates are computed once (see :mod:`.anatomy`); thick slices are
sampled at several offsets across the slice thickness and averaged (partial volume), and the lesion
is applied at each sub-sample. Then, by ``cohort.rendering``:

* ``physics`` (the default): the subject's own tissues (:mod:`.physics`: relaxation at the scanner's
  field with per-subject variation, the lesion a tissue of its own) give each tissue's signal under
  the scanner's sequence; the object is sampled ``physics.oversampling`` times finer in-plane, weighted
  by the receive coil's smooth sensitivity, and acquired in k-space (:mod:`.kspace`: truncation,
  partial Fourier, apodisation, zero-filling, thermal and parallel-imaging noise, magnitude);
* ``legacy``: the template's T1 intensities on every scanner, then blur, bias field, gamma and Rician
  noise (:mod:`.scanner`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from shiftguard.cohort import anatomy as anat
from shiftguard.cohort import kspace, physics, scanner
from shiftguard.cohort.demographics import (
    STREAM_ANATOMY,
    STREAM_LESION,
    STREAM_LESION_TISSUE,
    STREAM_SCANNER,
    STREAM_TISSUE,
    SubjectPlan,
    subject_rng,
)
from shiftguard.cohort.geometry import LPS_TO_RAS, AcquisitionGeometry
from shiftguard.cohort.lesion import Lesion, draw_lesion, lesion_membership
from shiftguard.cohort.template import HEAD_TISSUES, Template, load_template
from shiftguard.config.schema import PHYSICS_TISSUES, CohortConfig, PhysicsConfig, ScannerProfile

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
        labels: ``(K, R, C)`` uint8 tissue label map (:data:`.physics.LABELS`, the lesion's voxels
            are its mask); physics renderer only.
        lesion_tissue: the lesion's ``pd``, ``t1_ms``, ``t2_ms`` and its ``contrast`` against the
            subject's white matter on this scanner (signed, relative); physics renderer only.
    """

    geometry: AcquisitionGeometry
    stored: NDArray[np.uint16]
    physical: NDArray[np.float32]
    mask: NDArray[np.uint8]
    lesion: Lesion | None
    lesion_centre_ras: NDArray[np.float64] | None
    wm: NDArray[np.float32] | None = None
    brain: NDArray[np.float32] | None = None
    labels: NDArray[np.uint8] | None = None
    lesion_tissue: dict[str, float] | None = None


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
    """Render a subject's series with the cohort's renderer (``cfg.rendering``).

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
    if cfg.rendering == "legacy":
        return _render_legacy(
            cfg, plan, with_lesion=with_lesion, with_tissue=with_tissue, template=tpl
        )
    return _render_physics(
        cfg, plan, with_lesion=with_lesion, with_tissue=with_tissue, template=tpl
    )


def subject_tissues(cfg: CohortConfig, plan: SubjectPlan) -> physics.Relaxation:
    """The subject's tissues at its scanner's field: the table's values, each tissue's PD, T1 and T2
    scaled by ``1 + physics.subject_variation * z`` (``z`` standard normal clipped to +-2.5)."""
    assert cfg.physics is not None
    table = physics.relaxation_at(cfg.physics, cfg.scanners[plan.scanner].field_strength)
    table = physics.Relaxation(
        PHYSICS_TISSUES,
        *(
            np.array([getattr(table, key)[table.index(t)] for t in PHYSICS_TISSUES])
            for key in ("pd", "t1", "t2", "t2s")
        ),
    )
    rng = subject_rng(cfg.seed, plan.index, STREAM_TISSUE)
    z = np.clip(rng.standard_normal((3, len(PHYSICS_TISSUES))), -2.5, 2.5)
    f = 1.0 + cfg.physics.subject_variation * z
    return table.scaled(f[0], f[1], f[2])


def lesion_tissue(
    cfg: CohortConfig, plan: SubjectPlan, tissues: physics.Relaxation
) -> tuple[float, float, float, float]:
    """The lesion's ``(pd, t1, t2, t2s)``: the subject's white matter times factors drawn from
    ``cfg.lesion`` (a ``t1_short_fraction`` of lesions shorten T1)."""
    rng = subject_rng(cfg.seed, plan.index, STREAM_LESION_TISSUE)
    lc = cfg.lesion
    short = bool(rng.random() < lc.t1_short_fraction)
    t1f = float(rng.uniform(*(lc.t1_short_factor if short else lc.t1_factor)))
    t2f = float(rng.uniform(*lc.t2_factor))
    pdf = float(rng.uniform(*lc.pd_factor))
    w = tissues.index("wm")
    return (
        float(tissues.pd[w] * pdf),
        float(tissues.t1[w] * t1f),
        float(tissues.t2[w] * t2f),
        float(min(tissues.t2s[w] * t2f, tissues.t2[w] * t2f)),
    )


def tissue_volume(
    anatomy: anat.SubjectAnatomy, template: Template, signal: dict[str, float]
) -> NDArray[np.float32]:
    """The subject's signed signal on the template grid ``(X, Y, Z)`` float32.

    Brain voxels mix grey matter, white matter and CSF by their fractions (atrophy moves grey matter
    next to CSF into CSF); outside the brain the head's layers follow the distance from the brain's
    envelope (:data:`~.template.HEAD_TISSUES`); the coil's head-foot profile fades out the neck.
    """
    s_gm, s_wm, s_csf = (np.float32(signal[t]) for t in ("gm", "wm", "csf"))
    vol = template.gm_fraction * s_gm
    vol += template.wm_fraction * s_wm
    vol += template.csf_fraction * s_csf
    lost = min(anat.SULCAL_GAIN * anatomy.atrophy, 0.9)
    if lost > 0:
        vol -= np.float32(lost) * (s_gm - s_csf) * template.atrophy_fraction
    xs = np.array([d for d, _ in HEAD_TISSUES], dtype=np.float32)
    ys = np.array([signal.get(t, 0.0) for _, t in HEAD_TISSUES], dtype=np.float32)
    vol += np.interp(template.head_distance, xs, ys, right=0.0).astype(np.float32)
    vol *= template.coil_profile[None, None, :]
    return vol


def _draw_subject(
    cfg: CohortConfig, plan: SubjectPlan, with_lesion: bool | None, tpl: Template
) -> tuple[anat.SubjectAnatomy, Lesion | None]:
    """The subject's anatomy and, where it has one (or ``with_lesion`` says so), its lesion, each
    from its own stream: both renderers draw the same subject."""
    anatomy = anat.draw_anatomy(
        subject_rng(cfg.seed, plan.index, STREAM_ANATOMY), cfg.anatomy, plan.age, tpl
    )
    lesion = None
    if plan.finding if with_lesion is None else with_lesion:
        lesion = draw_lesion(subject_rng(cfg.seed, plan.index, STREAM_LESION), cfg.lesion, tpl)
    return anatomy, lesion


def _slab_samples(
    volume: NDArray[np.float32],
    coords: NDArray[np.float32],
    affine: NDArray[np.float64],
    offsets: Sequence[float],
    slice_spacing: float,
) -> Iterator[tuple[NDArray[np.float32], NDArray[np.float32]]]:
    """For each offset (mm) across the slice, the template coordinates ``(3, K, R, C)`` moved by it
    and ``volume`` sampled there (trilinear, 0 outside), float32. The coordinates are one buffer,
    overwritten by the next offset."""
    sub = np.empty_like(coords)
    for off in offsets:
        step = anat.slab_offset(affine, off, slice_spacing)
        for i in range(3):
            np.add(coords[i], step[i], out=sub[i])
        sample = ndi.map_coordinates(
            volume, sub, order=1, mode="constant", cval=0.0, output=np.float32
        )
        yield sub, sample


def _tissue_maps(
    tpl: Template, coords: NDArray[np.float32]
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """White-matter and brain (grey + white matter) probabilities at template ``coords``
    ``(3, K, R, C)``, trilinear, float32."""
    wm = ndi.map_coordinates(tpl.wm, coords, order=1, mode="constant", output=np.float32)
    brain = ndi.map_coordinates(tpl.brain, coords, order=1, mode="constant", output=np.float32)
    return wm, brain


def _render_physics(
    cfg: CohortConfig,
    plan: SubjectPlan,
    *,
    with_lesion: bool | None,
    with_tissue: bool,
    template: Template,
) -> RenderedSeries:
    tpl = template
    assert cfg.physics is not None
    phys: PhysicsConfig = cfg.physics
    profile: ScannerProfile = cfg.scanners[plan.scanner]
    geometry = AcquisitionGeometry.from_profile(profile, scanner_centre_lps(tpl))
    over = phys.oversampling
    fine = geometry.refined(over)

    anatomy, lesion = _draw_subject(cfg, plan, with_lesion, tpl)
    tissues = subject_tissues(cfg, plan)
    les = lesion_tissue(cfg, plan, tissues)
    tissues = tissues.append("lesion", *les)
    signals = physics.sequence_signal(profile, tissues)
    signal = dict(zip(tissues.names, map(float, signals), strict=True))
    nominal = physics.relaxation_at(phys, profile.field_strength)
    s_ref = abs(float(physics.sequence_signal(profile, nominal)[nominal.index("wm")]))
    if s_ref <= 0:
        raise ValueError(f"{plan.scanner}: white matter gives no signal with this sequence")

    affine = anat.grid_to_template(fine.index_to_lps(), anatomy, tpl)
    coords = anat.template_coordinates(affine, fine.shape, anatomy, warp_step=over)
    volume = tissue_volume(anatomy, tpl, signal)

    offsets = anat.partial_volume_offsets(geometry.slice_thickness, phys.slab_step_mm)
    obj = np.zeros(fine.shape, dtype=np.float32)
    membership = np.zeros(fine.shape, dtype=np.float32) if lesion is not None else None
    s_les = np.float32(signal["lesion"])
    box = None
    if lesion is not None:
        reach = geometry.slice_thickness / 2 + 2 * max(geometry.row_spacing, geometry.col_spacing)
        box = _lesion_box(lesion, coords, over, reach + 1.0)
    for sub, sample in _slab_samples(volume, coords, affine, offsets, geometry.slice_spacing):
        if lesion is not None and membership is not None and box is not None:
            m = lesion_membership(lesion, sub[(slice(None), *box)])
            part = sample[box]
            part += m * (s_les - part)
            membership[box] += m
        obj += sample
    obj /= np.float32(len(offsets))

    rng = subject_rng(cfg.seed, plan.index, STREAM_SCANNER)
    obj *= scanner.bias_field(rng, fine.shape, profile.bias_field)
    magnitude = kspace.acquire(obj, profile, rng, physics.noise_sd(profile, phys))
    physical = (magnitude * np.float32(profile.intensity_scale / s_ref)).astype(np.float32)
    stored = scanner.quantise(physical, profile)

    coarse = coords[:, :, ::over, ::over]  # fine voxel [k, r*o, c*o] is voxel [k, r, c]
    if membership is not None:
        membership /= np.float32(len(offsets))
        shape = geometry.shape
        membership = membership.reshape(shape[0], shape[1], over, shape[2], over).mean(axis=(2, 4))
    mask, centre_ras = _lesion_mask(membership, geometry)
    labels = ndi.map_coordinates(tpl.labels, coarse, order=0, mode="constant", cval=0)
    labels = labels.astype(np.uint8)
    lost = min(anat.SULCAL_GAIN * anatomy.atrophy, 0.9)
    if lost > 0:  # grey matter that atrophy has half turned to CSF is labelled CSF
        csf_from = ndi.map_coordinates(
            tpl.csf_from, coarse, order=0, mode="constant", cval=np.inf, output=np.float32
        )
        labels[(labels == physics.LABELS["gm"]) & (csf_from <= lost)] = physics.LABELS["csf"]
    labels[mask > 0] = physics.LABELS["lesion"]

    wm, brain = _tissue_maps(tpl, coarse) if with_tissue else (None, None)
    s_wm = signal["wm"]
    info = {
        "pd": les[0],
        "t1_ms": les[1],
        "t2_ms": les[2],
        "contrast": (abs(float(s_les)) - abs(s_wm)) / abs(s_wm) if s_wm else 0.0,
    }
    return RenderedSeries(
        geometry=geometry,
        stored=stored,
        physical=physical,
        mask=mask,
        lesion=lesion,
        lesion_centre_ras=centre_ras,
        wm=wm,
        brain=brain,
        labels=labels,
        lesion_tissue=info if lesion is not None else None,
    )


def _lesion_box(
    lesion: Lesion, coords: NDArray[np.float32], over: int, margin_mm: float
) -> tuple[slice, slice, slice] | None:
    """The block of the fine grid the lesion (plus ``margin_mm``) can touch, found on the coarse grid;
    ``None`` when it touches none."""
    coarse = coords[:, :, ::over, ::over]
    centre = lesion.centre.astype(np.float32)
    d2 = np.zeros(coarse.shape[1:], dtype=np.float32)
    for i in range(3):
        d2 += (coarse[i] - centre[i]) ** 2
    reach = float(lesion.semi_axes.max()) + lesion.edge_mm + margin_mm
    near = np.nonzero(d2 <= np.float32(reach * reach))
    if not near[0].size:
        return None
    k0, k1 = int(near[0].min()), int(near[0].max()) + 1
    r0, r1 = max(int(near[1].min()) - 1, 0) * over, (int(near[1].max()) + 2) * over
    c0, c1 = max(int(near[2].min()) - 1, 0) * over, (int(near[2].max()) + 2) * over
    return slice(k0, k1), slice(r0, r1), slice(c0, c1)


def _lesion_mask(
    membership: NDArray[np.float32] | None, geometry: AcquisitionGeometry
) -> tuple[NDArray[np.uint8], NDArray[np.float64] | None]:
    """The lesion mask and the RAS centroid of its partial-volume fraction on the series grid."""
    shape = geometry.shape
    mask = np.zeros(shape, dtype=np.uint8)
    if membership is None:
        return mask, None
    peak = float(membership.max())
    # a lesion smaller than a voxel still marks the voxel holding most of it
    mask = (membership >= min(MASK_THRESHOLD, peak)).astype(np.uint8) if peak > 0 else mask
    total = float(membership.sum(dtype=np.float64))
    if total <= 0:
        return mask, None
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
    return mask, (LPS_TO_RAS @ lps)[:3]


def _render_legacy(
    cfg: CohortConfig,
    plan: SubjectPlan,
    *,
    with_lesion: bool | None,
    with_tissue: bool,
    template: Template,
) -> RenderedSeries:
    tpl = template
    profile: ScannerProfile = cfg.scanners[plan.scanner]
    geometry = AcquisitionGeometry.from_profile(profile, scanner_centre_lps(tpl))
    shape = geometry.shape

    anatomy, lesion = _draw_subject(cfg, plan, with_lesion, tpl)

    affine = anat.grid_to_template(geometry.index_to_lps(), anatomy, tpl)
    coords = anat.template_coordinates(affine, shape, anatomy)
    volume = anat.subject_volume(anatomy, tpl)

    offsets = anat.partial_volume_offsets(geometry.slice_thickness)
    signal = np.zeros(shape, dtype=np.float32)
    membership = np.zeros(shape, dtype=np.float32) if lesion is not None else None
    for sub, sample in _slab_samples(volume, coords, affine, offsets, geometry.slice_spacing):
        if lesion is not None and membership is not None:
            m = lesion_membership(lesion, sub)
            sample *= np.float32(1.0) + np.float32(lesion.sign * lesion.contrast) * m
            membership += m
        signal += sample
    signal /= np.float32(len(offsets))

    if membership is not None:
        membership /= np.float32(len(offsets))
    mask, centre_ras = _lesion_mask(membership, geometry)

    wm, brain = _tissue_maps(tpl, coords) if with_tissue else (None, None)

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
