"""Offline prediction: a folder of DICOM in, an SR and a key image per selected series out.

``shiftguard edge predict --bundle BUNDLE DICOM_DIR --out OUT_DIR``:

1. read every file's header (:func:`shiftguard.dicom.scan.scan_files`); files that are not images
   (RT, SR, waveforms, non-DICOM) are recorded as skipped with the reason;
2. group slices into series and select them by the bundle's rules (modality, series description
   pattern, minimum slices, orientation), recording why a series was skipped;
3. build each selected series' canonical volume with the code ingest uses
   (:func:`shiftguard.data.canonical.canonical_volume`), preprocess it in numpy
   (:mod:`shiftguard.edge.preprocess`) and run the ONNX model (:mod:`shiftguard.edge.infer`);
4. write a Comprehensive 3D SR and a Secondary Capture key image into ``OUT_DIR`` (deterministic
   UIDs: re-running never creates duplicates), and ``results.csv`` / ``skipped.csv``: the same
   input gives the same bytes. How long each step took goes to ``timings.csv`` (in ``OUT_DIR``
   unless the caller names another file), so that a pipeline can keep it out of what it hashes.

Nothing here imports torch, MONAI, MLflow or DVC.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import ValidationError

from shiftguard.config.deploy import SeriesSelection
from shiftguard.config.schema import IngestConfig
from shiftguard.data.canonical import canonical_volume, parse_patient_age, series_key
from shiftguard.data.volume import volume_stats
from shiftguard.dicom.scan import list_files, scan_files
from shiftguard.dicom.series import SeriesGroup, group_series
from shiftguard.edge.bundle import Bundle
from shiftguard.edge.dicom_out import SeriesResult, write_sc, write_sr
from shiftguard.edge.infer import Model
from shiftguard.edge.preprocess import preprocess
from shiftguard.errors import BundleError, InputError, InvalidSeriesError
from shiftguard.records.features import (
    FEATURE_NAMES,
    Projection,
    acquisition_features,
    image_features,
    output_features,
    segment_features,
)
from shiftguard.utils import write_csv

if TYPE_CHECKING:
    from shiftguard.data.stream import SeriesStream
    from shiftguard.dicom.scan import SliceHeader
    from shiftguard.edge.prefetch import PreparedStudy

log = logging.getLogger(__name__)


RESULTS_CSV = "results.csv"
SKIPPED_CSV = "skipped.csv"
TIMINGS_CSV = "timings.csv"
#: seconds per step of one series, in ``timings.csv`` (and in the rows ``predict_*`` return)
TIMING_COLUMNS = ("read_s", "preprocess_s", "infer_s", "features_s", "write_s")
STREAMED = "resampling"  # the row's key for how its volume was resampled (taken out of the row)
#: PHI-free features recorded per series: the drift monitor's inputs (shiftguard.records.features)
FEATURES = tuple(
    name
    for name in FEATURE_NAMES
    if name not in ("manufacturer", "scanner_model", "field_strength", "n_slices", "probability")
)
PROJECTION_MEMBER = "embedding_pca.json"
RESULT_COLUMNS = (
    "series_key",
    "study_uid",
    "study_datetime",
    "series_uid",
    "series_description",
    "manufacturer",
    "scanner_model",
    "field_strength",
    "n_slices",
    "probability",
    "raw_probability",
    "threshold",
    "result",
    "shadow",
    "model",
    "model_version",
    "institution",
    "patient_age",
    *FEATURES,
    "sr_file",
    "sc_file",
    "sr_uid",
    "sc_uid",
)
"""The columns of ``results.csv``: no timings (see :data:`TIMING_COLUMNS`)."""
SKIPPED_COLUMNS = ("path", "series_uid", "series_description", "code", "reason")


def selection_from_manifest(section: Mapping[str, Any]) -> SeriesSelection:
    """The manifest's ``series_selection`` (what export wrote from its validated config), validated
    again on load; a bundle written before the section existed selects MR series of any size."""
    return SeriesSelection.model_validate({"min_slices": 1, **section})


def header_refusal(
    selection: SeriesSelection, group: SeriesGroup, count: bool = True
) -> tuple[str, str] | None:
    """``(code, reason)`` when the series' header rules it out, before any pixel is read
    (``count=False``: on its modality and description only, as for one slice while the rest
    arrive)."""
    h = group.headers[0]
    modalities = [m.upper() for m in selection.modalities]
    if h.modality.upper() not in modalities:
        return (
            "modality",
            f"modality {h.modality or '(none)'} is not {'/'.join(modalities)}",
        )
    pattern = selection.series_description
    if pattern and not re.search(pattern, h.series_description, re.I):
        return (
            "series_description",
            f"series description {h.series_description!r} does not match {pattern!r}",
        )
    if count and len(group.headers) < selection.min_slices:
        return "too_few_slices", f"{len(group.headers)} slices, fewer than {selection.min_slices}"
    return None


def orientation_refusal(selection: SeriesSelection, orientation: str) -> tuple[str, str] | None:
    """``(code, reason)`` when the series' orientation is not one the model is for."""
    if selection.orientations and orientation not in selection.orientations:
        return (
            "orientation",
            f"orientation {orientation!r} is not one of {', '.join(selection.orientations)}",
        )
    return None


