"""The anatomical template every synthetic subject is built from: MNI152 2009c (sym) at 1 mm.

nilearn's wheel ships the T1-weighted template and the grey/white matter probability maps; they are
located without importing nilearn (slow). The template is skull-stripped, so a synthetic head is
added around it (extra-axial CSF, skull tables and diploe, scalp muscle and fat) to give the images
a realistic field of view, and the template, which ends at the medulla, is continued downwards by a
short cord and neck that fade out like a head coil's sensitivity (no flat cut on sagittal images).
Everything derived here is deterministic; it is computed once and kept on disk (:func:`cache_dir`),
so the generator's worker processes read it back instead of deriving it again.

Intensities are on a "white matter = 1" scale: the T1 template is divided by its median white-matter
value.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from shiftguard.cohort.physics import LABELS
from shiftguard.errors import TemplateNotFoundError

log = logging.getLogger(__name__)

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

#: Synthetic head around the brain: (distance outside the brain's envelope in mm, intensity on the
#: white-matter = 1 scale). Piecewise linear: extra-axial CSF, inner table, diploe (marrow fat),
#: outer table, galea and temporalis muscle, subcutaneous fat, skin, air.
HEAD_PROFILE: tuple[tuple[float, float], ...] = (
    (0.0, 0.20),
    (1.6, 0.20),
    (2.4, 0.05),
    (3.4, 0.05),
    (4.2, 0.55),
    (5.4, 0.55),
    (6.2, 0.05),
    (7.2, 0.05),
    (8.0, 0.40),
    (9.0, 0.40),
    (9.8, 1.10),
    (12.0, 1.05),
    (12.8, 0.60),
    (13.6, 0.60),
    (14.2, 0.00),
)
CSF_LEVEL = 0.20
#: The same head as tissues, for the physics renderer: (distance outside the brain's envelope in mm,
#: tissue). Between two nodes the tissue fractions mix linearly; "air" is no tissue.
HEAD_TISSUES: tuple[tuple[float, str], ...] = (
    (0.0, "csf"),
    (1.6, "csf"),
    (2.4, "bone"),
    (3.4, "bone"),
    (4.2, "marrow"),
    (5.4, "marrow"),
    (6.2, "bone"),
    (7.2, "bone"),
    (8.0, "muscle"),
    (9.0, "muscle"),
    (9.8, "fat"),
    (12.0, "fat"),
    (12.8, "skin"),
    (13.6, "skin"),
    (14.2, "air"),
)
#: ``Template.head_distance`` inside the brain: beyond the last node, so the head term is 0 there
INSIDE_BRAIN_MM = 1000.0
HEAD_MARGIN_MM = 18
#: mm the template is continued below the medulla (then faded out)
NECK_MM = 24
TISSUE_THRESHOLD = 0.6
#: lesion centres stay within this distance (mm, superior-inferior) of the brain centre, so every
#: scanner's field of view holds the whole lesion
LESION_Z_HALF_RANGE_MM = 45.0


@dataclass(frozen=True)
class Template:
    """The template, cropped to the synthetic head, and what the generator derives from it.

    Attributes:
        channels: ``(4, X, Y, Z)`` float32 on the white-matter = 1 scale, voxel ``[i, j, k]`` at RAS mm
            ``origin + (i, j, k)`` (1 mm isotropic, axis-aligned): 0 the head (T1 brain and the
            synthetic skull and scalp), 1 the T1 signal weighted by grey-matter probability, 2 the same
            for white matter, 3 the signal an atrophied subject loses per unit of atrophy (grey matter
            next to CSF, so sulci widen).
        wm: ``(X, Y, Z)`` float32 white-matter probability, for checks.
        brain: ``(X, Y, Z)`` float32 grey + white matter probability.
        origin: ``(3,)`` RAS mm of voxel ``[0, 0, 0]``.
        brain_centre: ``(3,)`` RAS mm, centre of the brain's bounding box (scanners centre on it).
        ventricle_centres: ``(2, 3)`` voxel coordinates of the left and right lateral ventricles.
        lesion_sites: ``(N, 3)`` voxel coordinates where a lesion can be centred, deepest first.
        lesion_depth: ``(N,)`` mm of grey/white matter around each site in ``lesion_sites``
            (descending).
        gm_fraction: ``(X, Y, Z)`` float32 grey-matter fraction inside the brain (0 outside).
        wm_fraction: ``(X, Y, Z)`` float32 white-matter fraction inside the brain.
        csf_fraction: ``(X, Y, Z)`` float32 CSF fraction inside the brain: brain minus grey minus
            white matter (the MNI152 package has no CSF map).
        head_distance: ``(X, Y, Z)`` float32 mm outside the brain's envelope, where the head's
            layers (:data:`HEAD_TISSUES`) are; :data:`INSIDE_BRAIN_MM` inside the brain.
        atrophy_fraction: ``(X, Y, Z)`` float32 grey-matter fraction that turns to CSF per unit of
            atrophy (grey matter next to CSF, so sulci widen).
        csf_from: ``(X, Y, Z)`` float32 the atrophy gain at which a grey-matter voxel's label turns
            to CSF (half its grey matter gone); infinite elsewhere.
        coil_profile: ``(Z,)`` float32 receive sensitivity along the head-foot axis (fades out the
            neck, as a head coil does).
        labels: ``(X, Y, Z)`` uint8 dominant tissue (:data:`shiftguard.cohort.physics.LABELS`).
    """

    channels: NDArray[np.float32]
    wm: NDArray[np.float32]
    brain: NDArray[np.float32]
    origin: NDArray[np.float64]
    brain_centre: NDArray[np.float64]
    ventricle_centres: NDArray[np.float64]
    lesion_sites: NDArray[np.float64]
    lesion_depth: NDArray[np.float64]
    gm_fraction: NDArray[np.float32]
    wm_fraction: NDArray[np.float32]
    csf_fraction: NDArray[np.float32]
    head_distance: NDArray[np.float32]
    atrophy_fraction: NDArray[np.float32]
    csf_from: NDArray[np.float32]
    coil_profile: NDArray[np.float32]
    labels: NDArray[np.uint8]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(X, Y, Z)`` of the cropped template."""
        s = self.channels.shape
        return (s[1], s[2], s[3])

    def ras_to_voxel(self, ras: NDArray[np.float64]) -> NDArray[np.float64]:
        """Map RAS mm ``(..., 3)`` to template voxel coordinates ``(..., 3)``."""
        return np.asarray(ras, dtype=np.float64) - self.origin


