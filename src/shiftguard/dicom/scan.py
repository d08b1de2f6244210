"""Header-only scan of a DICOM tree: every file becomes slice headers or a quarantine entry.

The scan never decodes pixels and never raises on bad input. Each file is read once by the
walker of :mod:`shiftguard.dicom.binary` (the first 64 KiB normally hold the whole header), which also
records where *Pixel Data* starts so the pixel pass can read native pixels without re-parsing. Files
the walker does not handle (big endian, deflate, enhanced multi-frame, files without a preamble
that it cannot place) are read with ``pydicom.dcmread(force=True)``; both paths build the same
:class:`SliceHeader` through one converter, so they cannot drift apart.

Example:
    >>> from pathlib import Path
    >>> headers, issues = scan_files([])
    >>> headers, issues
    ([], [])
"""

from __future__ import annotations

import functools
import gc
import logging
import math
import os
import struct
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from shiftguard.dicom import binary
from shiftguard.dicom.quarantine import QuarantineEntry
from shiftguard.errors import UnreadableFileError

log = logging.getLogger(__name__)

__all__ = [
    "NON_IMAGE_SOP_CLASSES",
    "SliceHeader",
    "iter_files",
    "list_files",
    "read_headers",
    "scan_files",
]

#: SOP classes that never hold an image volume (prefix match), with a human name for the report.
NON_IMAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.481.5": "RT Plan",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT Structure Set",
    "1.2.840.10008.5.1.4.1.1.481.4": "RT Beams Treatment Record",
    "1.2.840.10008.5.1.4.1.1.481.6": "RT Brachy Treatment Record",
    "1.2.840.10008.5.1.4.1.1.481.7": "RT Treatment Summary Record",
    "1.2.840.10008.5.1.4.1.1.481.8": "RT Ion Plan",
    "1.2.840.10008.5.1.4.1.1.481.9": "RT Ion Beams Treatment Record",
    "1.2.840.10008.5.1.4.1.1.88.": "Structured Report",
    "1.2.840.10008.5.1.4.1.1.9.": "Waveform",
    "1.2.840.10008.5.1.4.1.1.11.": "Presentation State",
    "1.2.840.10008.5.1.4.1.1.104.": "Encapsulated Document",
    "1.2.840.10008.5.1.4.1.1.66.1": "Spatial Registration",
    "1.2.840.10008.5.1.4.1.1.66.2": "Spatial Fiducials",
    "1.2.840.10008.5.1.4.1.1.66.3": "Deformable Spatial Registration",
    "1.2.840.10008.5.1.4.1.1.66.5": "Surface Segmentation",
    "1.2.840.10008.5.1.4.1.1.67": "Real World Value Mapping",
    "1.2.840.10008.5.1.4.1.1.68.": "Surface Scan",
    "1.2.840.10008.5.1.4.1.1.66": "Raw Data",
    "1.2.840.10008.5.1.4.34.": "RT Radiation Record",
    "1.2.840.10008.5.1.1.": "Print/Management object",
}

_FIX_NOT_IMAGE = "nothing to do if the folder is meant to hold other objects too; ingest skips it"


class SliceHeader(NamedTuple):
    """Everything ingest needs to know about one 2D image (one frame of one file), without pixels.

    Geometry follows DICOM (LPS patient coordinates, mm): ``iop`` is ImageOrientationPatient (row
    direction cosines, then column direction cosines), ``ipp`` ImagePositionPatient of the first
    transmitted pixel, ``pixel_spacing`` is ``(row spacing, column spacing)``. Missing optional values
    are ``""`` for text and ``None`` for numbers.

    ``pixel_offset``/``pixel_length`` locate the Pixel Data value in the file when the walker
    parsed it (``pixel_length == -1``: encapsulated, undefined length); ``pixel_offset == -1`` means
    the pixel pass must read the file with pydicom.

    A ``NamedTuple``: immutable, cheap to build and to pickle across the process pool (ingest
    makes one per slice).
    """

    path: str
    frame: int
    n_frames: int
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    transfer_syntax: str
    modality: str
    patient_id: str
    patient_sex: str
    patient_age: str
    patient_birth_date: str
    study_date: str
    study_time: str
    acquisition_date: str
    acquisition_time: str
    accession_number: str
    series_description: str
    series_number: int | None
    instance_number: int | None
    acquisition_number: int | None
    image_type: str
    manufacturer: str
    model: str
    software_version: str
    field_strength: float | None
    institution: str
    station: str
    sequence_name: str
    repetition_time: float | None
    echo_time: float | None
    inversion_time: float | None
    flip_angle: float | None
    echo_number: int | None
    rows: int
    cols: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    photometric: str
    planar_configuration: int
    iop: tuple[float, ...] | None
    ipp: tuple[float, ...] | None
    pixel_spacing: tuple[float, ...] | None
    slice_thickness: float | None
    spacing_between_slices: float | None
    rescale_slope: float
    rescale_intercept: float
    pixel_offset: int
    pixel_length: int


