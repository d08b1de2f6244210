"""PHI-free feature records: what the edge runner reports about each series it processed.

One record per series holds four groups of features and two coarse segment labels:

* ``metadata``: how it was acquired (vendor, model, field strength, slice thickness, pixel spacing,
  matrix, TR, TE, flip angle; kVp and reconstruction kernel for CT);
* ``image``: intensity percentiles, foreground fraction, an SNR, a noise estimate, a sharpness and
  a bias-field indicator, computed on the canonical grid the model sees;
* ``output``: the probability, its predictive entropy, and the first principal components of the
  network's penultimate-layer features (the basis fitted on the training data, kept in the bundle);
* ``segment``: age band and sex, the only demographics that leave the runner.

No name, identifier, date, UID or free text from the DICOM headers is copied into a record; the
record id is a one-way hash. The export stage computes the bundle's reference table with this
same module on the training series, through the same runner code, so live and reference features
are comparable by construction. Everything here is numpy: the edge runtime imports it.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
N_EMBEDDING = 8  # principal components of the penultimate features kept per record
TEXTURE_VOXELS = 100_000


@dataclass(frozen=True)
class Feature:
    name: str
    kind: str  # "numerical" or "categorical"
    group: str  # "metadata", "image", "output", "embedding", "segment"


FEATURES: tuple[Feature, ...] = (
    Feature("manufacturer", "categorical", "metadata"),
    Feature("scanner_model", "categorical", "metadata"),
    Feature("field_strength", "numerical", "metadata"),
    Feature("slice_thickness", "numerical", "metadata"),
    Feature("pixel_spacing_row", "numerical", "metadata"),
    Feature("pixel_spacing_col", "numerical", "metadata"),
    Feature("rows", "numerical", "metadata"),
    Feature("cols", "numerical", "metadata"),
    Feature("n_slices", "numerical", "metadata"),
    Feature("repetition_time", "numerical", "metadata"),
    Feature("echo_time", "numerical", "metadata"),
    Feature("flip_angle", "numerical", "metadata"),
    Feature("kvp", "numerical", "metadata"),  # CT
    Feature("convolution_kernel", "categorical", "metadata"),  # CT
    Feature("mean", "numerical", "image"),
    Feature("std", "numerical", "image"),
    Feature("p01", "numerical", "image"),
    Feature("p50", "numerical", "image"),
    Feature("p99", "numerical", "image"),
    Feature("foreground_fraction", "numerical", "image"),
    Feature("snr", "numerical", "image"),
    Feature("noise", "numerical", "image"),
    Feature("sharpness", "numerical", "image"),
    Feature("bias_cv", "numerical", "image"),
    Feature("probability", "numerical", "output"),
    Feature("entropy", "numerical", "output"),
    *(Feature(f"emb_{i}", "numerical", "embedding") for i in range(N_EMBEDDING)),
    Feature("age_band", "categorical", "segment"),
    Feature("sex", "categorical", "segment"),
)
FEATURE_NAMES = tuple(f.name for f in FEATURES)
BY_NAME = {f.name: f for f in FEATURES}
#: what a record carries besides its features
ENVELOPE = ("record_id", "schema", "site", "bundle", "bundle_version", "processed_at")
AGE_BANDS = ("<20", "20-29", "30-39", "40-49", "50-59", "60-69", "70-79", "80+")


# ------------------------------------------------------------------------------------------------
# groups
# ------------------------------------------------------------------------------------------------


def acquisition_features(header: Any, n_slices: int, dataset: Any = None) -> dict[str, Any]:
    """From a :class:`~shiftguard.dicom.scan.SliceHeader` (any slice of the series) and, for the
    CT parameters (kVp, reconstruction kernel), the slice's pydicom ``dataset`` when given."""
    spacing = header.pixel_spacing or (None, None)
    kvp = kernel = None
    if dataset is not None:
        kvp = _number(dataset.get("KVP"))
        raw = dataset.get("ConvolutionKernel")
        if raw is not None and str(raw).strip():
            parts = (
                [str(v) for v in raw]
                if not isinstance(raw, str | bytes) and hasattr(raw, "__iter__")
                else [str(raw)]
            )
            kernel = _category("\\".join(parts))
    return {
        "manufacturer": _category(header.manufacturer),
        "scanner_model": _category(header.model),
        "field_strength": header.field_strength,
        "slice_thickness": header.slice_thickness,
        "pixel_spacing_row": spacing[0],
        "pixel_spacing_col": spacing[1],
        "rows": header.rows,
        "cols": header.cols,
        "n_slices": n_slices,
        "repetition_time": header.repetition_time,
        "echo_time": header.echo_time,
        "flip_angle": header.flip_angle,
        "kvp": kvp,
        "convolution_kernel": kernel or "unknown",
    }


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def image_features(
    volume: np.ndarray, inside: np.ndarray | None, stats: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Intensity statistics (``stats``: :func:`~shiftguard.data.volume.volume_stats` when already
    computed) and three scale-free texture indicators on the ``(X, Y, Z)`` canonical volume:

    * ``noise``: Immerkær's estimate of the noise standard deviation (a Laplacian-difference mask
      on each axial slice, mean absolute response), over the 1-99 % intensity range;
    * ``sharpness``: mean absolute gradient in the foreground over the same range;
    * ``bias_cv``: coefficient of variation of the foreground's mean over 4x4x4 blocks, a
      low-frequency (bias field) inhomogeneity indicator.

    The three are computed on every k-th voxel (k chosen so that at most ``TEXTURE_VOXELS``
    remain), identically for the reference and live series.
    """
    if stats is None:
        from shiftguard.data.volume import volume_stats

        stats = volume_stats(volume, inside)
    out = {k: stats.get(k) for k in ("mean", "std", "p01", "p50", "p99", "foreground_fraction")}
    out["snr"] = stats.get("snr")
    p01, p99 = stats.get("p01"), stats.get("p99")
    scale = (p99 - p01) if p01 is not None and p99 is not None else None
    # texture on a grid of at most ~TEXTURE_VOXELS voxels (every k-th voxel along each axis): the
    # same subsampling for the reference and live data, and about 1 ms per series
    step = max(1, math.ceil((volume.size / TEXTURE_VOXELS) ** (1 / 3)))
    v = np.ascontiguousarray(volume[::step, ::step, ::step], dtype=np.float32)
    if inside is not None:
        inside = np.ascontiguousarray(inside[::step, ::step, ::step])
    if scale is None or scale <= 0 or min(v.shape) < 3:
        return {**out, "noise": None, "sharpness": None, "bias_cv": None}
    # Immerkaer (1996): mask [[1,-2,1],[-2,4,-2],[1,-2,1]] per axial (x, y) slice
    lap = (
        v[:-2, :-2] - 2 * v[1:-1, :-2] + v[2:, :-2]
        - 2 * v[:-2, 1:-1] + 4 * v[1:-1, 1:-1] - 2 * v[2:, 1:-1]
        + v[:-2, 2:] - 2 * v[1:-1, 2:] + v[2:, 2:]
    )  # fmt: skip
    noise = math.sqrt(math.pi / 2) * float(np.abs(lap).mean()) / 6.0
    fg = v > (float(p01) + 0.1 * scale)  # type: ignore[arg-type]  # set when scale is
    if inside is not None:
        fg &= inside
    core = fg[:-1, :-1, :-1]
    n_core = int(core.sum())
    sharpness = None
    if n_core:
        base = v[:-1, :-1, :-1]
        grad = np.abs(v[1:, :-1, :-1] - base)
        grad += np.abs(v[:-1, 1:, :-1] - base)
        grad += np.abs(v[:-1, :-1, 1:] - base)
        sharpness = float(grad[core].sum(dtype=np.float64)) / n_core / scale
    out.update(noise=noise / scale, sharpness=sharpness, bias_cv=_bias_cv(v, fg))
    return out


def _bias_cv(v: np.ndarray, fg: np.ndarray, blocks: int = 4) -> float | None:
    """CV of the foreground mean over ``blocks``^3 blocks that are mostly foreground."""
    size = [n - n % blocks for n in v.shape]
    if min(size) == 0:
        return None
    shape = (blocks, size[0] // blocks, blocks, size[1] // blocks, blocks, size[2] // blocks)
    vv = v[: size[0], : size[1], : size[2]].reshape(shape)
    ff = fg[: size[0], : size[1], : size[2]].reshape(shape)
    count = ff.sum(axis=(1, 3, 5))
    total = (vv * ff).sum(axis=(1, 3, 5), dtype=np.float64)
    keep = count > 0.5 * (vv.size // blocks**3)
    if keep.sum() < 2:
        return None
    m = total[keep] / count[keep]
    return float(m.std() / m.mean()) if m.mean() > 0 else None


def output_features(
    probability: float, projection: Sequence[float] | np.ndarray | None
) -> dict[str, Any]:
    """Probability, binary predictive entropy (bits) and the embedding's projection."""
    p = min(max(float(probability), 1e-12), 1 - 1e-12)
    entropy = -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
    out: dict[str, Any] = {"probability": float(probability), "entropy": entropy}
    for i in range(N_EMBEDDING):
        out[f"emb_{i}"] = (
            float(projection[i]) if projection is not None and i < len(projection) else None
        )
    return out


