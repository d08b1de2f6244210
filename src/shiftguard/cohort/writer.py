"""Write a rendered series as real DICOM files (one MR Image Storage instance per slice) and its mask.

Layout under the cohort's folder (like a PACS export)::

    dicom/<PatientID>/<SeriesInstanceUID>/<InstanceNumber:04d>.dcm
    ground_truth/masks/<PatientID>.nii.gz

Every UID is a ``2.25.<UUID>`` UID (ISO/IEC 9834-8) of a name-based (version 5) UUID of the config's
digest, the seed, the patient, the UID's kind and index, so the same seed and config give the same UIDs
and different cohorts never share one. (``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)``
cannot be used: with ``prefix=None`` pydicom ignores the entropy and returns a random UUID.) Dates and times come from the subject's plan, never the clock.
"""

from __future__ import annotations

import datetime as dt
import gzip
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom import dcmwrite
from pydicom.charset import default_encoding
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_data_element, write_file_meta_info
from pydicom.pixels import get_encoder
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
)
from pydicom.valuerep import format_number_as_ds

from shiftguard import __version__
from shiftguard.cohort import scanner
from shiftguard.cohort.demographics import SubjectPlan
from shiftguard.cohort.geometry import AcquisitionGeometry
from shiftguard.config.schema import ScannerProfile
from shiftguard.errors import UnsupportedTransferSyntaxError

#: ``ScannerProfile.transfer_syntax`` names and the transfer syntax each one writes
TRANSFER_SYNTAXES: Mapping[str, UID] = {
    "explicit_vr_little_endian": ExplicitVRLittleEndian,
    "rle_lossless": RLELossless,
    "jpeg_ls_lossless": JPEGLSLossless,
    "jpeg2000_lossless": JPEG2000Lossless,
}
#: encoder plugins tried in this order (pinned, so the bytes do not depend on pydicom's choice)
PLUGIN_PREFERENCE: Mapping[UID, tuple[str, ...]] = {
    RLELossless: ("pylibjpeg", "pydicom", "gdcm"),
    JPEGLSLossless: ("pyjpegls",),
    JPEG2000Lossless: ("pylibjpeg",),
}
#: OpenJPEG's default 6 resolution levels need slices at least this many pixels wide and high
J2K_MIN_SIZE = 32
SERIES_NUMBER = 3
GYROMAGNETIC_MHZ_PER_T = 42.577478
IMPLEMENTATION_VERSION = f"SHIFTGUARD_{__version__}"[:16]
#: namespace of the cohort's name-based UUIDs
UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://shiftguard.invalid/cohort")


def deterministic_uid(*parts: str) -> UID:
    """A ``2.25.<UUID>`` UID from a version-5 UUID of ``parts``.

    >>> deterministic_uid("a", "b") == deterministic_uid("a", "b") != deterministic_uid("ab")
    True
    """
    return UID(f"2.25.{uuid.uuid5(UID_NAMESPACE, chr(31).join(parts)).int}")


@dataclass(frozen=True)
class SeriesUIDs:
    """The UIDs of one subject's study and series (instances are derived per slice)."""

    study: str
    series: str
    frame_of_reference: str
    entropy: tuple[str, ...]

    def instance(self, number: int) -> UID:
        """SOPInstanceUID of instance ``number`` (1-based)."""
        return deterministic_uid(*self.entropy, "instance", str(number))


def series_uids(config_digest: str, seed: int, patient_id: str) -> SeriesUIDs:
    """Deterministic UIDs for a subject.

    Args:
        config_digest: sha256 of the cohort config's canonical JSON.
        seed: the cohort seed.
        patient_id: the subject's PatientID.
    """
    entropy = (config_digest, str(seed), patient_id)

    def uid(kind: str) -> str:
        return deterministic_uid(*entropy, kind, "0")

    return SeriesUIDs(
        study=uid("study"),
        series=uid("series"),
        frame_of_reference=uid("frame_of_reference"),
        entropy=entropy,
    )