@dataclass
class Analysis:
    """One series through the runner, before anything is written."""

    series: Any
    resampled: Any
    ref: Any
    probability: float  # calibrated by the bundle's map: the one reported
    saliency: np.ndarray | None
    embedding: np.ndarray | None
    features: dict[str, Any]
    timings: dict[str, float]
    raw_probability: float = float("nan")  # the network's own


@dataclass
class PredictSummary:
    """What one ``predict`` call did."""

    results: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    streamed: int = 0  # series resampled from slices prepared while they arrived

    @property
    def n_predicted(self) -> int:
        return len(self.results)


def rules_from_manifest(manifest: Mapping[str, Any]) -> IngestConfig:
    """The ingest rules the model was trained with (``preprocessing.canonical_grid`` and the series
    selection's modalities and minimum slices), as the validated ingest config the lab used."""
    grid = manifest["preprocessing"]["canonical_grid"]
    sel = manifest.get("series_selection", {})
    return IngestConfig(
        spacing=grid["spacing"],
        shape=grid["shape"],
        interpolation_order=grid["interpolation_order"],
        antialias=grid["antialias"],
        min_slices=sel.get("min_slices", 1),
        modalities=list(sel.get("modalities", ["MR"])),
        spacing_tolerance=grid["spacing_tolerance"],
        orientation_tolerance=grid["orientation_tolerance"],
    )


