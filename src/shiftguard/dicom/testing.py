"""A tiny writer of synthetic DICOM series, for tests and benchmarks.

It writes plain, standard-conforming single-frame images (MR or CT image storage) whose geometry is
fully controlled: orientation, spacing, origin, per-slice rescale, transfer syntax. Tests then break
them on purpose (shuffle names, lie in InstanceNumber, drop or duplicate a slice) to check that ingest
notices. The pixel content is an asymmetric ramp pattern, so flips and transpositions are visible.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> spec = SeriesSpec(rows=8, cols=6, n_slices=4)
    >>> paths = write_series(Path(tempfile.mkdtemp()), spec)
    >>> len(paths)
    4
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

__all__ = [
    "SeriesSpec",
    "make_datasets",
    "phantom",
    "save_dataset",
    "slice_positions",
    "write_series",
]

_UID_PREFIX = "1.2.826.0.1.3680043.10.1453."  # a private test root


@dataclass
class SeriesSpec:
    """Geometry and storage of one synthetic series.

    ``iop`` holds the row and column direction cosines (LPS); slices advance along their cross
    product by ``slice_spacing`` from ``origin`` (the ImagePositionPatient of slice 0). ``pixel_spacing``
    is ``(row spacing, column spacing)`` as in DICOM. ``rescale_slope``/``rescale_intercept`` are one
    value or one per slice.
    """

    rows: int = 16
    cols: int = 12
    n_slices: int = 10
    pixel_spacing: tuple[float, float] = (1.0, 1.25)
    slice_spacing: float = 2.0
    slice_thickness: float | None = None
    iop: tuple[float, float, float, float, float, float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    origin: tuple[float, float, float] = (-10.0, -12.0, -8.0)
    modality: str = "MR"
    bits_stored: int = 12
    signed: bool = False
    rescale_slope: float | Sequence[float] = 1.0
    rescale_intercept: float | Sequence[float] = 0.0
    patient_id: str = "SYN001"
    patient_age: str = "045Y"
    patient_sex: str = "F"
    manufacturer: str = "ACME"
    model: str = "Phantom 3T"
    institution: str = "Test Hospital"
    series_description: str = "T1 synthetic"
    study_uid: str = field(default_factory=lambda: generate_uid(_UID_PREFIX))
    series_uid: str = field(default_factory=lambda: generate_uid(_UID_PREFIX))
    frame_of_reference_uid: str = field(default_factory=lambda: generate_uid(_UID_PREFIX))

    @property
    def normal(self) -> np.ndarray:
        """``(3,)`` unit slice normal (LPS)."""
        r = np.asarray(self.iop[:3], dtype=float)
        c = np.asarray(self.iop[3:], dtype=float)
        n = np.cross(r, c)
        return np.asarray(n / np.linalg.norm(n))


def slice_positions(spec: SeriesSpec) -> np.ndarray:
    """``(n_slices, 3)`` ImagePositionPatient of every slice (LPS mm)."""
    k = np.arange(spec.n_slices, dtype=float)[:, None]
    return np.asarray(spec.origin, dtype=float)[None, :] + k * spec.slice_spacing * spec.normal


def phantom(spec: SeriesSpec, seed: int = 0) -> np.ndarray:
    """Stored values ``(n_slices, rows, cols)``: an asymmetric ramp plus a little noise.

    Values differ along every axis and are never symmetric, so a flip, a transposition or a slice
    out of order changes them.
    """
    k, r, c = np.meshgrid(
        np.arange(spec.n_slices), np.arange(spec.rows), np.arange(spec.cols), indexing="ij"
    )
    rng = np.random.default_rng(seed)
    values = 100 + 7 * c + 3 * r * r / max(spec.rows, 1) + 11 * k + rng.integers(0, 5, k.shape)
    top = (1 << (spec.bits_stored - 1)) - 1 if spec.signed else (1 << spec.bits_stored) - 1
    values = np.clip(values, -top - 1 if spec.signed else 0, top)
    return values.astype(np.int16 if spec.signed else np.uint16)


def _per_slice(value: float | Sequence[float], n: int) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise ValueError(f"expected {n} per-slice values, got {len(values)}")
    return values


def make_datasets(spec: SeriesSpec, stored: np.ndarray | None = None) -> list[Dataset]:
    """One single-frame image dataset per slice (with File Meta), in slice order.

    Args:
        spec: The series.
        stored: ``(n_slices, rows, cols)`` stored values; default :func:`phantom`.

    Returns:
        Datasets ready for :func:`save_dataset`; ``InstanceNumber`` is ``k + 1``.
    """
    stored = phantom(spec) if stored is None else stored
    positions = slice_positions(spec)
    slopes = _per_slice(spec.rescale_slope, spec.n_slices)
    intercepts = _per_slice(spec.rescale_intercept, spec.n_slices)
    sop_class = CTImageStorage if spec.modality == "CT" else MRImageStorage
    out = []
    for k in range(spec.n_slices):
        sop = generate_uid(_UID_PREFIX)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop
        ds.StudyDate = "20240131"
        ds.StudyTime = "101500"
        ds.AccessionNumber = "ACC001"
        ds.Modality = spec.modality
        ds.Manufacturer = spec.manufacturer
        ds.InstitutionName = spec.institution
        ds.StationName = "STATION1"
        ds.SeriesDescription = spec.series_description
        ds.ManufacturerModelName = spec.model
        ds.PatientName = "Synthetic^Subject"
        ds.PatientID = spec.patient_id
        ds.PatientBirthDate = "19790101"
        ds.PatientSex = spec.patient_sex
        ds.PatientAge = spec.patient_age
        ds.SliceThickness = spec.slice_thickness or spec.slice_spacing
        if spec.modality == "MR":
            ds.RepetitionTime = 2300
            ds.EchoTime = 2.98
            ds.MagneticFieldStrength = 3
            ds.FlipAngle = 9
        ds.StudyInstanceUID = spec.study_uid
        ds.SeriesInstanceUID = spec.series_uid
        ds.SeriesNumber = 3
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [round(float(v), 6) for v in positions[k]]
        ds.ImageOrientationPatient = [round(float(v), 8) for v in spec.iop]
        ds.FrameOfReferenceUID = spec.frame_of_reference_uid
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = spec.rows
        ds.Columns = spec.cols
        ds.PixelSpacing = list(spec.pixel_spacing)
        ds.BitsAllocated = 16
        ds.BitsStored = spec.bits_stored
        ds.HighBit = spec.bits_stored - 1
        ds.PixelRepresentation = 1 if spec.signed else 0
        ds.RescaleIntercept = intercepts[k]
        ds.RescaleSlope = slopes[k]
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        out.append(ds)
    return out


def save_dataset(ds: Dataset, path: Path, transfer_syntax: str | None = None) -> Path:
    """Write one dataset as a DICOM Part 10 file, compressing it first when asked.

    Args:
        ds: A dataset from :func:`make_datasets` (modified in place when compressed).
        path: Output file; folders are created.
        transfer_syntax: ``None`` keeps explicit VR little endian; implicit VR little endian and
            the lossless RLE, JPEG-LS and JPEG 2000 syntaxes (whose encoders are installed) work.

    Returns:
        ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if transfer_syntax is not None and transfer_syntax != ds.file_meta.TransferSyntaxUID:
        if transfer_syntax == ImplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        else:
            ds.compress(transfer_syntax, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(
    folder: Path,
    spec: SeriesSpec,
    *,
    stored: np.ndarray | None = None,
    name: Callable[[int], str] = lambda k: f"IM{k:04d}.dcm",
    transfer_syntax: str | None = None,
) -> list[Path]:
    """Write a whole series into ``folder`` (one file per slice).

    Args:
        folder: Output folder.
        spec: The series.
        stored: Stored values ``(n_slices, rows, cols)``; default :func:`phantom`.
        name: File name of slice ``k``.
        transfer_syntax: See :func:`save_dataset`.

    Returns:
        The written paths, in slice order.
    """
    return [
        save_dataset(ds, folder / name(k), transfer_syntax)
        for k, ds in enumerate(make_datasets(spec, stored))
    ]
