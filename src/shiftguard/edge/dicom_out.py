"""DICOM results: a Comprehensive 3D SR (TID 1500) and a Secondary Capture key image per series.

Both join the source study as new series (study and patient attributes copied from the source),
and every UID they carry is derived from the source series UID, the bundle's name and version and
the object's role (:func:`derived_uid`), so running the same bundle on the same series again writes
the same objects instead of duplicates in the PACS. A later revision of the input (the edge service
received more of the study after sending its results) keeps the series UIDs and changes the instance
UIDs: the next SR and key image in the same result series, with the next instance number.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset

from shiftguard.dicom.scan import SliceHeader, scan_files
from shiftguard.edge.preprocess import linear_matrix, linear_resize

if TYPE_CHECKING:
    from PIL import ImageDraw
    from PIL.ImageFont import FreeTypeFont

log = logging.getLogger(__name__)

#: series numbers of the results, high enough to sort after the acquired series
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
MANUFACTURER = "ShiftGuard"
SHADOW_BANNER = "SHADOW MODE - NOT FOR CLINICAL USE"

# highdicom narrates every module it copies at INFO: one line per module per object written
if logging.getLogger("highdicom").level == logging.NOTSET:
    logging.getLogger("highdicom").setLevel(logging.WARNING)


def derived_uid(*parts: str) -> str:
    """A deterministic UID under the ``2.25`` root from ``parts`` (SHA-256, 128 bits).

    >>> derived_uid("1.2.3", "model", "1", "sr") == derived_uid("1.2.3", "model", "1", "sr")
    True
    >>> len(derived_uid("x")) <= 64
    True
    """
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()[:16]
    return f"2.25.{int.from_bytes(digest, 'big')}"


@dataclass(frozen=True)
class SeriesResult:
    """What the model said about one series."""

    series_uid: str
    probability: float
    threshold: float
    model_name: str
    model_version: str
    shadow: bool
    revision: int = 0  # how often the study gained instances after its results were sent

    @property
    def positive(self) -> bool:
        return self.probability >= self.threshold

    @property
    def label(self) -> str:
        return "finding present" if self.positive else "no finding"

    def uid(self, role: str) -> str:
        """The UID of this result's object ``role`` (``"sr"``, ``"sc-series"``...): the same for
        the same series, model and version, so re-running writes the same objects; the instances'
        (``"sr"``, ``"sc"``) differ by revision, the series' do not.

        >>> first = SeriesResult("1.2.3", 0.7, 0.5, "model", "1", shadow=False)
        >>> later = SeriesResult("1.2.3", 0.7, 0.5, "model", "1", shadow=False, revision=1)
        >>> first.uid("sr") == later.uid("sr"), first.uid("sr-series") == later.uid("sr-series")
        (False, True)
        """
        parts = [self.series_uid, self.model_name, self.model_version, role]
        if self.revision and role in ("sr", "sc"):
            parts.append(f"revision {self.revision}")
        return derived_uid(*parts)


STUDY_TYPE2 = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber",
    "ReferringPhysicianName", "StudyDate", "StudyTime",
)  # fmt: skip
"""Patient and study attributes the SR copies from its source, which must be present but may be
empty (type 2): a source without one gets it empty instead of failing the whole study."""


REFERENCED_SOP_SEQUENCE = 0x00081199
REFERENCED_SOP_CLASS, REFERENCED_SOP_INSTANCE = 0x00081150, 0x00081155
CONTENT_SEQUENCE = 0x0040A730


def evidence_datasets(ref: Dataset, headers: Sequence[SliceHeader]) -> list[Dataset]:
    """The datasets naming each source image, for the SR's evidence: ``ref`` (the header read
    from disk, which carries the patient and study) for the first, then light datasets built from
    the headers already scanned instead of re-reading every file."""
    out = [ref]
    for h in headers:
        if h.sop_instance_uid == ref.SOPInstanceUID:
            continue
        ds = Dataset()
        ds.add_new(0x0020000D, "UI", h.study_uid)
        ds.add_new(0x0020000E, "UI", h.series_uid)
        ds.add_new(0x00080016, "UI", h.sop_class_uid)
        ds.add_new(0x00080018, "UI", h.sop_instance_uid)
        out.append(ds)
    return out


def write_sr(
    ref: Dataset, headers: Sequence[SliceHeader], result: SeriesResult, path: Path
) -> Dataset:
    """A Comprehensive 3D SR with a TID 1500 measurement report for one series.

    The report holds one measurement group (TID 1501) for the finding: a qualitative evaluation
    (finding present / absent at the operating threshold), the probability and the threshold as
    measurements, the algorithm's name and version, and a reference to every source image, in the
    measurement group and in the evidence.

    highdicom builds the document with the first source image of each series only; the other
    references, one IMAGE content item and one evidence item per slice, are then encoded
    directly (:func:`_add_source_images`): highdicom deep-copies and re-validates the whole
    content tree and pydicom writes every item through its general writer, which made the SR
    cost 2 ms per slice (2 s for a 1,000-slice study). The bytes are those highdicom writes with
    every image given to it (tested).
    """
    representatives = list({h.series_uid: h for h in reversed(headers)}.values())[::-1]
    sr = build_sr(ref, headers[:1], result, representatives)
    _add_source_images(sr, ref, headers)
    _fix_dates(sr, ref)
    _mark_encoded(sr)
    path.parent.mkdir(parents=True, exist_ok=True)
    sr.save_as(path, enforce_file_format=True)
    return sr


@functools.cache  # once per process: what it loads stays loaded
def warm_up() -> None:
    """Write a throwaway SR and key image for a one-slice synthetic series, in a temporary folder:
    what the first result objects would load (highdicom, 0.6 s to import, and its module tables,
    0.4 s to read; pydicom's code dictionary; the key image's font) is loaded now. The service
    calls it in the background at start, so that the first study after a restart is not slower."""
    import tempfile

    import pydicom

    from shiftguard.dicom.testing import SeriesSpec, write_series

    try:
        with tempfile.TemporaryDirectory(prefix="shiftguard-warm-up-") as tmp:
            [path] = write_series(Path(tmp), SeriesSpec(rows=8, cols=8, n_slices=1))
            headers, _ = scan_files([path])
            ref = pydicom.dcmread(path, stop_before_pixels=True)
            result = SeriesResult(headers[0].series_uid, 0.5, 0.5, "warm-up", "0", shadow=True)
            write_sr(ref, headers, result, Path(tmp) / "sr.dcm")
            volume = np.zeros((8, 8, 8), dtype=np.float32)
            write_sc(ref, volume, (1.0, 1.0, 1.0), None, result, Path(tmp) / "sc.dcm")
    except Exception as exc:  # the first study then loads them itself; nothing else is at stake
        log.warning("warming up the result writers failed (%s: %s); the first study's result "
                    "objects will take longer", type(exc).__name__, exc)  # fmt: skip


def build_sr(
    ref: Dataset,
    source_images: Sequence[SliceHeader],
    result: SeriesResult,
    evidence_headers: Sequence[SliceHeader] | None = None,
) -> Dataset:
    """The SR document through highdicom, referencing ``source_images`` in the measurement group
    and ``evidence_headers`` (default: the same) as evidence."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    missing = [k for k in STUDY_TYPE2 if k not in ref]
    if missing:  # type 2 (present, may be empty) in the SR; some senders leave them out
        ref = copy.deepcopy(ref)  # the caller keeps its dataset as it was
        for keyword in missing:
            setattr(ref, keyword, "")
    algorithm = hd.sr.AlgorithmIdentification(name=result.model_name, version=result.model_version)
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("device", result.model_name, result.model_version),
            name=result.model_name,
            manufacturer_name=MANUFACTURER,
            model_name=f"{result.model_name} {result.model_version}",
        ),
    )
    unit = codes.UCUM.NoUnits
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=result.uid("track"),
            identifier="focal lesion",
        ),
        finding_type=codes.SCT.Lesion,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Brain)],
        algorithm_id=algorithm,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=codes.SCT.Lesion,
                value=codes.SCT.Present if result.positive else codes.SCT.Absent,
            )
        ],
        measurements=[
            hd.sr.Measurement(
                name=codes.DCM.Probability,
                value=round(float(result.probability), 6),
                unit=unit,
                algorithm_id=algorithm,
            ),
            hd.sr.Measurement(
                name=codes.DCM.ThresholdValue,
                value=round(float(result.threshold), 6),
                unit=unit,
                algorithm_id=algorithm,
            ),
        ],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(h.sop_class_uid, h.sop_instance_uid)
            for h in source_images
        ],
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.LN.BrainMRI,
        imaging_measurements=[group],
    )
    evidence = evidence_datasets(ref, evidence_headers or source_images)
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=result.uid("sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=result.uid("sr"),
        instance_number=result.revision + 1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=_description("AI SR", result),
    )
    return sr