def template_dir() -> Path:
    """The folder of nilearn's packaged MNI152 templates, found without importing nilearn.

    Raises:
        TemplateNotFoundError: nilearn is not installed, or its wheel lacks the template files.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise TemplateNotFoundError(
            "the synthetic cohort needs the MNI152 template shipped with nilearn, which is not "
            "installed; install the pipeline extra: pip install 'shiftguard[pipeline]'"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    missing = [name for name in TEMPLATE_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise TemplateNotFoundError(
            f"nilearn at {folder.parent.parent} lacks the MNI152 template files {missing}; "
            "reinstall nilearn>=0.11 from its wheel"
        )
    return folder


def _load_raw() -> tuple[dict[str, NDArray[np.float32]], NDArray[np.float64]]:
    import nibabel as nib

    folder = template_dir()
    volumes: dict[str, NDArray[np.float32]] = {}
    affine: NDArray[np.float64] | None = None
    for key, name in TEMPLATE_FILES.items():
        img = nib.Nifti1Image.from_filename(folder / name)
        volumes[key] = np.asarray(img.dataobj, dtype=np.float32) / np.float32(255.0)
        aff = np.asarray(img.affine, dtype=np.float64)
        if affine is None:
            affine = aff
        elif not np.allclose(affine, aff):
            raise TemplateNotFoundError(f"{folder / name}: affine differs from the T1 template's")
    assert affine is not None
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise TemplateNotFoundError(
            f"{folder}: expected the 1 mm axis-aligned RAS MNI152 template, got affine {affine.tolist()}"
        )
    return volumes, affine


def _upsample2(arr: NDArray[np.float32], shape: tuple[int, ...]) -> NDArray[np.float32]:
    """Linear 2x upsampling of a ``[::2]`` subsampled volume back onto the full grid ``shape``."""
    out = np.asarray(arr, dtype=np.float32)
    for axis, n in enumerate(shape):
        m = out.shape[axis]
        full_shape = list(out.shape)
        full_shape[axis] = 2 * m
        full = np.empty(full_shape, dtype=np.float32)
        even = [slice(None)] * out.ndim
        odd = [slice(None)] * out.ndim
        even[axis] = slice(0, None, 2)
        odd[axis] = slice(1, None, 2)
        full[tuple(even)] = out
        nxt = np.concatenate([out.take(range(1, m), axis=axis), out.take([m - 1], axis=axis)], axis)
        full[tuple(odd)] = 0.5 * (out + nxt)
        keep = [slice(None)] * out.ndim
        keep[axis] = slice(0, n)
        out = full[tuple(keep)]
    return np.ascontiguousarray(out)


def _bbox(mask: NDArray[np.bool_]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    idx = np.argwhere(mask)
    return idx.min(axis=0), idx.max(axis=0)


CACHE_ENV = "SHIFTGUARD_CACHE_DIR"


def cache_dir() -> Path | None:
    """Where derived templates are kept between processes: ``$SHIFTGUARD_CACHE_DIR`` (empty: no
    cache), else ``$XDG_CACHE_HOME/shiftguard``, else ``~/.cache/shiftguard``."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return Path(value) if value.strip() else None
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "shiftguard"