# --------------------------------------------------------------------------------------------------
# Walking the tree
# --------------------------------------------------------------------------------------------------


def iter_files(root: Path) -> Iterator[Path]:
    """Yield every regular file under ``root``, recursively, sorted by path components.

    Symbolic links to files are followed, links to folders are not (no cycles). Hidden files are
    included: anything in the tree is either ingested or reported.

    Args:
        root: A folder (or a single file, which is yielded as is).

    Yields:
        File paths, in deterministic order.
    """
    for path in list_files(root):
        yield Path(path)


def list_files(root: Path | str, exclude: Iterable[Path | str] = ()) -> list[str]:
    """Like :func:`iter_files`, as a list of ``str`` (no ``Path`` objects: large trees list fast).

    Args:
        root: A folder (or a single file).
        exclude: Folders not to descend into (e.g. an output folder inside the input tree).

    Returns:
        File paths, sorted by path components.
    """
    root = str(root)
    if os.path.isfile(root):  # noqa: PTH113 - str paths on purpose
        return [root]
    skip = {os.path.realpath(p) for p in exclude}
    found: list[tuple[tuple[str, ...], str]] = []
    stack: list[tuple[str, tuple[str, ...]]] = [(root, ())]
    while stack:
        folder, parts = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            log.warning("cannot list %s: %s", folder, exc)
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if skip and os.path.realpath(entry.path) in skip:
                        log.info("not scanning %s (excluded)", entry.path)
                        continue
                    stack.append((entry.path, (*parts, entry.name)))
                elif entry.is_file():
                    found.append(((*parts, entry.name), entry.path))
            except OSError as exc:  # pragma: no cover - racing deletions
                log.warning("cannot stat %s: %s", entry.path, exc)
    found.sort()
    return [path for _, path in found]


# --------------------------------------------------------------------------------------------------
# Value conversion shared by the walker and the pydicom paths
# --------------------------------------------------------------------------------------------------


class _Fields(Protocol):
    """Decoded header values: ``texts`` maps tag -> text (multi-values joined by backslash)."""

    texts: dict[int, str]

    def uint(self, tag: int) -> int | None: ...


_TEXT_TAGS = frozenset(
    tag for tag, vr in binary.WANTED.items() if vr in ("LO", "SH", "PN", "LT", "ST", "UT", "UC")
)
_US_TAGS = frozenset(tag for tag, vr in binary.WANTED.items() if vr == "US")
_US = struct.Struct("<H")
_SS = struct.Struct("<h")


class _WalkedFields:
    """Field access on the raw elements of the walker (all texts decoded at once)."""

    __slots__ = ("_el", "texts")

    def __init__(self, elements: dict[int, tuple[bytes, bytes]], explicit: bool) -> None:
        self._el = elements
        raw = elements.get(0x00080005)
        charset = raw[1].decode("ascii", "replace").strip(" \x00") if raw else ""
        us_tags = _US_TAGS
        self.texts = {
            tag: item[1].decode("latin-1").strip(" \x00")
            for tag, item in elements.items()
            if tag not in us_tags
        }
        if charset not in ("", "ISO_IR 100", "ISO_IR 6"):
            for tag in _TEXT_TAGS & elements.keys():
                self.texts[tag] = _decode_text(elements[tag][1], charset)
        image_type = self.texts.get(0x00080008)
        if image_type and "\\" in image_type:  # multi-valued text: strip every value
            self.texts[0x00080008] = "\\".join(v.strip(" \x00") for v in image_type.split("\\"))

    def uint(self, tag: int) -> int | None:
        item = self._el.get(tag)
        if item is None or not item[1]:
            return None
        vr, raw = item
        if vr in (b"US", b"", b"UN", b"OW", b"OB") and len(raw) >= 2:
            return int(_US.unpack_from(raw)[0])
        if vr == b"SS" and len(raw) >= 2:
            return int(_SS.unpack_from(raw)[0])
        return _int(raw.decode("latin-1"), tag)