def _ui(tag: int, uid: str) -> bytes:
    """One UI element, Explicit VR Little Endian, as pydicom writes it (padded with NUL)."""
    value = uid.encode("ascii")
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, b"UI", len(value)) + value


def _item(content: bytes) -> bytes:
    """A sequence item of defined length holding ``content``."""
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(content)) + content


def _sequence(tag: int, items: bytes) -> bytes:
    """An SQ element of defined length holding ``items``."""
    return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, b"SQ", 0, len(items)) + items


def _sop_reference(h: SliceHeader) -> bytes:
    return _item(
        _ui(REFERENCED_SOP_CLASS, h.sop_class_uid)
        + _ui(REFERENCED_SOP_INSTANCE, h.sop_instance_uid)
    )


def _encoded(write: Any, value: Any, encodings: list[str]) -> bytes:
    """``value`` (an element or an item) as pydicom writes it, Explicit VR Little Endian."""
    from pydicom.filebase import DicomBytesIO

    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write(buffer, value, encodings)
    return buffer.getvalue()


def _raw_sequence(parent: Any, tag: int, items: bytes) -> None:
    """Set ``parent``'s sequence ``tag`` to the encoded ``items`` (read back like any other)."""
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import Dataset as PlainDataset
    from pydicom.tag import Tag

    raw = RawDataElement(Tag(tag), "SQ", len(items), items, 0, False, True)
    # a plain dataset's setter: highdicom's own would re-validate the content item
    PlainDataset.__setitem__(parent, Tag(tag), raw)


