"""Series validation and assembly: slice headers -> validated geometry -> one volume.

A series is assembled only after validation, and validation never guesses:

* grouping is by (StudyInstanceUID, SeriesInstanceUID) only;
* the same instance stored twice (same SOPInstanceUID, same geometry) is de-duplicated and reported;
* one modality from the allowed list, grayscale, one slice geometry (rows/columns, pixel spacing,
  orientation within tolerance); a series mixing geometries is rejected with a description of each;
* slices are ordered by the projection of ImagePositionPatient on the slice normal (the cross product
  of the row and column direction cosines), never by file name or InstanceNumber;
* two different instances at one position, a missing slice, irregular spacing or positions off a
  straight line reject the series with the positions involved.

Volumes use the voxel convention ``array[i, j, k]`` with ``i`` the column index (X), ``j`` the row
index (Y) and ``k`` the slice index along the normal (Z), and a 4x4 affine mapping ``(i, j, k, 1)`` to
patient coordinates in mm. DICOM patient coordinates are LPS; :attr:`SeriesVolume.affine` is RAS
(x and y negated), as NIfTI expects.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from shiftguard.dicom.pixels import read_stored, stored_dtype
from shiftguard.dicom.quarantine import QuarantineEntry
from shiftguard.dicom.scan import SliceHeader
from shiftguard.errors import InvalidSeriesError

log = logging.getLogger(__name__)

__all__ = [
    "LPS_TO_RAS",
    "OBLIQUE_THRESHOLD_DEG",
    "SeriesGeometry",
    "SeriesGroup",
    "SeriesVolume",
    "ValidatedSeries",
    "assemble",
    "deduplicate",
    "group_series",
    "load_series",
    "orientation_label",
    "validate_series",
]

#: Flips DICOM LPS patient coordinates to RAS (NIfTI): x and y change sign.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: A slice normal further than this from the nearest patient axis makes the series "oblique".
OBLIQUE_THRESHOLD_DEG = 2.0
#: Two slices closer than this along the normal (mm) are at the same position.
SAME_POSITION_MM = 1e-2
_AXIS_PLANE = ("sagittal", "coronal", "axial")  # normal mostly along x (L-R), y (A-P), z (S-I)


@dataclass(frozen=True)
class _SeriesSlices:
    """Slice headers of one (StudyInstanceUID, SeriesInstanceUID)."""

    study_uid: str
    series_uid: str
    headers: tuple[SliceHeader, ...]

    @property
    def files(self) -> tuple[str, ...]:
        """Distinct files of the slices, sorted."""
        return tuple(sorted({h.path for h in self.headers}))


@dataclass(frozen=True)
class SeriesGroup(_SeriesSlices):
    """The slices that claim one (StudyInstanceUID, SeriesInstanceUID), sorted by path and frame."""


@dataclass(frozen=True)
class SeriesGeometry:
    """Where a validated series lies in patient space.

    Attributes:
        affine_lps: ``(4, 4)`` voxel ``(i=column, j=row, k=slice)`` -> LPS mm.
        shape: ``(X, Y, Z)`` = ``(columns, rows, slices)``.
        pixel_spacing: ``(row spacing, column spacing)`` in mm, as DICOM PixelSpacing.
        slice_spacing: Nominal centre-to-centre distance of slices along the normal (mm).
        slice_thickness: SliceThickness of the first slice, ``None`` when absent.
        normal: ``(3,)`` unit slice normal in LPS (row cosines x column cosines).
        positions: ``(Z,)`` slice positions along the normal (mm), increasing.
        orientation: ``"axial"``, ``"coronal"`` or ``"sagittal"``, with ``" oblique"`` appended
            when the normal is more than :data:`OBLIQUE_THRESHOLD_DEG` off that axis.
        tilt_deg: Angle between the normal and the nearest patient axis (degrees).
        shear_deg: Angle between the slice-to-slice step and the normal (CT gantry tilt), degrees.
    """

    affine_lps: np.ndarray
    shape: tuple[int, int, int]
    pixel_spacing: tuple[float, float]
    slice_spacing: float
    slice_thickness: float | None
    normal: np.ndarray
    positions: np.ndarray
    orientation: str
    tilt_deg: float
    shear_deg: float

    @property
    def affine_ras(self) -> np.ndarray:
        """``(4, 4)`` voxel -> RAS mm."""
        return LPS_TO_RAS @ self.affine_lps

    @property
    def fov_centre_ras(self) -> np.ndarray:
        """``(3,)`` RAS position (mm) of the centre of the series' field of view."""
        centre = (np.asarray(self.shape, dtype=float) - 1.0) / 2.0
        return (self.affine_ras @ np.append(centre, 1.0))[:3]