def _decode_text(raw: bytes, charset: str) -> str:
    if charset == "ISO_IR 192":
        return raw.decode("utf-8", "replace").strip(" \x00")
    from pydicom.charset import convert_encodings, decode_bytes

    try:
        encodings = convert_encodings([c.strip() for c in charset.split("\\")])
    except ValueError:  # a NUL inside a name: unknown, decoded as pydicom decodes unknown names
        encodings = ["iso8859"]
    return decode_bytes(raw, encodings, {0x5C}).strip(" \x00")


class _DatasetFields:
    """Field access on a pydicom dataset (the fallback path)."""

    __slots__ = ("_ds", "texts")

    def __init__(self, ds: Any) -> None:
        self._ds = ds
        self.texts = {
            tag: _value_text(ds[tag].value)
            for tag in binary.WANTED
            if tag not in _US_TAGS and tag in ds
        }

    def uint(self, tag: int) -> int | None:
        if tag not in self._ds:
            return None
        value = self._ds[tag].value
        if value is None or value == "" or value == b"":
            return None
        if isinstance(value, bytes):
            return int(_US.unpack_from(value)[0]) if len(value) >= 2 else None
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = value[0]
        return _int(str(value), tag)


def _value_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("latin-1").strip(" \x00")
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(_value_text(v) for v in value)  # type: ignore[attr-defined]
    if isinstance(value, float) and not isinstance(value, str):
        text = getattr(value, "original_string", None)
        return str(text) if text is not None else repr(value)
    return str(value).strip(" \x00")


class _BadValue(Exception):  # noqa: N818 - turned into UnreadableFileError by the caller
    def __init__(self, tag: int, text: str, expected: str) -> None:
        self.tag, self.text, self.expected = tag, text, expected
        super().__init__(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) = {text!r} is not {expected}")


def _int(text: str, tag: int) -> int | None:
    text = text.split("\\")[0].strip(" \x00")
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise _BadValue(tag, text, "an integer") from None
        if not value.is_integer():
            raise _BadValue(tag, text, "an integer") from None
        return int(value)


def _floats(text: str, tag: int, count: int) -> tuple[float, ...] | None:
    """Parse a DS value with exactly ``count`` finite values; ``None`` when empty."""
    if not text:
        return None
    try:
        values = tuple(map(float, text.split("\\")))
    except ValueError:
        if not text.strip(" \x00"):
            return None
        raise _BadValue(tag, text, f"{count} decimal numbers") from None
    if len(values) != count or not all(map(math.isfinite, values)):
        raise _BadValue(tag, text, f"{count} finite decimal numbers")
    return values


#: Same text -> same tuple object: values shared by a series are parsed once per worker and
#: pickled once per chunk (pickle memoises by identity).
_shared_floats = functools.lru_cache(maxsize=256)(_floats)
_intern = sys.intern


def _opt_float(text: str) -> float | None:
    """First value of an optional DS; unparseable optional metadata becomes ``None``."""
    if not text:
        return None
    try:
        value = float(text.split("\\", 1)[0])
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _opt_int(text: str, tag: int) -> int | None:
    try:
        return _int(text, tag)
    except _BadValue:
        return None


_T = binary.TAGS  # keyword -> tag, from the one tag table


@dataclass(slots=True)
class _FrameGeometry:
    """Per-frame values that override the top level (enhanced multi-frame objects)."""

    iop: tuple[float, ...] | None
    ipp: tuple[float, ...] | None
    pixel_spacing: tuple[float, ...] | None
    slice_thickness: float | None
    spacing_between_slices: float | None
    rescale_slope: float
    rescale_intercept: float
    echo_time: float | None
    repetition_time: float | None
    flip_angle: float | None
    inversion_time: float | None