def template_key() -> str:
    """What the derived template depends on, hashed: the three template files, this module's source
    (every derivation step), the tissue labels and the numpy and scipy versions that compute it."""
    import scipy

    h = hashlib.sha256()
    folder = template_dir()
    for name in sorted(TEMPLATE_FILES.values()):
        h.update(name.encode())
        h.update((folder / name).read_bytes())
    h.update(Path(__file__).read_bytes())
    h.update(json.dumps(LABELS, sort_keys=True).encode())
    h.update(f"numpy {np.__version__} scipy {scipy.__version__}".encode())
    return h.hexdigest()[:20]


def _read_cached(folder: Path) -> Template | None:
    try:
        arrays = {f.name: np.load(folder / f"{f.name}.npy") for f in fields(Template)}
    except (OSError, ValueError, EOFError):
        return None
    return Template(**arrays)


def _write_cached(folder: Path, template: Template) -> None:
    """Write the template's arrays into ``folder`` atomically (another process may race us)."""
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        for f in fields(Template):
            np.save(tmp / f"{f.name}.npy", getattr(template, f.name), allow_pickle=False)
        tmp.replace(folder)
    except OSError as exc:  # a read-only home, a full disk, a racing writer: derive next time
        log.debug("template cache %s not written: %s", folder, exc)
        shutil.rmtree(tmp, ignore_errors=True)


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    """The MNI152 template with the synthetic head, once per process.

    Deriving it takes about 6 s; the result is kept in :func:`cache_dir` under
    :func:`template_key`, so every later process (the generator's spawned workers) reads it back in
    a fraction of a second. The cached arrays are the derived ones, byte for byte.

    Returns:
        The cropped template with its derived maps (about 370 MB, mostly float32).

    Raises:
        TemplateNotFoundError: see :func:`template_dir`.
    """
    root = cache_dir()
    folder = root / f"template-{template_key()}" if root is not None else None
    if folder is not None and folder.is_dir():
        cached = _read_cached(folder)
        if cached is not None:
            return cached
        shutil.rmtree(folder, ignore_errors=True)  # damaged: derive and write it afresh
    template = derive_template()
    if folder is not None:
        _write_cached(folder, template)
    return template