@dataclass(frozen=True)
class ValidatedSeries(_SeriesSlices):
    """A series that passed validation: headers ordered along the normal, and its geometry."""

    geometry: SeriesGeometry


@dataclass(frozen=True)
class SeriesVolume:
    """An assembled series.

    Attributes:
        array: ``(X, Y, Z)`` = ``(columns, rows, slices)`` float32 values after each slice's
            RescaleSlope/RescaleIntercept (Fortran-ordered: a transposed view of the slice stack).
        affine: ``(4, 4)`` voxel -> RAS mm.
        series: The validated series (headers and geometry).
    """

    array: np.ndarray
    affine: np.ndarray
    series: ValidatedSeries

    @property
    def geometry(self) -> SeriesGeometry:
        """Geometry of the series."""
        return self.series.geometry


# --------------------------------------------------------------------------------------------------
# Grouping and de-duplication
# --------------------------------------------------------------------------------------------------


def group_series(headers: Iterable[SliceHeader]) -> list[SeriesGroup]:
    """Group slice headers by (StudyInstanceUID, SeriesInstanceUID).

    Args:
        headers: Slice headers from the scan, in any order.

    Returns:
        Groups sorted by (study, series) UID, each with headers sorted by (path, frame).
    """
    groups: dict[tuple[str, str], list[SliceHeader]] = defaultdict(list)
    for h in headers:
        groups[(h.study_uid, h.series_uid)].append(h)
    return [
        SeriesGroup(study, series, tuple(sorted(hs, key=lambda h: (h.path, h.frame))))
        for (study, series), hs in sorted(groups.items())
    ]


def deduplicate(group: SeriesGroup) -> tuple[SeriesGroup, list[QuarantineEntry]]:
    """Drop exact duplicate instances (same SOPInstanceUID and frame stored in several files).

    The first file in path order is kept; every other copy gets a file-level quarantine entry with
    code ``"duplicate_instance"``. Copies whose geometry differs are not duplicates of one instance
    but a conflict: they make the series invalid.

    Args:
        group: A series group.

    Returns:
        ``(group without the extra copies, one entry per dropped file)``.

    Raises:
        InvalidSeriesError: Two files carry one SOPInstanceUID but different geometry or size.
    """
    seen: dict[tuple[str, int], SliceHeader] = {}
    kept: list[SliceHeader] = []
    dropped: dict[str, str] = {}
    for h in group.headers:
        key = (h.sop_instance_uid, h.frame)
        first = seen.get(key)
        if first is None:
            seen[key] = h
            kept.append(h)
            continue
        if (first.ipp, first.iop, first.rows, first.cols, first.pixel_spacing) != (
            h.ipp,
            h.iop,
            h.rows,
            h.cols,
            h.pixel_spacing,
        ):
            raise InvalidSeriesError(
                "conflicting_duplicate_uid",
                f"{first.path} and {h.path} carry the same SOPInstanceUID {h.sop_instance_uid} "
                "but different position, orientation or size",
                "one of the two files was edited or mislabelled: remove the wrong one, or give it "
                "a new SOPInstanceUID",
                group.files,
            )
        dropped[h.path] = first.path
    if not dropped:
        return group, []
    # A multi-frame file is dropped only when all its frames are copies.
    dropped_paths = {p for p in dropped if all(h.path != p for h in kept)}
    kept = [h for h in kept if h.path not in dropped_paths] if dropped_paths else kept
    notes = [
        QuarantineEntry(
            path,
            "file",
            group.series_uid,
            "duplicate_instance",
            f"the same instance is stored twice: SOPInstanceUID already read from {dropped[path]}; "
            "this copy was ignored",
            "nothing to do (the copy is redundant); delete it to silence this note",
            (path,),
        )
        for path in sorted(dropped_paths)
    ]
    return SeriesGroup(group.study_uid, group.series_uid, tuple(kept)), notes


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def orientation_label(normal: np.ndarray) -> tuple[str, float]:
    """Name the acquisition plane of a slice normal and how far it tilts from the nearest axis.

    Args:
        normal: ``(3,)`` unit normal in LPS (or RAS: the label does not depend on axis signs).

    Returns:
        ``(label, tilt_deg)``, e.g. ``("axial", 0.0)`` or ``("axial oblique", 12.0)``.

    Example:
        >>> orientation_label(np.array([0.0, 0.0, 1.0]))
        ('axial', 0.0)
    """
    n = np.abs(np.asarray(normal, dtype=float))
    axis = int(np.argmax(n))
    tilt = float(np.degrees(np.arccos(np.clip(n[axis] / max(np.linalg.norm(n), 1e-12), -1, 1))))
    label = _AXIS_PLANE[axis]
    if tilt > OBLIQUE_THRESHOLD_DEG:
        label += " oblique"
    return label, round(tilt, 6)