def _build(
    f: _Fields,
    path: str,
    transfer_syntax: str,
    pixel_offset: int,
    pixel_length: int,
    frame: int = 0,
    n_frames: int = 1,
    fg: _FrameGeometry | None = None,
) -> SliceHeader:
    """Convert the fields of one file (and frame) into a SliceHeader.

    Raises:
        _BadValue: A value ingest relies on is malformed.
    """
    g = f.texts.get
    T = _T
    if fg is None:
        # Orientation and spacing repeat across a series: cached, so slices share one tuple.
        iop = _shared_floats(g(T["ImageOrientationPatient"], ""), T["ImageOrientationPatient"], 6)
        ipp = _floats(g(T["ImagePositionPatient"], ""), T["ImagePositionPatient"], 3)
        spacing = _shared_floats(g(T["PixelSpacing"], ""), T["PixelSpacing"], 2)
        slope_text = g(T["RescaleSlope"], "")
        intercept_text = g(T["RescaleIntercept"], "")
        slope = _floats(slope_text.split("\\")[0], T["RescaleSlope"], 1) if slope_text else None
        intercept = (
            _floats(intercept_text.split("\\")[0], T["RescaleIntercept"], 1)
            if intercept_text
            else None
        )
        fg = _FrameGeometry(
            iop=iop,
            ipp=ipp,
            pixel_spacing=spacing,
            slice_thickness=_opt_float(g(T["SliceThickness"], "")),
            spacing_between_slices=_opt_float(g(T["SpacingBetweenSlices"], "")),
            rescale_slope=slope[0] if slope else 1.0,
            rescale_intercept=intercept[0] if intercept else 0.0,
            echo_time=_opt_float(g(T["EchoTime"], "")),
            repetition_time=_opt_float(g(T["RepetitionTime"], "")),
            flip_angle=_opt_float(g(T["FlipAngle"], "")),
            inversion_time=_opt_float(g(T["InversionTime"], "")),
        )
    if fg.rescale_slope == 0.0:
        raise _BadValue(T["RescaleSlope"], "0", "a non-zero slope")
    spp = f.uint(T["SamplesPerPixel"])
    bits_allocated = f.uint(T["BitsAllocated"])
    bits_stored = f.uint(T["BitsStored"])
    return SliceHeader(
        path=path,
        frame=frame,
        n_frames=n_frames,
        sop_class_uid=_intern(g(T["SOPClassUID"], "")),
        sop_instance_uid=g(T["SOPInstanceUID"], ""),
        study_uid=_intern(g(T["StudyInstanceUID"], "")),
        series_uid=_intern(g(T["SeriesInstanceUID"], "")),
        frame_of_reference_uid=_intern(g(T["FrameOfReferenceUID"], "")),
        transfer_syntax=_intern(transfer_syntax),
        modality=g(T["Modality"], "").upper(),
        patient_id=_intern(g(T["PatientID"], "")),
        patient_sex=g(T["PatientSex"], "").upper(),
        patient_age=g(T["PatientAge"], ""),
        patient_birth_date=g(T["PatientBirthDate"], ""),
        study_date=_intern(g(T["StudyDate"], "")),
        study_time=g(T["StudyTime"], ""),
        acquisition_date=g(T["AcquisitionDate"], ""),
        acquisition_time=g(T["AcquisitionTime"], ""),
        accession_number=g(T["AccessionNumber"], ""),
        series_description=_intern(g(T["SeriesDescription"], "")),
        series_number=_opt_int(g(T["SeriesNumber"], ""), T["SeriesNumber"]),
        instance_number=_opt_int(g(T["InstanceNumber"], ""), T["InstanceNumber"]),
        acquisition_number=_opt_int(g(T["AcquisitionNumber"], ""), T["AcquisitionNumber"]),
        image_type=_intern(g(T["ImageType"], "")),
        manufacturer=_intern(g(T["Manufacturer"], "")),
        model=_intern(g(T["ManufacturerModelName"], "")),
        software_version=_intern(g(T["SoftwareVersions"], "")),
        field_strength=_opt_float(g(T["MagneticFieldStrength"], "")),
        institution=_intern(g(T["InstitutionName"], "")),
        station=_intern(g(T["StationName"], "")),
        sequence_name=g(T["SequenceName"], ""),
        repetition_time=fg.repetition_time,
        echo_time=fg.echo_time,
        inversion_time=fg.inversion_time,
        flip_angle=fg.flip_angle,
        echo_number=_opt_int(g(T["EchoNumbers"], ""), T["EchoNumbers"]),
        rows=f.uint(T["Rows"]) or 0,
        cols=f.uint(T["Columns"]) or 0,
        samples_per_pixel=1 if spp is None else spp,
        bits_allocated=bits_allocated or 0,
        bits_stored=bits_stored if bits_stored is not None else (bits_allocated or 0),
        pixel_representation=f.uint(T["PixelRepresentation"]) or 0,
        photometric=g(T["PhotometricInterpretation"], "").upper(),
        planar_configuration=f.uint(T["PlanarConfiguration"]) or 0,
        iop=fg.iop,
        ipp=fg.ipp,
        pixel_spacing=fg.pixel_spacing,
        slice_thickness=fg.slice_thickness,
        spacing_between_slices=fg.spacing_between_slices,
        rescale_slope=fg.rescale_slope,
        rescale_intercept=fg.rescale_intercept,
        pixel_offset=pixel_offset,
        pixel_length=pixel_length,
    )