def _mark_encoded(ds: Any) -> None:
    """Mark ``ds`` and every item below it as already in the file's encoding (Explicit VR Little
    Endian, their character set as pydicom resolves it): pydicom then writes the encoded
    sequences as they are, where it would otherwise decode every raw element and write it again
    item by item (pydicom's documented use of ``set_original_encoding``). The SR holds no element
    of ambiguous VR, which is all the re-encoding pass would have corrected."""
    ds.set_original_encoding(False, True, ds._character_set)
    for tag in list(ds.keys()):
        element = ds.get_item(tag)
        if not element.is_raw and element.VR == "SQ":
            for item in element.value:
                _mark_encoded(item)


def _add_source_images(sr: Dataset, ref: Dataset, headers: Sequence[SliceHeader]) -> None:
    """Reference every one of ``headers`` where highdicom was given the first: after the IMAGE
    content item of ``headers[0]``, one item per other slice (the same concept and relationship),
    and in the evidence, every slice of each series (``ref``'s first, as highdicom orders them)."""
    from pydicom.charset import convert_encodings
    from pydicom.filewriter import write_data_element, write_sequence_item

    encodings = convert_encodings(sr.get("SpecificCharacterSet", "ISO_IR 6"))

    def find(parent: Any) -> tuple[Any, int] | None:
        for i, item in enumerate(parent.ContentSequence):
            if (
                item.get("ValueType") == "IMAGE"
                and item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                == headers[0].sop_instance_uid
            ):
                return parent, i
            if "ContentSequence" in item:
                found = find(item)
                if found is not None:
                    return found
        return None

    found = find(sr)
    if found is None:
        raise ValueError("the SR has no image reference to extend")
    parent, at = found
    items = list(parent.ContentSequence)
    # the IMAGE item's other elements (relationship, value type, concept), encoded once
    shared = [
        (int(element.tag), _encoded(write_data_element, element, encodings))
        for element in items[at]
        if element.keyword != "ReferencedSOPSequence"
    ]
    added = []
    for h in headers[1:]:
        reference = _sequence(REFERENCED_SOP_SEQUENCE, _sop_reference(h))
        parts = sorted([*shared, (REFERENCED_SOP_SEQUENCE, reference)], key=lambda p: p[0])
        added.append(_item(b"".join(part for _, part in parts)))
    content = b"".join(
        [
            *(_encoded(write_sequence_item, item, encodings) for item in items[: at + 1]),
            *added,
            *(_encoded(write_sequence_item, item, encodings) for item in items[at + 1 :]),
        ]
    )
    _raw_sequence(parent, CONTENT_SEQUENCE, content)

    # the evidence: highdicom's order is the evidence list's, the file read from disk first
    order = [h for h in headers if h.sop_instance_uid == ref.SOPInstanceUID]
    order += [h for h in headers if h.sop_instance_uid != ref.SOPInstanceUID]
    for study in sr.CurrentRequestedProcedureEvidenceSequence:
        for series in study.ReferencedSeriesSequence:
            mine = [h for h in order if h.series_uid == series.SeriesInstanceUID]
            if len(mine) > 1:
                _raw_sequence(series, REFERENCED_SOP_SEQUENCE,
                              b"".join(_sop_reference(h) for h in mine))  # fmt: skip