def _fmt(values: Iterable[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def _describe(headers: Sequence[SliceHeader]) -> str:
    h = headers[0]
    plane = "unknown plane"
    if h.iop is not None:
        r, c = np.asarray(h.iop[:3]), np.asarray(h.iop[3:])
        plane = orientation_label(np.cross(r, c))[0]
    spacing = "x".join(f"{v:.4g}" for v in h.pixel_spacing) if h.pixel_spacing else "?"
    return f"{len(headers)} slice(s) {plane} {h.rows}x{h.cols} spacing {spacing} mm"


def _split_geometries(
    headers: Sequence[SliceHeader], orientation_tolerance: float
) -> list[list[SliceHeader]]:
    """Cluster slices by (rows, cols, pixel spacing, orientation within tolerance).

    Each slice joins the first cluster whose first member it matches; vectorised over slices, one
    pass per cluster.
    """
    size = np.array([(h.rows, h.cols) for h in headers])
    iop = np.array([h.iop for h in headers], dtype=float)
    ps = np.array([h.pixel_spacing for h in headers], dtype=float)
    label = np.full(len(headers), -1)
    clusters: list[list[SliceHeader]] = []
    while (label < 0).any():
        ref = int(np.flatnonzero(label < 0)[0])
        match = (
            (label < 0)
            & (size == size[ref]).all(axis=1)
            & (np.abs(iop - iop[ref]) <= orientation_tolerance).all(axis=1)
            & (np.abs(ps - ps[ref]) <= 1e-6 + 1e-4 * np.abs(ps[ref])).all(axis=1)
        )
        label[match] = len(clusters)
        clusters.append([headers[int(i)] for i in np.flatnonzero(match)])
    return clusters


def validate_series(
    group: SeriesGroup,
    *,
    modalities: Sequence[str] = ("MR", "CT"),
    min_slices: int = 1,
    spacing_tolerance: float = 0.05,
    orientation_tolerance: float = 1e-3,
) -> ValidatedSeries:
    """Check that a (de-duplicated) group is one regular volume and compute its geometry.

    Args:
        group: Headers of one series (see :func:`group_series`, :func:`deduplicate`).
        modalities: Modalities that may be assembled (upper case).
        min_slices: Fewer slices than this reject the series.
        spacing_tolerance: Relative tolerance on the uniformity of slice spacing.
        orientation_tolerance: Absolute tolerance on each direction cosine.

    Returns:
        The headers ordered along the slice normal, and the series geometry.

    Raises:
        InvalidSeriesError: The series is not a regular volume; ``code`` and ``reason`` say why.
    """
    headers = list(group.headers)
    files = group.files

    def fail(code: str, reason: str, fix: str) -> InvalidSeriesError:
        return InvalidSeriesError(code, reason, fix, files)

    if not headers:
        raise fail("empty_series", "the series has no slices", "nothing to ingest")

    found = sorted({h.modality for h in headers})
    allowed = [m.upper() for m in modalities]
    if len(found) > 1:
        raise fail(
            "mixed_modality",
            f"one SeriesInstanceUID holds several modalities: {', '.join(found)}",
            "split the series (give each modality its own SeriesInstanceUID) and ingest again",
        )
    if found[0] not in allowed:
        raise fail(
            "unsupported_modality",
            f"modality {found[0] or '(empty)'!r} is not one of the ingested modalities "
            f"({', '.join(allowed)})",
            "add the modality to ingest.modalities if such series should become volumes; "
            "otherwise nothing to do",
        )

    bad_format = [h for h in headers if h.samples_per_pixel != 1]
    bad_format += [h for h in headers if h.photometric not in ("MONOCHROME1", "MONOCHROME2")]
    if bad_format:
        h = bad_format[0]
        raise fail(
            "not_grayscale",
            f"{len(bad_format)} slice(s) are not grayscale (e.g. {h.path}: "
            f"{h.samples_per_pixel} samples per pixel, photometric interpretation "
            f"{h.photometric or 'missing'})",
            "ingest builds grayscale volumes (MONOCHROME1/2, one sample per pixel); convert or "
            "remove the colour images",
        )
    empty = [h for h in headers if h.rows <= 0 or h.cols <= 0]
    if empty:
        raise fail(
            "empty_image",
            f"{len(empty)} slice(s) have {empty[0].rows} rows x {empty[0].cols} columns "
            f"(e.g. {empty[0].path})",
            "re-export the series; Rows (0028,0010) and Columns (0028,0011) must be positive",
        )
    pixel_formats = {(h.bits_allocated, h.pixel_representation) for h in headers}
    if len(pixel_formats) > 1:
        raise fail(
            "mixed_pixel_format",
            "slices differ in BitsAllocated/PixelRepresentation: "
            + ", ".join(
                f"{b} bits {'signed' if s else 'unsigned'}" for b, s in sorted(pixel_formats)
            ),
            "re-export the series so that all slices share one pixel format",
        )
    try:
        stored_dtype(headers[0])
    except InvalidSeriesError as err:
        raise fail(err.code, err.reason, err.fix) from None

    for attr, tag in (
        ("iop", "ImageOrientationPatient (0020,0037)"),
        ("ipp", "ImagePositionPatient (0020,0032)"),
        ("pixel_spacing", "PixelSpacing (0028,0030)"),
    ):
        missing = [h for h in headers if getattr(h, attr) is None]
        if missing:
            raise fail(
                "missing_geometry",
                f"{len(missing)} of {len(headers)} slice(s) have no {tag} (e.g. {missing[0].path}), "
                "so the slices cannot be placed in space",
                "only cross-sectional images with position, orientation and pixel spacing can "
                "become volumes; projection images (CR/DX) or stripped headers cannot",
            )
    frames_of_ref = sorted({h.frame_of_reference_uid for h in headers})
    if len(frames_of_ref) > 1:
        raise fail(
            "mixed_frame_of_reference",
            f"slices belong to {len(frames_of_ref)} frames of reference "
            f"({', '.join(f or '(empty)' for f in frames_of_ref)}); their positions are not "
            "comparable",
            "split the series so that each part has one FrameOfReferenceUID",
        )

    clusters = _split_geometries(headers, orientation_tolerance)
    if len(clusters) > 1:
        parts = "; ".join(_describe(c) for c in sorted(clusters, key=len, reverse=True))
        raise fail(
            "mixed_geometry",
            f"one SeriesInstanceUID mixes {len(clusters)} slice geometries: {parts}",
            "split the series by geometry (e.g. remove localizer images, or give each stack its "
            "own SeriesInstanceUID) and ingest again",
        )

    if len(headers) < min_slices:
        raise fail(
            "too_few_slices",
            f"{len(headers)} slice(s), fewer than ingest.min_slices = {min_slices}: not a volume",
            "lower ingest.min_slices if such short series should be kept; otherwise nothing to "
            "do (e.g. localizers, single images)",
        )

    iop = np.array([h.iop for h in headers], dtype=float).mean(axis=0)
    row_dir, col_dir = iop[:3], iop[3:]
    norms = np.linalg.norm(row_dir), np.linalg.norm(col_dir)
    if min(norms) < 0.5 or abs(float(row_dir @ col_dir)) / (norms[0] * norms[1]) > 1e-2:
        raise fail(
            "invalid_orientation",
            f"ImageOrientationPatient {_fmt(headers[0].iop or ())} does not hold two orthogonal "
            "unit vectors",
            "correct ImageOrientationPatient (0020,0037); the header is damaged",
        )
    row_dir = row_dir / norms[0]
    col_dir = col_dir / norms[1]
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)

    ipp = np.array([h.ipp for h in headers], dtype=float)
    dist = ipp @ normal
    order = np.argsort(dist, kind="stable")
    headers = [headers[i] for i in order]
    ipp = ipp[order]
    dist = dist[order]
    n = len(headers)

    gaps = np.diff(dist)
    same = np.flatnonzero(gaps < SAME_POSITION_MM)
    if same.size:
        pairs = [(headers[i], headers[i + 1]) for i in same[:3]]
        detail = "; ".join(
            f"{a.path} and {b.path} at {dist[i]:.3f} mm"
            for (a, b), i in zip(pairs, same, strict=False)
        )
        hint = _same_position_hint(headers, same)
        raise fail(
            "duplicate_position",
            f"duplicated slice position: {same.size} pair(s) of different instances at the same "
            f"position along the normal ({detail}){hint}",
            "the series holds more than one image per position (echoes, time points, repeated "
            "slices): split it (e.g. by EchoTime, AcquisitionNumber or TemporalPositionIdentifier) "
            "or remove the extra images, then ingest again",
        )

    ps_row, ps_col = (float(v) for v in headers[0].pixel_spacing or (1.0, 1.0))
    if n > 1:
        nominal = float(np.median(gaps))
        _check_spacing(dist, gaps, nominal, spacing_tolerance, fail)
        step = (ipp[-1] - ipp[0]) / (n - 1)
        expected = ipp[0] + np.outer(np.arange(n), step)
        off_line = np.linalg.norm(ipp - expected, axis=1)
        limit = spacing_tolerance * nominal + 1e-3
        worst = int(np.argmax(off_line))
        if off_line[worst] > limit:
            raise fail(
                "inconsistent_positions",
                f"slice positions do not lie on a straight line: {headers[worst].path} is "
                f"{off_line[worst]:.3f} mm off the line through the first and last slice "
                f"(tolerance {limit:.3f} mm)",
                "the series mixes stacks or has edited positions: split it or re-export it",
            )
    else:
        h = headers[0]
        nominal = float(h.spacing_between_slices or h.slice_thickness or 1.0)
        step = normal * nominal

    affine = np.eye(4)
    affine[:3, 0] = row_dir * ps_col  # i (column index) moves along the row direction
    affine[:3, 1] = col_dir * ps_row  # j (row index) moves along the column direction
    affine[:3, 2] = step
    affine[:3, 3] = ipp[0]
    label, tilt = orientation_label(normal)
    cos_shear = float(abs(step @ normal) / max(np.linalg.norm(step), 1e-12))
    shear = float(np.degrees(np.arccos(np.clip(cos_shear, -1.0, 1.0))))
    geometry = SeriesGeometry(
        affine_lps=affine,
        shape=(headers[0].cols, headers[0].rows, n),
        pixel_spacing=(ps_row, ps_col),
        slice_spacing=nominal,
        slice_thickness=headers[0].slice_thickness,
        normal=normal,
        positions=dist,
        orientation=label,
        tilt_deg=tilt,
        shear_deg=round(shear, 6),
    )
    return ValidatedSeries(group.study_uid, group.series_uid, tuple(headers), geometry)


def _same_position_hint(headers: Sequence[SliceHeader], same: np.ndarray) -> str:
    a, b = headers[int(same[0])], headers[int(same[0]) + 1]
    if a.echo_time is not None and b.echo_time is not None and a.echo_time != b.echo_time:
        return f"; echo times differ ({a.echo_time:g} vs {b.echo_time:g} ms): a multi-echo series"
    if a.acquisition_number != b.acquisition_number:
        return (
            f"; acquisition numbers differ ({a.acquisition_number} vs {b.acquisition_number}): "
            "repeated acquisitions"
        )
    return ""


def _check_spacing(
    dist: np.ndarray,
    gaps: np.ndarray,
    nominal: float,
    tolerance: float,
    fail: Callable[[str, str, str], InvalidSeriesError],
) -> None:
    """Raise when a gap between consecutive positions is not the nominal spacing."""
    off = np.abs(gaps - nominal) > tolerance * nominal
    if not off.any():
        return
    missing: list[str] = []
    irregular: list[str] = []
    for i in np.flatnonzero(off):
        gap = float(gaps[i])
        m = round(gap / nominal)
        where = f"between positions {dist[i]:.3f} and {dist[i + 1]:.3f} mm"
        if m >= 2 and abs(gap - m * nominal) <= tolerance * nominal * m:
            missing.append(f"{where} ({m - 1} slice(s) missing: gap {gap:.3f} mm)")
        else:
            irregular.append(f"{where} (gap {gap:.3f} mm)")
    if missing:
        more = f" and {len(missing) - 3} more gap(s)" if len(missing) > 3 else ""
        also = f"; irregular spacing {irregular[0]}" if irregular else ""
        raise fail(
            "missing_slice",
            f"missing slice(s) {'; '.join(missing[:3])}{more}; expected spacing {nominal:.4g} mm"
            f"{also}",
            "send the complete series again from the scanner or PACS (instances are missing), or "
            "check the quarantine report for unreadable files of this series",
        )
    more = f" and {len(irregular) - 3} more" if len(irregular) > 3 else ""
    raise fail(
        "irregular_spacing",
        f"slice spacing is not uniform (median {nominal:.4g} mm, tolerance "
        f"{tolerance:.0%}): {'; '.join(irregular[:3])}{more}",
        "resample the series to uniform spacing at the source, split it into regular parts, or "
        "raise ingest.spacing_tolerance if the variation is acceptable",
    )


# --------------------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------------------


#: slices read at a time when a series is assembled: the float32 volume plus this many stored
#: slices is the most it holds (a 1 GB study of 16-bit slices: 2 GB, not 3)
ASSEMBLE_CHUNK = 32


def assemble(series: ValidatedSeries) -> SeriesVolume:
    """Read, rescale and stack the pixels of a validated series.

    Rescale slope and intercept are applied per slice (they may differ between slices). The
    stored values are read :data:`ASSEMBLE_CHUNK` slices at a time into the float32 volume.

    Args:
        series: A validated series.

    Returns:
        The volume: ``array`` ``(X, Y, Z)`` float32, ``affine`` voxel -> RAS.

    Raises:
        PixelDecodeError: A slice cannot be read or decoded (the file is named).
    """
    headers = series.headers
    slopes = np.array([h.rescale_slope for h in headers], dtype=np.float64)
    intercepts = np.array([h.rescale_intercept for h in headers], dtype=np.float64)
    if any(h.n_frames > 1 for h in headers):  # a multi-frame file is decoded once, whole
        values = read_stored(headers).astype(np.float32)
    else:  # in chunks, so the stored values never all sit beside the float32 volume
        first = headers[0]
        values = np.empty((len(headers), first.rows, first.cols), dtype=np.float32)  # (Z, Y, X)
        for start in range(0, len(headers), ASSEMBLE_CHUNK):
            values[start : start + ASSEMBLE_CHUNK] = read_stored(
                headers[start : start + ASSEMBLE_CHUNK]
            )
    if np.any(slopes != 1.0):
        if np.all(slopes == slopes[0]):
            values *= np.float32(slopes[0])
        else:
            values *= slopes.astype(np.float32)[:, None, None]
    if np.any(intercepts != 0.0):
        if np.all(intercepts == intercepts[0]):
            values += np.float32(intercepts[0])
        else:
            values += intercepts.astype(np.float32)[:, None, None]
    array = values.transpose(2, 1, 0)  # (X, Y, Z), Fortran-contiguous view
    return SeriesVolume(array=array, affine=series.geometry.affine_ras, series=series)


def load_series(
    group: SeriesGroup,
    *,
    modalities: Sequence[str] = ("MR", "CT"),
    min_slices: int = 1,
    spacing_tolerance: float = 0.05,
    orientation_tolerance: float = 1e-3,
) -> tuple[SeriesVolume, list[QuarantineEntry]]:
    """De-duplicate, validate and assemble one group (convenience for library use and tests).

    Returns:
        ``(volume, notes)`` where ``notes`` are the duplicate-instance entries.

    Raises:
        InvalidSeriesError: The series is not a valid volume.
    """
    group, notes = deduplicate(group)
    series = validate_series(
        group,
        modalities=modalities,
        min_slices=min_slices,
        spacing_tolerance=spacing_tolerance,
        orientation_tolerance=orientation_tolerance,
    )
    return assemble(series), notes