# --------------------------------------------------------------------------------------------------
# Reading one file
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _non_image_name(sop_class: str) -> str | None:
    for prefix, name in NON_IMAGE_SOP_CLASSES.items():
        if sop_class == prefix or (prefix.endswith(".") and sop_class.startswith(prefix)):
            return name
    return None


def _sop_name(sop_class: str) -> str:
    try:
        from pydicom.uid import UID

        name = UID(sop_class).name
    except Exception:  # pragma: no cover - pydicom's UID never fails on a string
        name = sop_class
    return name or sop_class


def _check_common(
    path: str,
    f: _Fields,
    media_sop_class: str,
    has_pixels: bool,
    forced: bool,
) -> None:
    """File-level checks shared by both readers: DICOMDIR, non-images, missing pixels or UIDs."""
    sop_class = f.texts.get(_T["SOPClassUID"], "") or media_sop_class
    if (
        media_sop_class == binary.MEDIA_STORAGE_DIRECTORY
        or sop_class == binary.MEDIA_STORAGE_DIRECTORY
    ):
        raise UnreadableFileError(
            path,
            "dicomdir",
            "DICOMDIR index file (Media Storage Directory): an index of the other files, "
            "not an image",
            "nothing to do: ingest reads the image files directly and skips the index",
        )
    name = _non_image_name(sop_class) if sop_class else None
    if name is not None:
        raise UnreadableFileError(
            path,
            "not_image",
            f"not an image: SOP class {sop_class} ({name}) holds no image volume",
            _FIX_NOT_IMAGE,
        )
    has_rows = f.uint(_T["Rows"]) is not None and f.uint(_T["Columns"]) is not None
    if forced and not (has_pixels and has_rows):
        raise UnreadableFileError(
            path,
            "not_dicom",
            "not a DICOM file: no 128-byte preamble with 'DICM', and it does not parse as a DICOM "
            "image data set with Rows, Columns and Pixel Data",
            "remove it from the input folder, or re-export it from the archive as a DICOM Part 10 "
            "file",
        )
    if not has_pixels:
        sop_name = _sop_name(sop_class) if sop_class else ""
        if has_rows or "Image" in sop_name:
            raise UnreadableFileError(
                path,
                "no_pixel_data",
                f"image header ({sop_name or 'unknown SOP class'}) without Pixel Data "
                "(7FE0,0010): the pixels were stripped or never stored",
                "re-export the image from the archive with its pixel data",
            )
        what = f"SOP class {sop_class} ({sop_name})" if sop_class else "no SOP Class UID"
        raise UnreadableFileError(
            path,
            "not_image",
            f"not an image: {what}, no Pixel Data and no Rows/Columns",
            _FIX_NOT_IMAGE,
        )
    for key in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not f.texts.get(_T[key]):
            raise UnreadableFileError(
                path,
                "missing_uid",
                f"{key} is missing or empty, so the image cannot be placed in a series",
                "fix the header (e.g. with dcmodify) or re-export the image from the archive",
            )