def _description(kind: str, result: SeriesResult) -> str:
    text = f"{kind} {result.model_name} v{result.model_version}"
    if result.shadow:
        text = f"{text} SHADOW"
    return text[:64]


def _fix_dates(ds: Dataset, ref: Dataset) -> None:
    """Every date/time of the object from the source study: the same bytes whatever day it is
    written (deterministic outputs, so a PACS never holds two versions), dated with the study it
    reports on."""
    date = str(ref.get("StudyDate", "")) or "19000101"
    time = str(ref.get("StudyTime", "")) or "000000"
    for keyword, value in (
        ("ContentDate", date),
        ("ContentTime", time),
        ("SeriesDate", date),
        ("SeriesTime", time),
        ("InstanceCreationDate", date),
        ("InstanceCreationTime", time),
        ("DateOfSecondaryCapture", date),
        ("TimeOfSecondaryCapture", time),
    ):
        if keyword in ds or keyword.startswith("Content"):
            setattr(ds, keyword, value)
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = f"{date}{time}"


# --------------------------------------------------------------------------------------------------
# Secondary Capture key image
# --------------------------------------------------------------------------------------------------


def axial_display(volume: np.ndarray, z: int) -> np.ndarray:
    """Slice ``z`` of a canonical RAS ``(X, Y, Z)`` volume as a radiological axial image:
    rows run anterior to posterior, columns from the patient's right to left (``("L", "P")``)."""
    return np.ascontiguousarray(volume[::-1, ::-1, z].T)


def key_slice(saliency: np.ndarray | None, shape: Sequence[int]) -> int:
    """The axial slice of a ``shape`` canonical grid where the activation map (on its own, usually
    coarser, grid) peaks: the centre of the strongest cell; the middle slice when there is none."""
    if saliency is None or not np.isfinite(saliency).any() or float(np.ptp(saliency)) == 0:
        return int(shape[2]) // 2
    iz = int(np.unravel_index(int(np.nanargmax(saliency)), saliency.shape)[2])
    n, z = saliency.shape[2], int(shape[2])
    return int(np.clip(round((iz + 0.5) * z / n - 0.5), 0, z - 1))