class Predictor:
    """A verified bundle made ready to predict: its model session, rules and preprocessing."""

    def __init__(
        self, bundle: Bundle, shadow: bool = False, providers: Sequence[str] | None = None
    ):
        self.bundle = bundle
        self.shadow = shadow
        self.model = Model(bundle, providers=providers)
        try:
            self.rules = rules_from_manifest(bundle.manifest)
            self.selection = selection_from_manifest(bundle.manifest.get("series_selection", {}))
        except (KeyError, ValidationError) as exc:
            raise BundleError(
                f"{bundle.path}: the manifest's canonical grid or series selection is not usable "
                f"({exc}); export the bundle again"
            ) from None
        self.projection: Projection | None = None
        if PROJECTION_MEMBER in bundle.members:
            self.projection = Projection.from_json(json.loads(bundle.text(PROJECTION_MEMBER)))

    def wants(self, h: SliceHeader) -> bool:
        """Whether a slice's series may be one this model reads (modality and description: what
        one slice can tell), so that it is worth resampling while the rest of the study arrives."""
        return header_refusal(self.selection, SeriesGroup(h.study_uid, h.series_uid, (h,)),
                              count=False) is None  # fmt: skip

    def analyse(self, group: SeriesGroup, stream: SeriesStream | None = None) -> Analysis:
        """Read, resample, preprocess and infer one series, and compute its monitor features;
        raises InvalidSeriesError when the series is unusable. Writes nothing. ``stream``: the
        series' slices reduced while they arrived (used when it was fed with this model's grid).
        """
        import pydicom

        began = time.perf_counter()
        if stream is not None and stream.rules != self.rules:
            stream = None  # fed for another bundle's grid (a swap in between)
        series, resampled, _notes = canonical_volume(group, self.rules, stream)
        rejected = orientation_refusal(self.selection, series.geometry.orientation)
        if rejected:
            raise InvalidSeriesError(rejected[0], rejected[1], "not a series this model is for")
        ref = pydicom.dcmread(series.headers[0].path, stop_before_pixels=True)
        read_s = time.perf_counter() - began

        mark = time.perf_counter()
        image = preprocess(resampled.array, self.bundle.manifest["preprocessing"])
        stats = volume_stats(resampled.array, resampled.inside)
        preprocess_s = time.perf_counter() - mark

        mark = time.perf_counter()
        raw, saliency, embedding = self.model.infer(image)
        probability = self.bundle.calibration.apply_one(raw)
        infer_s = time.perf_counter() - mark

        mark = time.perf_counter()
        h = series.headers[0]
        projection = (
            self.projection.project(embedding)
            if self.projection is not None and embedding is not None
            else None
        )
        features = {
            **acquisition_features(h, len(series.headers), ref),
            **image_features(resampled.array, resampled.inside, stats),
            **output_features(probability, projection),
            **segment_features(h),
        }
        features_s = time.perf_counter() - mark
        return Analysis(
            series=series,
            resampled=resampled,
            ref=ref,
            probability=probability,
            saliency=saliency,
            embedding=embedding,
            features=features,
            timings={
                "read_s": read_s,
                "preprocess_s": preprocess_s,
                "infer_s": infer_s,
                "features_s": features_s,
            },
            raw_probability=raw,
        )

    def predict_group(
        self,
        group: SeriesGroup,
        out_dir: Path,
        revision: int = 0,
        stream: SeriesStream | None = None,
    ) -> dict[str, Any]:
        """Predict one series and write its SR and SC (``revision``: see
        :class:`~shiftguard.edge.dicom_out.SeriesResult`; ``stream``: see :meth:`analyse`);
        raises InvalidSeriesError when unusable."""
        a = self.analyse(group, stream)
        series = a.series
        mark = time.perf_counter()
        result = SeriesResult(
            series_uid=series.series_uid,
            probability=a.probability,
            threshold=self.bundle.threshold,
            model_name=self.bundle.name,
            model_version=self.bundle.version,
            shadow=self.shadow,
            revision=revision,
        )
        key = series_key(series.series_uid)
        tag = f"_r{revision}" if revision else ""  # a revision never overwrites what may be sent
        sr_path = out_dir / f"{key}_SR{tag}.dcm"
        sc_path = out_dir / f"{key}_SC{tag}.dcm"
        write_sr(a.ref, series.headers, result, sr_path)
        write_sc(a.ref, a.resampled.array, self.rules.spacing, a.saliency, result, sc_path)
        write_s = time.perf_counter() - mark

        h = series.headers[0]
        row: dict[str, Any] = {
            "series_key": key,
            "study_uid": series.study_uid,
            "study_datetime": study_datetime(h.study_date, h.study_time),
            "series_uid": series.series_uid,
            "series_description": h.series_description,
            "manufacturer": a.features["manufacturer"],
            "scanner_model": a.features["scanner_model"],
            "field_strength": "" if h.field_strength is None else h.field_strength,
            "n_slices": len(series.headers),
            "probability": round(a.probability, 6),
            "raw_probability": round(a.raw_probability, 6),
            "threshold": round(self.bundle.threshold, 6),
            "result": result.label,
            "shadow": int(self.shadow),
            "model": self.bundle.name,
            "model_version": self.bundle.version,
            # segments for shadow evaluation (the shadow log stays on site; the monitor's
            # records carry only the age band)
            "institution": " ".join(h.institution.split())[:64],
            "patient_age": _round(
                parse_patient_age(h.patient_age, h.patient_birth_date, h.study_date)
            ),
            **{name: _round(a.features.get(name)) for name in FEATURES},
            "sr_file": sr_path.name,
            "sc_file": sc_path.name,
            "sr_uid": result.uid("sr"),
            "sc_uid": result.uid("sc"),
            **{name: round(value, 4) for name, value in a.timings.items()},
            "write_s": round(write_s, 4),
            STREAMED: a.resampled.method,
        }
        return row

    def predict_folder(
        self,
        dicom_dirs: Path | Sequence[Path],
        out_dir: Path,
        timings_csv: Path | None = None,
        series: Collection[str] | None = None,
    ) -> PredictSummary:
        """Every series under ``dicom_dirs`` (only those whose SeriesInstanceUID is in ``series``,
        when given: other series and unreadable files are passed over, not reported); results and
        skip reasons go to ``out_dir``, the timings to ``timings_csv`` (default
        ``out_dir/timings.csv``).

        Raises:
            InputError: a DICOM folder does not exist.
        """
        began = time.perf_counter()
        dirs = [Path(dicom_dirs)] if isinstance(dicom_dirs, str | Path) else list(dicom_dirs)
        out_dir = Path(out_dir)
        for folder in dirs:
            if not folder.is_dir():
                raise InputError(f"{folder}: no such DICOM folder")
        files = [f for folder in dirs for f in list_files(folder, exclude=[out_dir])]
        summary = self.predict_files(files, out_dir, timings_csv, series=series)
        summary.seconds = time.perf_counter() - began
        return summary

    def predict_files(
        self,
        files: Sequence[str | Path],
        out_dir: Path,
        timings_csv: Path | None = None,
        revision: int = 0,
        series: Collection[str] | None = None,
        prepared: PreparedStudy | None = None,
    ) -> PredictSummary:
        """Every series among ``files`` (what the edge service received for one study); results,
        ``results.csv`` and ``skipped.csv`` go to ``out_dir``, the seconds each step took to
        ``timings_csv`` (default ``out_dir/timings.csv``). ``revision``: the study's (see
        :meth:`~shiftguard.edge.queue.WorkQueue.study_revision`), which the result objects'
        instance UIDs and numbers carry. ``prepared``: what was read of the files while they
        arrived (their headers, the series' streams); the files it has not seen are read now."""
        began = time.perf_counter()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        summary = PredictSummary()
        if prepared is None:
            headers, issues = scan_files(files)
        else:
            headers, issues = prepared.scanned(files)
        if series is not None:  # a Collection: a set, or one that maps the UID first
            headers = [h for h in headers if h.series_uid in series]
            issues = [e for e in issues if e.series_uid in series]
        for entry in issues:
            summary.skipped.append(
                {
                    "path": entry.path,
                    "series_uid": entry.series_uid,
                    "series_description": "",
                    "code": entry.code,
                    "reason": entry.reason,
                }
            )
        for group in group_series(headers):
            h = group.headers[0]
            skip = header_refusal(self.selection, group)
            if skip is None:
                try:
                    stream = prepared.series.get(group.series_uid) if prepared else None
                    row = self.predict_group(group, out_dir, revision, stream)
                    summary.results.append(row)
                    summary.streamed += row.pop(STREAMED) == "streamed"
                    continue
                except InvalidSeriesError as err:
                    skip = (err.code, err.reason)
                except Exception as exc:  # a bug met by unusual input: report it, keep going
                    log.exception("unexpected error on series %s", group.series_uid)
                    skip = ("internal_error", f"unexpected {type(exc).__name__}: {exc}")
            summary.skipped.append(
                {
                    "path": str(Path(group.files[0]).parent),
                    "series_uid": group.series_uid,
                    "series_description": h.series_description,
                    "code": skip[0],
                    "reason": skip[1],
                }
            )
        _write_csv(out_dir / RESULTS_CSV, RESULT_COLUMNS, summary.results)
        _write_csv(out_dir / SKIPPED_CSV, SKIPPED_COLUMNS, summary.skipped)
        timings = Path(timings_csv) if timings_csv is not None else out_dir / TIMINGS_CSV
        timings.parent.mkdir(parents=True, exist_ok=True)
        _write_csv(timings, ("series_key", "series_uid", *TIMING_COLUMNS), summary.results)
        summary.seconds = time.perf_counter() - began
        return summary


def study_datetime(date: str, time_of_day: str) -> str:
    """StudyDate and StudyTime as ISO 8601, ``YYYY-MM-DDTHH:MM:SS``, in the scanner's local time
    (DICOM gives no zone unless TimezoneOffsetFromUTC is set); ``""`` without a valid date. A
    missing or short time reads as its missing digits being 0; fractions of a second are dropped.

    >>> study_datetime("20211128", "115938.25"), study_datetime("20211128", "09"), study_datetime("", "1200")
    ('2021-11-28T11:59:38', '2021-11-28T09:00:00', '')
    """
    import datetime as dt

    digits = time_of_day.strip().split(".")[0].replace(":", "")
    try:
        day = dt.datetime.strptime(date.strip(), "%Y%m%d")
        hour, minute, second = (int(digits[i : i + 2] or 0) for i in (0, 2, 4))
        return day.replace(hour=hour, minute=minute, second=second).isoformat()
    except ValueError:
        return ""


def _round(value: Any) -> Any:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return ""
    return round(float(value), 6)


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    write_csv(path, columns, rows, line_end="\r\n")  # the line ends results.csv always had