def _check_native_length(path: str, h: SliceHeader) -> None:
    if h.pixel_length < 0 or h.pixel_offset < 0:
        return
    bits = h.bits_allocated
    if bits == 0 or h.rows == 0 or h.cols == 0:
        return
    samples = h.samples_per_pixel
    if h.photometric in ("YBR_FULL_422", "YBR_PARTIAL_422") and samples == 3:
        samples = 2  # chroma subsampled horizontally: 2 samples per pixel on average
    expected = (h.rows * h.cols * samples * h.n_frames * bits + 7) // 8
    if h.pixel_length < expected:
        raise UnreadableFileError(
            path,
            "pixel_data_short",
            f"Pixel Data holds {h.pixel_length} bytes but {h.rows} rows x {h.cols} columns x "
            f"{samples} samples x {h.n_frames} frame(s) x {bits} bits need {expected}",
            "re-export the image; the file was cut short or its image tags are wrong",
        )


def read_headers(path: str | Path) -> list[SliceHeader]:
    """Read the header of one file into one SliceHeader per frame.

    Args:
        path: The file.

    Returns:
        One header for a single-frame image, one per frame for a multi-frame image.

    Raises:
        UnreadableFileError: The file is not an image that ingest can use; ``code`` says why.
    """
    spath = str(path)
    try:
        walked = binary.read_header(spath)
    except binary.Truncated:
        raise UnreadableFileError(
            spath,
            "truncated",
            "file ends inside a data element (truncated copy or interrupted transfer)",
            "copy the file again from its source",
        ) from None
    except OSError as exc:
        raise UnreadableFileError(
            spath,
            "unreadable",
            f"cannot read the file: {exc.strerror or exc}",
            "check that the file exists and is readable by this user",
        ) from None
    except (binary.NeedsFallback, struct.error, ValueError, IndexError) as exc:
        log.debug("walker declined %s (%s); reading with pydicom", spath, exc)
        return _read_with_pydicom(spath)

    el = walked.elements
    if 0x52009230 in el or 0x52009229 in el:
        return _read_with_pydicom(spath)  # enhanced (functional group) objects
    f = _WalkedFields(el, walked.explicit)
    media_sop = f.texts.get(binary.MEDIA_SOP_CLASS_TAG, "")
    forced = not walked.has_preamble and not walked.has_meta
    try:  # Rows, Columns, ... are read here first: a value that is not a number raises
        _check_common(spath, f, media_sop, walked.pixel_offset >= 0, forced)
        n_frames = _int(f.texts.get(_T["NumberOfFrames"], ""), _T["NumberOfFrames"]) or 1
    except _BadValue as exc:
        raise _bad_value_error(spath, exc) from None
    if n_frames > 1:
        return _read_with_pydicom(spath)
    ts = f.texts.get(binary.TS_TAG, "")
    if not ts:
        ts = binary.EXPLICIT_VR_LE if walked.explicit else binary.IMPLICIT_VR_LE
    try:
        header = _build(f, spath, ts, walked.pixel_offset, walked.pixel_length)
    except _BadValue as exc:
        raise _bad_value_error(spath, exc) from None
    _check_native_length(spath, header)
    return [header]


def _bad_value_error(path: str, exc: _BadValue) -> UnreadableFileError:
    return UnreadableFileError(
        path,
        "bad_value",
        f"{binary.tag_name(exc.tag)} holds {exc.text!r}, which is not {exc.expected}",
        "correct the tag (e.g. with dcmodify) or re-export the image from the archive",
    )


def _read_with_pydicom(path: str) -> list[SliceHeader]:
    """The fallback reader: pydicom with ``force=True``; large values are deferred, not read."""
    import warnings

    with warnings.catch_warnings():
        # pydicom warns about every odd value; the outcome is reported in the quarantine instead.
        warnings.simplefilter("ignore")
        return _read_with_pydicom_quietly(path)