def check_transfer_syntax(profile_name: str, profile: ScannerProfile) -> str:
    """Check that the profile's transfer syntax is known and can be encoded here.

    A compressed syntax is tried on a test slice of the profile's matrix and bit depth, and decoded
    back.

    Args:
        profile_name: the profile's key in ``CohortConfig.scanners`` (for the message).
        profile: the profile.

    Returns:
        The encoder plugin to use (``""`` for the uncompressed syntax).

    Raises:
        UnsupportedTransferSyntaxError: the name is unknown, no encoder plugin is installed, or the
            encoder fails or is not lossless; the message names the profile and what to do.
    """
    name = profile.transfer_syntax
    where = f"cohort.scanners.{profile_name}.transfer_syntax"
    if name not in TRANSFER_SYNTAXES:
        raise UnsupportedTransferSyntaxError(
            f"{where}: unknown transfer syntax {name!r}; choose one of {', '.join(TRANSFER_SYNTAXES)}"
        )
    uid = TRANSFER_SYNTAXES[name]
    if not uid.is_compressed:
        return ""
    encoder = get_encoder(uid)
    plugins = [p for p in PLUGIN_PREFERENCE.get(uid, ()) if p in encoder.available_plugins]
    if not encoder.is_available or not plugins:
        missing = "; ".join(encoder.missing_dependencies) or "no encoder plugin"
        raise UnsupportedTransferSyntaxError(
            f"{where}: {name} ({uid.name}) cannot be encoded here ({missing}); install the "
            "encoder's package or set the profile's transfer_syntax to explicit_vr_little_endian"
        )
    plugin = plugins[0]
    top = 2**profile.bits_stored - 1
    rows, columns = profile.matrix
    test = np.arange(rows * columns, dtype=np.int64).reshape(rows, columns) * 37 % (top + 1)
    test = test.astype(np.uint16)
    ds = Dataset()
    _pixel_module(ds, profile, rows, columns)
    try:
        ds.compress(uid, test, encoding_plugin=plugin, generate_instance_uid=False)
        back = ds.pixel_array
    except Exception as exc:
        hint = ""
        if uid == JPEG2000Lossless and min(rows, columns) < J2K_MIN_SIZE:
            hint = (
                f" (OpenJPEG needs slices of at least {J2K_MIN_SIZE} x {J2K_MIN_SIZE} pixels; "
                f"the profile's matrix is {rows} x {columns})"
            )
        raise UnsupportedTransferSyntaxError(
            f"{where}: encoding {name} ({uid.name}) with the {plugin!r} plugin failed{hint}: "
            f"{exc}; set the profile's transfer_syntax to explicit_vr_little_endian or fix the "
            "encoder install"
        ) from exc
    if not np.array_equal(back, test):
        raise UnsupportedTransferSyntaxError(
            f"{where}: {name} with the {plugin!r} plugin did not round-trip losslessly"
        )
    return plugin