def derive_template() -> Template:
    """Load the MNI152 template and derive the synthetic head (no cache).

    Raises:
        TemplateNotFoundError: see :func:`template_dir`.
    """
    volumes, affine = _load_raw()
    t1, gm, wm = volumes["t1"], volumes["gm"], volumes["wm"]
    wm_level = float(np.median(t1[wm > 0.9]))
    lo, hi = _bbox(t1 > 0)
    brain_centre_vox = (lo + hi) / 2.0
    # the template ends at the medulla: continue it downwards (a cord in a thin neck) and fade
    # that extension out like a head coil's sensitivity, so no flat cut shows on sagittal images
    pad = ((0, 0), (0, 0), (NECK_MM, 0))
    t1, gm, wm = (np.pad(v, pad, mode="edge") for v in (t1, gm, wm))
    affine = affine.copy()
    affine[2, 3] -= NECK_MM
    lo[2] = 0
    hi[2] += NECK_MM
    brain_centre_vox[2] += NECK_MM
    brain_mask = t1 > 0
    # crop to the brain plus room for the synthetic head
    start = np.maximum(lo - HEAD_MARGIN_MM, 0)
    stop = np.minimum(hi + HEAD_MARGIN_MM + 1, np.array(t1.shape))
    crop = tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))
    t1, gm, wm, brain_mask = t1[crop] / wm_level, gm[crop], wm[crop], brain_mask[crop]
    origin = affine[:3, 3] + start
    shape = t1.shape

    # the brain's envelope (sulci bridged), and distances outside / inside it on a 2 mm grid
    envelope = ndi.gaussian_filter(brain_mask.astype(np.float32), 3.0) > 0.25
    env2 = envelope[::2, ::2, ::2]
    outside = _upsample2(ndi.distance_transform_edt(~env2, sampling=2.0).astype(np.float32), shape)
    inside = ndi.distance_transform_edt(env2, sampling=2.0).astype(np.float32)

    xs = np.array([p[0] for p in HEAD_PROFILE], dtype=np.float32)
    ys = np.array([p[1] for p in HEAD_PROFILE], dtype=np.float32)
    head = np.interp(outside, xs, ys).astype(np.float32)
    head = ndi.gaussian_filter(head, 0.6)
    head[envelope & ~brain_mask] = CSF_LEVEL
    head = np.where(brain_mask, t1, head).astype(np.float32)

    # atrophy: grey matter next to CSF turns CSF-like first (sulci widen)
    csf = np.where(brain_mask, np.clip(1.0 - gm - wm, 0.0, 1.0), envelope.astype(np.float32))
    near_csf = np.clip(2.0 * ndi.gaussian_filter(csf.astype(np.float32), 1.5), 0.0, 1.0)
    atrophy = (gm * near_csf * np.clip(t1 - CSF_LEVEL, 0.0, None)).astype(np.float32)

    channels = np.stack([head, t1 * gm, t1 * wm, atrophy]).astype(np.float32)
    neck_end = NECK_MM - int(start[2])  # cropped index of the template's original bottom slice
    coil = np.ones(shape[2], dtype=np.float32)
    if neck_end > 0:
        ramp = np.clip(np.arange(shape[2], dtype=np.float32) / neck_end, 0.0, 1.0)
        coil = (ramp * ramp * (3.0 - 2.0 * ramp)).astype(np.float32)
        channels *= coil[None, None, None, :]
    tissue = _tissue_maps(gm, wm, brain_mask, outside, near_csf)

    # lateral ventricles: dark, deep inside the envelope, one centroid per hemisphere
    deep = _upsample2(inside, shape) > 15.0
    ventricles = brain_mask & deep & (t1 < 0.45)
    vidx = np.argwhere(ventricles).astype(np.float64)
    mid = brain_centre_vox[0] - start[0]
    centres = [vidx[vidx[:, 0] < mid].mean(axis=0), vidx[vidx[:, 0] >= mid].mean(axis=0)]

    # lesion sites: depth inside grey + white matter (2 mm grid), central superior-inferior band
    tissue2 = (gm + wm)[::2, ::2, ::2] > TISSUE_THRESHOLD
    depth = ndi.distance_transform_edt(tissue2, sampling=2.0) - 1.0  # conservative on a 2 mm grid
    centre_z = brain_centre_vox[2] - start[2]
    sites = np.argwhere(depth >= 3.0)
    site_depth = depth[tuple(sites.T)]
    sites_vox = sites.astype(np.float64) * 2.0
    keep = np.abs(sites_vox[:, 2] - centre_z) <= LESION_Z_HALF_RANGE_MM
    sites_vox, site_depth = sites_vox[keep], site_depth[keep]
    order = np.lexsort((sites_vox[:, 2], sites_vox[:, 1], sites_vox[:, 0], -site_depth))
    log.debug("template loaded: %s voxels, %d lesion sites", shape, len(order))
    return Template(
        channels=channels,
        wm=wm.astype(np.float32),
        brain=(gm + wm).astype(np.float32),
        origin=origin.astype(np.float64),
        brain_centre=(affine[:3, 3] + brain_centre_vox).astype(np.float64),
        ventricle_centres=np.array(centres, dtype=np.float64),
        lesion_sites=sites_vox[order],
        lesion_depth=site_depth[order].astype(np.float64),
        coil_profile=coil,
        **tissue,
    )