def _read_with_pydicom_quietly(path: str) -> list[SliceHeader]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, force=True, defer_size=4096)
        # Touch every top-level element so that parse errors surface here, not later.
        elements = list(ds.keys())
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, struct.error) as exc:
        raise UnreadableFileError(
            path,
            "not_dicom",
            f"not a readable DICOM file: {type(exc).__name__}: {exc}",
            "remove it from the input folder, or re-export it from the archive",
        ) from None
    except Exception as exc:
        raise UnreadableFileError(
            path,
            "unparseable",
            f"the DICOM parser failed on this file: {type(exc).__name__}: {exc}",
            "re-export the file from the archive; if it opens elsewhere, report a bug with it",
        ) from None
    meta = getattr(ds, "file_meta", None)
    try:
        with _as_unreadable(path):  # values are converted on first access: a bad one raises here
            media_sop = _value_text(meta.get("MediaStorageSOPClassUID", "")) if meta else ""
            ts = _value_text(meta.get("TransferSyntaxUID", "")) if meta else ""
            forced = getattr(ds, "preamble", None) is None and not meta
            f = _DatasetFields(ds)
            _check_common(path, f, media_sop, 0x7FE00010 in elements, forced)
    except _BadValue as exc:
        raise _bad_value_error(path, exc) from None
    if not ts:
        ts = _guess_ts(ds)
    try:
        n_frames = _int(f.texts.get(_T["NumberOfFrames"], ""), _T["NumberOfFrames"]) or 1
    except _BadValue as exc:
        raise _bad_value_error(path, exc) from None
    if ts and not _is_supported_ts(ts):
        raise UnreadableFileError(
            path,
            "unsupported_transfer_syntax",
            f"transfer syntax {ts} ({_sop_name(ts)}) cannot be decoded here",
            "convert the file to explicit VR little endian (e.g. dcmdjpeg/gdcmconv --raw)",
        )
    try:
        with _as_unreadable(path):
            if n_frames == 1 and 0x52009230 not in ds:
                header = _build(f, path, ts, -1, -1)
                _check_native_length_pydicom(path, ds, header)
                return [header]
            return _multiframe_headers(ds, f, path, ts, n_frames)
    except _BadValue as exc:
        raise _bad_value_error(path, exc) from None