def _pixel_module(ds: Dataset, profile: ScannerProfile, rows: int, columns: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = profile.bits_stored
    ds.HighBit = profile.bits_stored - 1
    ds.PixelRepresentation = 0


def _ds(value: float) -> str:
    """A DS string of at most 16 characters, rounded to 1e-6 and without a negative zero."""
    v = round(float(value), 6)
    return format_number_as_ds(0.0 if v == 0 else v)


def _da(day: dt.date) -> str:
    return day.strftime("%Y%m%d")


def _tm(moment: dt.datetime) -> str:
    return moment.strftime("%H%M%S")


def station_name(site: str) -> str:
    """A StationName for a site: its initials and ``MR1``, e.g. ``NGHMR1``."""
    initials = "".join(w[0] for w in site.split() if w[:1].isalpha()).upper()
    return f"{initials[:10]}MR1"


#: (ScanningSequence, SequenceVariant) of each sequence family
SEQUENCE_TERMS: Mapping[str, tuple[list[str], list[str]]] = {
    "spgr": (["GR"], ["SP"]),
    "ir_gre": (["GR", "IR"], ["SP", "MP"]),
    "se": (["SE"], ["NONE"]),
    "tse": (["SE"], ["SK"]),
    "flair": (["SE", "IR"], ["SK"]),
}


def sequence_elements(profile: ScannerProfile) -> dict[str, Any]:
    """The acquisition elements that describe how the pixels were made (they must agree with them).

    ScanningSequence / SequenceVariant from the family, ScanOptions ``PFP`` for partial Fourier,
    MRAcquisitionType, InversionTime, AcquisitionMatrix (frequency rows, frequency columns, phase
    rows, phase columns) and NumberOfPhaseEncodingSteps from the acquisition matrix, phase-encoding
    direction and partial Fourier.
    """
    scanning, variant = SEQUENCE_TERMS[profile.sequence]
    acq_rows, acq_cols = profile.acquired
    if profile.phase_encoding_direction == "ROW":  # phase steps across columns
        matrix = [acq_rows, 0, 0, acq_cols]
        lines = acq_cols
    else:
        matrix = [0, acq_cols, acq_rows, 0]
        lines = acq_rows
    out: dict[str, Any] = {
        "ScanningSequence": scanning,
        "SequenceVariant": variant,
        "ScanOptions": "PFP" if profile.partial_fourier < 1.0 else "",
        "MRAcquisitionType": profile.acquisition_type,
        "AcquisitionMatrix": matrix,
        "NumberOfPhaseEncodingSteps": round(lines * profile.partial_fourier),
    }
    if profile.inversion_time is not None and profile.sequence in ("ir_gre", "flair"):
        out["InversionTime"] = _ds(profile.inversion_time)
    return out


def _common_elements(
    plan: SubjectPlan, profile: ScannerProfile, geometry: AcquisitionGeometry, uids: SeriesUIDs
) -> dict[str, Any]:
    """Elements every slice of the series shares, keyword -> value (in no particular order)."""
    study = plan.study_datetime
    series = study + dt.timedelta(minutes=4)
    content = series + dt.timedelta(minutes=6)
    wc, ww = scanner.window(profile)
    rows, columns = geometry.rows, geometry.columns
    return {
        "SpecificCharacterSet": "ISO_IR 100",
        "ImageType": ["ORIGINAL", "PRIMARY", "OTHER"],
        "InstanceCreationDate": _da(content.date()),
        "InstanceCreationTime": _tm(content),
        "SOPClassUID": MRImageStorage,
        "StudyDate": _da(study.date()),
        "SeriesDate": _da(series.date()),
        "AcquisitionDate": _da(series.date()),
        "ContentDate": _da(content.date()),
        "StudyTime": _tm(study),
        "SeriesTime": _tm(series),
        "AcquisitionTime": _tm(series),
        "ContentTime": _tm(content),
        "AccessionNumber": plan.accession_number,
        "Modality": "MR",
        "Manufacturer": profile.manufacturer,
        "InstitutionName": plan.site,
        "ReferringPhysicianName": "",
        "StationName": station_name(plan.site),
        "StudyDescription": "MRI BRAIN",
        "SeriesDescription": profile.series_description,
        "ManufacturerModelName": profile.model,
        "PatientName": f"Synthetic^Subject{plan.patient_id[2:]}",
        "PatientID": plan.patient_id,
        "PatientBirthDate": _da(plan.birth_date),
        "PatientSex": plan.sex,
        "PatientAge": f"{min(plan.age, 999):03d}Y",
        "BodyPartExamined": "BRAIN",
        **sequence_elements(profile),
        "SequenceName": profile.sequence_name,
        "AngioFlag": "N",
        "SliceThickness": _ds(geometry.slice_thickness),
        "RepetitionTime": _ds(profile.repetition_time),
        "EchoTime": _ds(profile.echo_time),
        "NumberOfAverages": _ds(profile.averages),
        "ImagingFrequency": _ds(GYROMAGNETIC_MHZ_PER_T * profile.field_strength),
        "ImagedNucleus": "1H",
        "EchoNumbers": "1",
        "MagneticFieldStrength": _ds(profile.field_strength),
        "SpacingBetweenSlices": _ds(geometry.slice_spacing),
        "EchoTrainLength": str(profile.echo_train_length),
        "PercentSampling": _ds(100.0 * profile.partial_fourier),
        "PercentPhaseFieldOfView": "100",
        "PixelBandwidth": _ds(profile.pixel_bandwidth),
        "SoftwareVersions": profile.software_version,
        "ProtocolName": profile.series_description,
        "InPlanePhaseEncodingDirection": profile.phase_encoding_direction,
        "FlipAngle": _ds(profile.flip_angle),
        "PatientPosition": "HFS",
        "StudyInstanceUID": uids.study,
        "SeriesInstanceUID": uids.series,
        "StudyID": "1",
        "SeriesNumber": SERIES_NUMBER,
        "AcquisitionNumber": 1,
        "ImageOrientationPatient": [_ds(v) for v in geometry.orientation],
        "FrameOfReferenceUID": uids.frame_of_reference,
        "PositionReferenceIndicator": "",
        "ImagesInAcquisition": geometry.n_slices,
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "Rows": rows,
        "Columns": columns,
        "PixelSpacing": [_ds(geometry.row_spacing), _ds(geometry.col_spacing)],
        "BitsAllocated": 16,
        "BitsStored": profile.bits_stored,
        "HighBit": profile.bits_stored - 1,
        "PixelRepresentation": 0,
        "WindowCenter": _ds(wc),
        "WindowWidth": _ds(ww),
        "RescaleIntercept": _ds(profile.rescale_intercept),
        "RescaleSlope": _ds(profile.rescale_slope),
        "RescaleType": "US",
    }


def write_series(
    plan: SubjectPlan,
    profile: ScannerProfile,
    geometry: AcquisitionGeometry,
    stored: NDArray[np.uint16],
    uids: SeriesUIDs,
    dicom_root: Path,
    encoding_plugin: str = "",
) -> list[Path]:
    """Write one file per slice under ``dicom_root/<PatientID>/<SeriesInstanceUID>/``.

    Args:
        plan: the subject.
        profile: the scanner profile (vendor tags, storage).
        geometry: the acquisition grid.
        stored: ``(K, R, C)`` uint16 stored values.
        uids: the subject's UIDs.
        dicom_root: the cohort's ``dicom`` folder.
        encoding_plugin: from :func:`check_transfer_syntax`.

    Returns:
        The files written, in instance order.
    """
    uid = TRANSFER_SYNTAXES[profile.transfer_syntax]
    folder = dicom_root / plan.patient_id / uids.series
    folder.mkdir(parents=True, exist_ok=True)
    common = Dataset()
    for keyword, value in _common_elements(plan, profile, geometry, uids).items():
        setattr(common, keyword, value)
    pixels = np.ascontiguousarray(stored, dtype="<u2")
    # Uncompressed slices differ only in five elements: the shared ones are encoded once and each
    # file is spliced from bytes (the same bytes dcmwrite writes; a test holds the two equal)
    shared = None if uid.is_compressed else _SharedElements(common)
    paths = []
    for k in range(geometry.n_slices):
        number = k + 1
        sop_uid = uids.instance(number)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION
        ds = Dataset()
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [_ds(v) for v in geometry.position(k)]
        ds.SliceLocation = _ds(geometry.slice_location(k))
        path = folder / f"{number:04d}.dcm"
        if shared is not None:
            ds.PixelData = pixels[k].tobytes()
            ds["PixelData"].VR = "OW"
            path.write_bytes(shared.file_bytes(meta, ds))
        else:
            ds.file_meta = meta
            ds.update(common)  # shares the (never mutated) elements
            ds.compress(
                uid, pixels[k], encoding_plugin=encoding_plugin, generate_instance_uid=False
            )
            dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


class _SharedElements:
    """A series' shared elements encoded once, in Explicit VR Little Endian, to splice each slice's
    file from: preamble, ``DICM``, the file meta group (pydicom's :func:`write_file_meta_info`),
    then the shared and the slice's own elements merged in tag order, each encoded by pydicom's
    :func:`write_data_element` with the shared Specific Character Set, as
    ``dcmwrite(path, ds, enforce_file_format=True)`` encodes them (dcmwrite re-encodes the 78
    shared elements per slice: 0.132 s against 0.058 s to write an uncompressed subject's series)."""

    def __init__(self, common: Dataset) -> None:
        correct_ambiguous_vr(common, True)  # as write_dataset does for a new dataset
        self.encodings = common.get("SpecificCharacterSet", default_encoding)
        self.elements = self._encode(common)

    def _encode(self, ds: Dataset) -> list[tuple[int, bytes]]:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        out = []
        for tag in sorted(ds.keys()):
            if tag.element == 0 and tag.group > 6:  # group lengths: write_dataset skips them
                continue
            start = fp.tell()
            write_data_element(fp, ds[tag], self.encodings)
            out.append((int(tag), fp.getvalue()[start:]))
        return out

    def file_bytes(self, meta: FileMetaDataset, own: Dataset) -> bytes:
        """One file: ``meta`` and the shared elements with ``own`` (the slice's elements, none
        of them shared)."""
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        fp.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fp, meta, enforce_standard=True)
        merged = sorted(self.elements + self._encode(own), key=lambda item: item[0])
        return fp.getvalue() + b"".join(chunk for _, chunk in merged)


def write_mask(mask: NDArray[np.uint8], geometry: AcquisitionGeometry, path: Path) -> None:
    """Write the lesion mask as gzipped NIfTI-1 in the series' voxel grid, byte-deterministically.

    Args:
        mask: ``(K, R, C)`` uint8; stored as ``(C, R, K)`` with :meth:`AcquisitionGeometry.nifti_affine`.
        geometry: the series' grid.
        path: the ``.nii.gz`` to write.
    """
    import nibabel as nib

    affine = geometry.nifti_affine()
    img = nib.Nifti1Image(np.ascontiguousarray(mask.transpose(2, 1, 0), dtype=np.uint8), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=6, mtime=0))