def _tissue_maps(
    gm: NDArray[np.float32],
    wm: NDArray[np.float32],
    brain_mask: NDArray[np.bool_],
    outside: NDArray[np.float32],
    near_csf: NDArray[np.float32],
) -> dict[str, NDArray]:
    """The physics renderer's tissue fractions, head distance and label map (see :class:`Template`)."""
    inside = brain_mask.astype(np.float32)
    gm_f = np.clip(gm, 0.0, 1.0) * inside
    wm_f = np.clip(wm, 0.0, 1.0) * inside
    total = gm_f + wm_f
    over = total > 1.0
    gm_f[over] /= total[over]
    wm_f[over] /= total[over]
    csf_f = np.clip(inside - gm_f - wm_f, 0.0, 1.0)
    head_distance = np.where(brain_mask, np.float32(INSIDE_BRAIN_MM), outside).astype(np.float32)

    labels = np.zeros(gm.shape, dtype=np.uint8)
    brain_stack = np.stack([csf_f, gm_f, wm_f])
    brain_label = np.array([LABELS["csf"], LABELS["gm"], LABELS["wm"]], dtype=np.uint8)
    labels[brain_mask] = brain_label[np.argmax(brain_stack[:, brain_mask], axis=0)]
    xs = np.array([d for d, _ in HEAD_TISSUES], dtype=np.float32)
    names = sorted({t for _, t in HEAD_TISSUES})
    dist = outside[~brain_mask]
    fractions = np.stack(
        [np.interp(dist, xs, [float(t == name) for _, t in HEAD_TISSUES]) for name in names]
    )
    codes = np.array([LABELS.get(name, 0) for name in names], dtype=np.uint8)  # air -> 0
    labels[~brain_mask] = codes[np.argmax(fractions, axis=0)]
    return {
        "gm_fraction": gm_f.astype(np.float32),
        "wm_fraction": wm_f.astype(np.float32),
        "csf_fraction": csf_f.astype(np.float32),
        "head_distance": head_distance,
        "atrophy_fraction": (gm_f * near_csf).astype(np.float32),
        "csf_from": np.where(
            (labels == LABELS["gm"]) & (near_csf > 0),
            np.float32(0.5) / np.maximum(near_csf, np.float32(1e-6)),
            np.float32(np.inf),
        ).astype(np.float32),
        "labels": labels,
    }
