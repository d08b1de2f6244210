"""From one DICOM series to the canonical volume: the one code path shared by the ingest stage and
the edge runner, so a model sees at the edge exactly the volumes it was trained on.

The rules are the validated ingest config itself (:class:`~shiftguard.config.schema.IngestConfig`:
the lab's, or the one the edge rebuilds from a bundle's manifest); also the series' short key and the
patient's age in years from its header. Imports no torch, pandas or pseudonymization: the edge runtime uses it.
"""

from __future__ import annotations

import hashlib
import re
from datetime import date
from typing import TYPE_CHECKING

from shiftguard.data.volume import Resampled, canonical_affine, resample_to_grid
from shiftguard.dicom.quarantine import QuarantineEntry
from shiftguard.dicom.series import (
    SeriesGroup,
    ValidatedSeries,
    assemble,
    deduplicate,
    validate_series,
)

if TYPE_CHECKING:
    from shiftguard.config.schema import IngestConfig
    from shiftguard.data.stream import SeriesStream

__all__ = ["canonical_volume", "parse_patient_age", "series_key"]


def series_key(series_uid: str) -> str:
    """Short stable id of a series: the first 16 hex digits of SHA-1 of its SeriesInstanceUID.

    Example:
        >>> series_key("1.2.3")
        '6f9f33482da53ff8'
    """
    return hashlib.sha1(series_uid.encode("utf-8")).hexdigest()[:16]


_AGE = re.compile(r"^\s*(\d{1,3})\s*([DWMY]?)\s*$", re.IGNORECASE)
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0, "": 1.0}


def _parse_date(text: str) -> date | None:
    text = text.strip().replace(".", "")  # old ACR-NEMA style 1990.01.31
    if len(text) < 8 or not text[:8].isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None


def parse_patient_age(age: str, birth_date: str = "", study_date: str = "") -> float | None:
    """Age in years from PatientAge (``"063Y"``, ``"006M"``, ``"010W"``, ``"005D"``), else from dates.

    Args:
        age: PatientAge (AS) text.
        birth_date: PatientBirthDate, ``YYYYMMDD``.
        study_date: StudyDate, ``YYYYMMDD``.

    Returns:
        Years (3 decimals), or ``None`` when neither source gives an age.

    Example:
        >>> parse_patient_age("063Y"), parse_patient_age("006M"), parse_patient_age("", "19600101", "20200101")
        (63.0, 0.5, 60.0)
    """
    m = _AGE.match(age or "")
    if m:
        return round(int(m.group(1)) * _AGE_UNIT_YEARS[m.group(2).upper()], 3)
    born, seen = _parse_date(birth_date), _parse_date(study_date)
    if born and seen and seen >= born:
        years = seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day))
        return float(years)
    return None


def canonical_volume(
    group: SeriesGroup, rules: IngestConfig, stream: SeriesStream | None = None
) -> tuple[ValidatedSeries, Resampled, list[QuarantineEntry]]:
    """One series' files to the canonical RAS grid: de-duplicate, validate, assemble, resample.

    The one code path from DICOM to a volume, shared by ingest and the edge runner (it imports no
    torch), so a model sees at the edge exactly the volumes it was trained on. With a ``stream``
    (the edge service's, fed while the study arrived; :mod:`shiftguard.data.stream`) the validated
    series is resampled from its reduced slices, to float32 rounding the same volume, when it can
    be; otherwise, and always without one, it is assembled and resampled whole.

    Returns:
        The validated series, the resampled volume, and notes on dropped duplicate files.

    Raises:
        InvalidSeriesError: the series cannot be used (its ``code``, ``reason`` and ``fix`` say why).
    """
    group, notes = deduplicate(group)
    series = validate_series(
        group,
        modalities=rules.modalities,
        min_slices=rules.min_slices,
        spacing_tolerance=rules.spacing_tolerance,
        orientation_tolerance=rules.orientation_tolerance,
    )
    if stream is not None:
        streamed = stream.resample(series)
        if streamed is not None:
            return series, streamed, list(notes)
    volume = assemble(series)
    out_affine = canonical_affine(series.geometry.fov_centre_ras, rules.spacing, rules.shape)
    resampled = resample_to_grid(
        volume.array,
        volume.affine,
        out_affine,
        rules.shape,
        order=rules.interpolation_order,
        antialias=rules.antialias,
    )
    return series, resampled, list(notes)