def saliency_slice(saliency: np.ndarray, shape: Sequence[int], z: int) -> np.ndarray:
    """Slice ``z`` of the activation map linearly resampled onto the ``shape`` grid, computed for
    that slice alone."""

    weights = linear_matrix(saliency.shape[2], int(shape[2]))[z]
    plane = np.tensordot(saliency.astype(np.float32), weights, axes=(2, 0))
    return linear_resize(plane[..., None], (int(shape[0]), int(shape[1]), 1))


def render_key_image(
    volume: np.ndarray, saliency: np.ndarray | None, result: SeriesResult, scale: int = 3
) -> tuple[np.ndarray, int]:
    """An RGB ``uint8`` key image: the key axial slice in grey, the activation map in red where it
    is in its top 5%, and a text banner with the result (and the shadow-mode warning).

    ``saliency`` may be on a coarser grid than ``volume`` (the network's last block).

    Returns:
        The image ``(rows, cols, 3)`` and the key slice index ``z``.
    """
    from PIL import Image, ImageDraw

    z = key_slice(saliency, volume.shape)
    grey = axial_display(volume, z).astype(np.float64)
    lo, hi = np.percentile(grey, [1, 99.5])
    grey = np.clip((grey - lo) / max(hi - lo, 1e-6), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if saliency is not None and float(np.ptp(saliency)) > 0:
        s = axial_display(saliency_slice(saliency, volume.shape, z), 0)
        cut = float(np.percentile(saliency, 95))
        weight = np.clip((s - cut) / max(float(saliency.max()) - cut, 1e-6), 0, 1) * 0.6
        rgb = rgb * (1 - weight[..., None]) + np.array([1.0, 0.1, 0.1]) * weight[..., None]
    image = Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB")
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    lines = [
        f"{result.model_name} v{result.model_version}: {result.label.upper()}",
        f"probability {result.probability:.3f}, threshold {result.threshold:.3f}",
    ]
    if result.shadow:
        lines.insert(0, SHADOW_BANNER)
    else:
        lines.append("AI result - to be confirmed by a radiologist")
    font = banner_font()
    margin = 4
    wrapped = [
        (part, i)
        for i, line in enumerate(lines)
        for part in wrap_text(line, font, image.width - 2 * margin)
    ]
    step = _line_height(font)
    banner = step * len(wrapped) + 2 * margin
    canvas = Image.new("RGB", (image.width, image.height + banner), (0, 0, 0))
    canvas.paste(image, (0, banner))
    draw = ImageDraw.Draw(canvas)
    for row, (text, i) in enumerate(wrapped):
        colour = (255, 80, 80) if (result.shadow and i == 0) else (255, 255, 0)
        draw_words(draw, (margin, margin + step * row), text, font, colour)
    return np.asarray(canvas, dtype=np.uint8), z


BANNER_FONTS = ("DejaVuSansMono.ttf",)
"""Fonts tried, in order, for the key image's burned-in text: DejaVu Sans Mono, whose space is as
wide as a letter, first the copy in matplotlib's wheel when matplotlib is installed (a pinned
file, so the same key image bytes on every host of the lab; matplotlib is only located, never
imported), then the system's (Debian's ``fonts-dejavu-core``); without either, Pillow's own scalable
font, with the gap between words widened to :data:`WORD_GAP`."""
BANNER_FONT_SIZE = 11
"""Pixel size of the burned-in text: 34 characters of DejaVu Sans Mono fit the 240 columns of a
default key image (80 voxels, 3 pixels each); longer lines wrap."""
WORD_GAP = 0.7
"""The narrowest gap between two words, as a fraction of the font size. Pillow's default font at
this size leaves 2 pixels for a space, no more than between two letters: "NOT FORCLINICAL USE"."""


@functools.cache
def banner_font(size: int = BANNER_FONT_SIZE) -> FreeTypeFont:
    """The key image's font at ``size`` pixels (see :data:`BANNER_FONTS`)."""
    from PIL import ImageFont

    for name in BANNER_FONTS:
        for candidate in (*_wheel_fonts(name), name):
            try:
                return ImageFont.truetype(candidate, size)
            except OSError:
                continue
    log.warning("none of the fonts %s is installed: the key image's text uses Pillow's own "
                "(install fonts-dejavu-core for the usual one)", ", ".join(BANNER_FONTS))  # fmt: skip
    font = ImageFont.load_default(size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError("Pillow was built without FreeType: the key image's text needs it")
    return font


def _wheel_fonts(name: str) -> list[str]:
    """``name`` in the font folder of matplotlib's wheel, when matplotlib is installed."""
    import importlib.util

    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        return []
    folders = (Path(p) / "mpl-data" / "fonts" / "ttf" for p in spec.submodule_search_locations)
    return [str(f / name) for f in folders if (f / name).is_file()]


def _word_gap(font: FreeTypeFont) -> float:
    return max(float(font.getlength(" ")), WORD_GAP * float(font.size))


def _line_height(font: FreeTypeFont) -> int:
    ascent, descent = font.getmetrics()
    return int(ascent + descent) + 2


def text_width(text: str, font: FreeTypeFont) -> float:
    """The width in pixels of ``text`` laid out by :func:`draw_words`."""
    words = text.split()
    return sum(float(font.getlength(w)) for w in words) + _word_gap(font) * max(len(words) - 1, 0)


def wrap_text(text: str, font: FreeTypeFont, width: int) -> list[str]:
    """``text`` split into lines of at most ``width`` pixels at word boundaries (a word longer
    than a line keeps a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and text_width(f"{lines[-1]} {word}", font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def draw_words(
    draw: ImageDraw.ImageDraw,
    xy: tuple[float, float],
    text: str,
    font: FreeTypeFont,
    fill: tuple[int, int, int],
) -> None:
    """Draw ``text`` word by word, at least :data:`WORD_GAP` of the font size between words, so
    a space stays visible whatever font is installed."""
    x, y = xy
    gap = _word_gap(font)
    for word in text.split():
        draw.text((x, y), word, font=font, fill=fill)
        x += float(font.getlength(word)) + gap


def write_sc(
    ref: Dataset,
    volume: np.ndarray,
    spacing: Sequence[float],
    saliency: np.ndarray | None,
    result: SeriesResult,
    path: Path,
) -> Dataset:
    """A Secondary Capture image of the key slice with the result banner, in the source study."""
    import highdicom as hd

    pixels, z = render_key_image(volume, saliency, result)
    scale = 3
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=result.uid("sc-series"),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=result.uid("sc"),
        instance_number=result.revision + 1,
        manufacturer=MANUFACTURER,
        patient_orientation=("L", "P"),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    sc.SeriesDescription = _description("AI key image", result)
    sc.ImageComments = (
        f"{result.label}; probability {result.probability:.3f} at threshold "
        f"{result.threshold:.3f}; key axial slice {z} of the canonical grid"
        + ("; SHADOW MODE, NOT FOR CLINICAL USE" if result.shadow else "")
    )
    sc.BurnedInAnnotation = "YES"
    sc.PixelSpacing = [f"{float(spacing[1]) / scale:.6g}", f"{float(spacing[0]) / scale:.6g}"]
    sc.BodyPartExamined = "BRAIN"  # unpaired, so Laterality (type 2C) is absent
    _fix_dates(sc, ref)
    path.parent.mkdir(parents=True, exist_ok=True)
    sc.save_as(path, enforce_file_format=True)
    return sc


def describe_sr(ds: Any) -> dict[str, Any]:
    """The finding, probability and threshold read back from an SR written by :func:`write_sr`."""
    out: dict[str, Any] = {}

    def walk(items: Any) -> None:
        for item in items:
            name = (
                item.ConceptNameCodeSequence[0].CodeMeaning
                if "ConceptNameCodeSequence" in item
                else ""
            )
            if item.ValueType == "NUM":
                out[name] = float(item.MeasuredValueSequence[0].NumericValue)
            elif item.ValueType == "CODE" and name == "Lesion":
                out["finding"] = item.ConceptCodeSequence[0].CodeMeaning
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(ds.ContentSequence)
    return out