def segment_features(header: Any) -> dict[str, Any]:
    """Age band and sex: the coarse categories shadow evaluation and drift reports slice by."""
    from shiftguard.data.canonical import parse_patient_age

    age = parse_patient_age(header.patient_age, header.patient_birth_date, header.study_date)
    sex = (header.patient_sex or "").strip().upper()
    return {"age_band": age_band(age), "sex": sex if sex in ("F", "M", "O") else "unknown"}


def age_band(age: float | None) -> str:
    """A decade band (``"<20"`` ... ``"80+"``); ``"unknown"`` when the age is not known.

    >>> age_band(63.5), age_band(19), age_band(91), age_band(None)
    ('60-69', '<20', '80+', 'unknown')
    """
    if age is None or not math.isfinite(age) or age < 0:
        return "unknown"
    if age < 20:
        return "<20"
    if age >= 80:
        return "80+"
    low = int(age // 10) * 10
    return f"{low}-{low + 9}"


def _category(text: str | None) -> str:
    """A vendor or model name as a category: trimmed, at most 64 characters, never empty."""
    value = " ".join((text or "").split())[:64]
    return value or "unknown"


# ------------------------------------------------------------------------------------------------
# the embedding's projection
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Projection:
    """A fixed PCA basis for the penultimate features (fitted once, on the training data)."""

    mean: np.ndarray  # (D,)
    components: np.ndarray  # (K, D), rows orthonormal
    explained: np.ndarray  # (K,) share of variance each component explains

    @classmethod
    def fit(cls, embeddings: np.ndarray, k: int = N_EMBEDDING) -> Projection:
        x = np.asarray(embeddings, dtype=np.float64)
        mean = x.mean(axis=0)
        _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
        k = min(k, vt.shape[0])
        # a deterministic sign: each component's largest loading is positive
        signs = np.sign(vt[np.arange(k), np.abs(vt[:k]).argmax(axis=1)])
        signs[signs == 0] = 1
        variance = s**2
        return cls(mean, vt[:k] * signs[:, None], variance[:k] / max(variance.sum(), 1e-12))

    def project(self, embedding: np.ndarray) -> np.ndarray:
        return (np.asarray(embedding, dtype=np.float64).reshape(-1) - self.mean) @ self.components.T

    def to_json(self) -> dict[str, Any]:
        return {
            "mean": [round(float(v), 8) for v in self.mean],
            "components": [[round(float(v), 8) for v in row] for row in self.components],
            "explained_variance_ratio": [round(float(v), 6) for v in self.explained],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Projection:
        return cls(
            np.asarray(data["mean"], dtype=np.float64),
            np.asarray(data["components"], dtype=np.float64),
            np.asarray(data.get("explained_variance_ratio", []), dtype=np.float64),
        )


# ------------------------------------------------------------------------------------------------
# records
# ------------------------------------------------------------------------------------------------


def record_id(key: bytes, site: str, bundle: str, version: str, series_uid: str) -> str:
    """A keyed one-way id: HMAC-SHA256 under the site's secret ``key`` (32 hex digits).

    The same series seen twice by the same site and bundle has the same id (the collector ignores
    the duplicate); without the key, nobody holding the series UID can compute the id and so
    link a record to a study, and the UID cannot be read back from it.

    Raises:
        ValueError: ``key`` is shorter than 16 bytes.
    """
    if len(key) < 16:
        raise ValueError(f"record_id: the key is {len(key)} bytes; use at least 16 bytes")
    text = f"shiftguard-record|{site}|{bundle}|{version}|{series_uid}"
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()[:32]


def make_record(
    features: Mapping[str, Any],
    *,
    site: str,
    bundle: str,
    bundle_version: str,
    series_uid: str,
    processed_at: str,
    record_key: bytes,
) -> dict[str, Any]:
    """A record as it leaves the runner: the envelope and exactly :data:`FEATURE_NAMES`; its id
    is keyed with the site's secret ``record_key`` (:func:`record_id`)."""
    record: dict[str, Any] = {
        "record_id": record_id(record_key, site, bundle, bundle_version, series_uid),
        "schema": SCHEMA_VERSION,
        "site": site,
        "bundle": bundle,
        "bundle_version": str(bundle_version),
        "processed_at": processed_at,
    }
    for name in FEATURE_NAMES:
        value = features.get(name)
        record[name] = clean_value(value, BY_NAME[name].kind)
    return record


def clean_value(value: Any, kind: str) -> Any:
    """A feature's value as a record holds it: a categorical one as text (``unknown`` when
    missing), a numerical one rounded to 6 decimals (None when missing or not finite).

    >>> clean_value("", "categorical"), clean_value("1.23456789", "numerical"), clean_value("nan", "numerical")
    ('unknown', 1.234568, None)
    """
    if kind == "categorical":
        return "unknown" if value is None or value == "" else str(value)
    if value is None or value == "":
        return None
    number = float(value)
    return round(number, 6) if math.isfinite(number) else None