class _as_unreadable:  # noqa: N801 - used as a context manager
    """Re-raise unexpected exceptions from pydicom value access as UnreadableFileError."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: Any) -> None:
        if ev is None or isinstance(ev, (UnreadableFileError, _BadValue)):
            return
        if not isinstance(ev, Exception):
            return
        raise UnreadableFileError(
            self.path,
            "unparseable",
            f"a header value cannot be read: {type(ev).__name__}: {ev}",
            "re-export the file from the archive",
        ) from None


def _guess_ts(ds: Any) -> str:
    encoding = getattr(ds, "original_encoding", None)
    if not encoding or encoding[0] is None:
        return ""
    implicit, little = encoding
    if little:
        return binary.IMPLICIT_VR_LE if implicit else binary.EXPLICIT_VR_LE
    return binary.EXPLICIT_VR_BE


def _is_supported_ts(ts: str) -> bool:
    try:
        from pydicom.pixels import get_decoder

        get_decoder(ts)
    except NotImplementedError:
        return False
    except Exception:  # pragma: no cover - unknown UIDs are treated as unsupported
        return False
    return True


def _check_native_length_pydicom(path: str, ds: Any, h: SliceHeader) -> None:
    from pydicom.uid import UID

    if not h.transfer_syntax or UID(h.transfer_syntax).is_encapsulated:
        return
    raw = ds.get_item(0x7FE00010)
    length = getattr(raw, "length", None)
    if length is None or length == 0xFFFFFFFF:
        return
    tell = getattr(raw, "value_tell", None)
    size = Path(path).stat().st_size
    if isinstance(tell, int) and tell + length > size:
        raise UnreadableFileError(
            path,
            "truncated",
            f"Pixel Data declares {length} bytes but the file ends {tell + length - size} bytes "
            "early (truncated copy or interrupted transfer)",
            "copy the file again from its source",
        )
    _check_native_length(path, _replace_pixel(h, 0, int(length)))


def _replace_pixel(h: SliceHeader, offset: int, length: int) -> SliceHeader:
    return h._replace(pixel_offset=offset, pixel_length=length)


def _seq_first(item: Any, keyword: str) -> Any:
    seq = getattr(item, keyword, None) if item is not None else None
    if seq is None or len(seq) == 0:
        return None
    return seq[0]


def _multiframe_headers(
    ds: Any, f: _DatasetFields, path: str, ts: str, n_frames: int
) -> list[SliceHeader]:
    """One header per frame of an enhanced multi-frame image (per-frame functional groups)."""
    per_frame = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
    shared = _seq_first(ds, "SharedFunctionalGroupsSequence")
    if per_frame is None or len(per_frame) != n_frames:
        found = "none" if per_frame is None else str(len(per_frame))
        raise UnreadableFileError(
            path,
            "multiframe_no_geometry",
            f"multi-frame image with {n_frames} frames but {found} per-frame functional group "
            "items, so the position of each frame is unknown",
            "export the series as single-frame images (one file per slice with "
            "ImagePositionPatient), or as an enhanced object with PlanePositionSequence per frame",
        )

    def lookup(frame_item: Any, seq_kw: str, attr: str) -> str:
        for holder in (frame_item, shared):
            inner = _seq_first(holder, seq_kw)
            if inner is not None and attr in inner:
                return _value_text(inner[attr].value)
        return _value_text(ds[attr].value) if attr in ds else ""

    headers = []
    for i, item in enumerate(per_frame):
        iop_t = lookup(item, "PlaneOrientationSequence", "ImageOrientationPatient")
        ipp_t = lookup(item, "PlanePositionSequence", "ImagePositionPatient")
        ps_t = lookup(item, "PixelMeasuresSequence", "PixelSpacing")
        slope = _opt_float(lookup(item, "PixelValueTransformationSequence", "RescaleSlope"))
        intercept = _opt_float(lookup(item, "PixelValueTransformationSequence", "RescaleIntercept"))
        echo = lookup(item, "MREchoSequence", "EffectiveEchoTime")
        tr = lookup(item, "MRTimingAndRelatedParametersSequence", "RepetitionTime")
        flip = lookup(item, "MRTimingAndRelatedParametersSequence", "FlipAngle")
        fg = _FrameGeometry(
            iop=_floats(iop_t, _T["ImageOrientationPatient"], 6),
            ipp=_floats(ipp_t, _T["ImagePositionPatient"], 3),
            pixel_spacing=_floats(ps_t, _T["PixelSpacing"], 2),
            slice_thickness=_opt_float(lookup(item, "PixelMeasuresSequence", "SliceThickness")),
            spacing_between_slices=_opt_float(
                lookup(item, "PixelMeasuresSequence", "SpacingBetweenSlices")
            ),
            rescale_slope=1.0 if slope is None else slope,
            rescale_intercept=0.0 if intercept is None else intercept,
            echo_time=_opt_float(echo) if echo else _opt_float(f.texts.get(_T["EchoTime"], "")),
            repetition_time=_opt_float(tr)
            if tr
            else _opt_float(f.texts.get(_T["RepetitionTime"], "")),
            flip_angle=_opt_float(flip) if flip else _opt_float(f.texts.get(_T["FlipAngle"], "")),
            inversion_time=_opt_float(f.texts.get(_T["InversionTime"], "")),
        )
        headers.append(_build(f, path, ts, -1, -1, frame=i, n_frames=n_frames, fg=fg))
    return headers


# --------------------------------------------------------------------------------------------------
# Scanning many files (one process-pool task)
# --------------------------------------------------------------------------------------------------


def scan_files(paths: Iterable[str | Path]) -> tuple[list[SliceHeader], list[QuarantineEntry]]:
    """Read the headers of many files; never raises on bad input.

    Args:
        paths: Files to read.

    Returns:
        ``(headers, issues)``: the slice headers of all usable files (one per frame) and one
        file-level quarantine entry for every file that is not usable.
    """
    headers: list[SliceHeader] = []
    issues: list[QuarantineEntry] = []
    gc_was_enabled = gc.isenabled()
    gc.disable()  # many small acyclic objects: the cyclic collector only costs time here
    try:
        _scan_into(paths, headers, issues)
    finally:
        if gc_was_enabled:
            gc.enable()
    return headers, issues


def _scan_into(
    paths: Iterable[str | Path], headers: list[SliceHeader], issues: list[QuarantineEntry]
) -> None:
    for p in paths:
        try:
            headers.extend(read_headers(p))
        except UnreadableFileError as err:
            issues.append(QuarantineEntry.for_file(err))
        except Exception as exc:  # a bug or a file no reader anticipated: report, never crash
            log.exception("unexpected error while reading %s", p)
            issues.append(
                QuarantineEntry(
                    str(p),
                    "file",
                    "",
                    "internal_error",
                    f"unexpected {type(exc).__name__} while reading the header: {exc}",
                    "report this file to the ShiftGuard maintainers; ingest skipped it",
                    (str(p),),
                )
            )


def chunked(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """Split ``items`` into consecutive chunks of at most ``size`` (the scan's pool tasks)."""
    return [items[i : i + size] for i in range(0, len(items), max(1, size))]
