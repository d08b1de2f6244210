"""Typed schemas for every stage's section of the composed configuration.

``conf/`` (composed by Hydra) is the single source of truth; these models validate a section when a stage
or command loads it, so a wrong key or value fails at load time with a message that names the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class StrictModel(BaseModel):
    """Base: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def _check_range(name: str, lo: float, hi: float) -> None:
    if lo > hi:
        raise ValueError(f"{name}: minimum {lo} is above maximum {hi}; write it as [min, max]")


# --------------------------------------------------------------------------------------------------
# Cohort: the embedded synthetic multi-scanner dataset
# --------------------------------------------------------------------------------------------------


SequenceKind = Literal["spgr", "ir_gre", "se", "tse", "flair"]
Apodisation = Literal["none", "hamming", "hann", "tukey", "fermi"]


class ScannerProfile(StrictModel):
    """How one scanner model and protocol acquires and stores a brain series.

    Geometry: ``matrix`` is ``(rows, columns)`` of each reconstructed slice, ``pixel_spacing`` is
    ``(row, column)`` spacing in mm, slices are ``slice_thickness`` thick and ``slice_spacing`` apart
    (centre to centre), ``n_slices`` of them. ``orientation`` is the acquisition plane; ``tilt_deg``
    tilts it about the left-right axis (an oblique, AC-PC-like acquisition when non-zero).

    Sequence (the ``physics`` renderer; see :mod:`shiftguard.cohort.physics`): ``sequence`` is the
    family, driven by ``repetition_time``, ``echo_time``, ``flip_angle`` (ms, ms, degrees), and for the
    inversion-prepared families ``inversion_time`` (inversion to the centre of k-space). An
    ``ir_gre`` (MPRAGE / 3D TFE / BRAVO) also needs its gradient-echo train: ``readout_tr`` between
    readout pulses, ``shot_interval`` between inversions, ``readouts_per_shot`` pulses per shot. The
    header's RepetitionTime follows the vendor: Siemens writes the shot interval, GE and Philips the
    readout TR; ``repetition_time`` must equal one of the two.

    Acquisition and reconstruction: ``acquisition_matrix`` ``(rows, columns)`` is what k-space
    holds (``None``: the reconstructed matrix); a smaller one is zero-filled up to ``matrix``
    (interpolation, correlated noise). ``phase_encoding_direction`` is DICOM's
    InPlanePhaseEncodingDirection (``ROW``: phase encoded along a row, i.e. across columns);
    ``partial_fourier`` the sampled fraction of phase-encoding lines (zero-filled);
    ``apodisation`` and ``apodisation_width`` the vendor's k-space filter; ``parallel_factor`` and
    ``g_factor_max`` the in-plane acceleration and its peak noise amplification; ``pixel_bandwidth``
    (Hz/pixel) and ``averages`` set the sampling time, hence with field strength and voxel volume the
    noise level. ``bias_field`` is the peak-to-peak amplitude of the smooth multiplicative
    receive-coil sensitivity (0.3 means intensities vary by about +-15 %), ``intensity_scale`` the
    vendor's stored value for white matter.

    Legacy image formation (``cohort.rendering: legacy``, the generator before the physics one): the
    same template intensities on every scanner, then ``blur_fwhm_mm`` (in-plane point-spread
    function), the bias field, ``gamma`` (a contrast curve) and Rician ``noise`` (standard deviation
    relative to white matter). The physics renderer ignores these three.

    Storage: stored values are ``round((signal - rescale_intercept) / rescale_slope)`` as
    ``bits_stored`` unsigned integers, with ``transfer_syntax`` one of the names in
    :data:`shiftguard.cohort.TRANSFER_SYNTAXES`.
    """

    manufacturer: str
    model: str
    field_strength: PositiveFloat
    software_version: str = "1.0"
    series_description: str = "T1 3D"
    sequence_name: str = "tfl3d1"
    sequence: SequenceKind = "spgr"
    acquisition_type: Literal["2D", "3D"] = "3D"
    repetition_time: PositiveFloat = 2300.0
    echo_time: PositiveFloat = 2.98
    flip_angle: PositiveFloat = 9.0
    inversion_time: PositiveFloat | None = None
    readout_tr: PositiveFloat | None = None
    shot_interval: PositiveFloat | None = None
    readouts_per_shot: Annotated[int, Field(ge=1, le=2048)] | None = None
    echo_train_length: Annotated[int, Field(ge=1, le=512)] = 1
    matrix: tuple[Annotated[int, Field(ge=16, le=1024)], Annotated[int, Field(ge=16, le=1024)]]
    acquisition_matrix: (
        tuple[Annotated[int, Field(ge=8, le=1024)], Annotated[int, Field(ge=8, le=1024)]] | None
    ) = None
    pixel_spacing: tuple[PositiveFloat, PositiveFloat]
    slice_thickness: PositiveFloat
    slice_spacing: PositiveFloat
    n_slices: Annotated[int, Field(ge=3, le=1024)]
    orientation: Literal["axial", "coronal", "sagittal"] = "axial"
    tilt_deg: Annotated[float, Field(ge=-45, le=45)] = 0.0
    phase_encoding_direction: Literal["ROW", "COL"] = "ROW"
    partial_fourier: Annotated[float, Field(ge=0.5, le=1.0)] = 1.0
    apodisation: Apodisation = "none"
    apodisation_width: Annotated[float, Field(ge=0, le=1)] = 0.0
    parallel_factor: Annotated[float, Field(ge=1, le=8)] = 1.0
    g_factor_max: Annotated[float, Field(ge=1, le=5)] = 1.0
    pixel_bandwidth: PositiveFloat = 200.0
    averages: PositiveFloat = 1.0
    noise: Annotated[float, Field(ge=0, le=1)] = 0.03
    bias_field: Annotated[float, Field(ge=0, le=1.5)] = 0.2
    blur_fwhm_mm: Annotated[float, Field(ge=0, le=10)] = 0.0
    gamma: Annotated[float, Field(gt=0.2, le=5)] = 1.0
    intensity_scale: PositiveFloat = 1000.0
    rescale_slope: PositiveFloat = 1.0
    rescale_intercept: float = 0.0
    bits_stored: Literal[12, 16] = 12
    transfer_syntax: Literal[
        "explicit_vr_little_endian", "rle_lossless", "jpeg_ls_lossless", "jpeg2000_lossless"
    ] = "explicit_vr_little_endian"

    def resized(self, matrix: int, n_slices: int) -> ScannerProfile:
        """The same protocol on ``matrix`` x ``matrix`` x ``n_slices`` over the same field of view.

        Pixel spacing, slice spacing and thickness scale to keep the field of view; the acquisition
        matrix keeps its fraction of the reconstructed one (at least 8).
        """
        rows, cols = self.matrix
        acq_rows, acq_cols = self.acquired
        factor = self.n_slices / n_slices
        return self.model_copy(
            update={
                "matrix": (matrix, matrix),
                "pixel_spacing": (
                    self.pixel_spacing[0] * rows / matrix,
                    self.pixel_spacing[1] * cols / matrix,
                ),
                "acquisition_matrix": None
                if self.acquisition_matrix is None
                else (
                    max(8, min(matrix, round(acq_rows * matrix / rows))),
                    max(8, min(matrix, round(acq_cols * matrix / cols))),
                ),
                "n_slices": n_slices,
                "slice_spacing": self.slice_spacing * factor,
                "slice_thickness": self.slice_thickness * factor,
            }
        )

    @property
    def acquired(self) -> tuple[int, int]:
        """``(rows, columns)`` of k-space actually sampled (the acquisition matrix)."""
        return self.acquisition_matrix or self.matrix

    @model_validator(mode="after")
    def _sequence_parameters(self) -> ScannerProfile:
        rows, cols = self.matrix
        acq_rows, acq_cols = self.acquired
        if acq_rows > rows or acq_cols > cols:
            raise ValueError(
                f"acquisition_matrix {list(self.acquired)} exceeds the reconstructed matrix "
                f"{list(self.matrix)}: reconstruction zero-fills up, never down"
            )
        if self.echo_time >= self.repetition_time and self.sequence != "ir_gre":
            raise ValueError(
                f"echo_time {self.echo_time} ms must be shorter than repetition_time "
                f"{self.repetition_time} ms"
            )
        if self.sequence in ("ir_gre", "flair") and self.inversion_time is None:
            raise ValueError(f"sequence {self.sequence!r} needs inversion_time (ms)")
        if self.sequence == "ir_gre":
            missing = [
                name
                for name in ("readout_tr", "shot_interval", "readouts_per_shot")
                if getattr(self, name) is None
            ]
            if missing:
                raise ValueError(f"sequence 'ir_gre' needs {', '.join(missing)}")
            assert self.readout_tr is not None and self.shot_interval is not None
            assert self.readouts_per_shot is not None and self.inversion_time is not None
            if self.repetition_time not in (self.readout_tr, self.shot_interval):
                raise ValueError(
                    f"repetition_time {self.repetition_time} ms is written to the header and must "
                    f"equal readout_tr ({self.readout_tr}) or shot_interval ({self.shot_interval})"
                )
            start = self.inversion_time - (self.readouts_per_shot // 2) * self.readout_tr
            end = start + self.readouts_per_shot * self.readout_tr
            if start <= 0 or end >= self.shot_interval:
                raise ValueError(
                    f"the readout train ({self.readouts_per_shot} x {self.readout_tr} ms, centred "
                    f"on inversion_time {self.inversion_time} ms) does not fit between the "
                    f"inversion and the next one ({self.shot_interval} ms)"
                )
        return self


class SiteConfig(StrictModel):
    """A hospital of the cohort: its scanner, its population and how often it sees the finding."""

    name: str = Field(description="InstitutionName written into every file")
    scanner: str = Field(description="key into CohortConfig.scanners")
    weight: PositiveFloat = Field(1.0, description="relative share of the cohort's subjects")
    prevalence: Fraction = Field(description="fraction of subjects with the finding")
    age_mean: Annotated[float, Field(ge=18, le=100)] = 55.0
    age_sd: Annotated[float, Field(ge=0, le=40)] = 15.0
    female_fraction: Fraction = 0.5


class LesionConfig(StrictModel):
    """The binary finding: one focal lesion inside brain tissue, kept as a ground-truth mask.

    Physics renderer: the lesion is a tissue of its own whose T1, T2 (and T2*) and proton density are
    white matter's (of the same subject, at the scanner's field) times factors drawn per lesion from
    ``t1_factor``, ``t2_factor`` and ``pd_factor``; a fraction ``t1_short_fraction`` of lesions
    shortens T1 instead (``t1_short_factor``, as blood products or mineralisation do). Its contrast
    therefore differs by sequence and field. Legacy renderer: ``contrast`` is the relative intensity
    change against the surrounding tissue, hyperintense with probability ``hyperintense_fraction``.
    Small radius and low contrast make subtle cases.
    """

    radius_mm: tuple[PositiveFloat, PositiveFloat] = (8.0, 16.0)
    contrast: tuple[PositiveFloat, PositiveFloat] = (0.5, 1.0)
    hyperintense_fraction: Fraction = 0.75
    t1_factor: tuple[PositiveFloat, PositiveFloat] = (1.15, 1.6)
    t2_factor: tuple[PositiveFloat, PositiveFloat] = (1.2, 2.0)
    pd_factor: tuple[PositiveFloat, PositiveFloat] = (1.0, 1.1)
    t1_short_fraction: Fraction = 0.2
    t1_short_factor: tuple[PositiveFloat, PositiveFloat] = (0.6, 0.85)
    edge_softness_mm: Annotated[float, Field(ge=0, le=5)] = 1.0
    age_log_odds_per_decade: float = Field(
        0.35, description="older subjects are more likely to have the finding, as in real cohorts"
    )

    @model_validator(mode="after")
    def _ranges(self) -> LesionConfig:
        for name in (
            "radius_mm",
            "contrast",
            "t1_factor",
            "t2_factor",
            "pd_factor",
            "t1_short_factor",
        ):
            _check_range(f"cohort.lesion.{name}", *getattr(self, name))
        return self


class TissueRelaxation(StrictModel):
    """One tissue's proton density and relaxation times at ``PhysicsConfig.reference_fields``.

    ``pd`` is relative to pure water (CSF ~ 1); ``t1_ms``, ``t2_ms`` and ``t2s_ms`` list one value
    per reference field. Between and beyond the reference fields a value follows the power law
    through its two nearest anchors (T1 rises with field about as B0^0.3-0.4, T2* falls).
    """

    pd: Annotated[float, Field(ge=0, le=1.2)]
    t1_ms: list[PositiveFloat] = Field(min_length=1)
    t2_ms: list[PositiveFloat] = Field(min_length=1)
    t2s_ms: list[PositiveFloat] = Field(min_length=1)
    source: str = ""


#: the tissues the physics renderer needs, in label order (label = index + 1; 0 is air)
PHYSICS_TISSUES = ("csf", "gm", "wm", "fat", "muscle", "bone", "marrow", "skin")


class PhysicsConfig(StrictModel):
    """The physics renderer's tissue table, noise constant and sampling (see
    :mod:`shiftguard.cohort.physics`).

    ``snr_constant`` fixes the thermal noise: for a full, unfiltered acquisition the image noise
    standard deviation (relative to the magnetisation of pure water) is
    ``1 / (snr_constant * B0[T] * voxel[mm^3] * sqrt(sampling time per voxel [s]))``, the sampling time
    being phase-encoding lines x partitions (3D) x averages / pixel bandwidth. ``oversampling`` is
    the factor by which the object is sampled finer than the reconstructed matrix in-plane before
    it is Fourier transformed and truncated to the acquisition matrix (what makes truncation
    ringing). ``slab_step_mm`` is the spacing of the sub-samples averaged across a slice's thickness
    (partial volume through the plane). ``subject_variation`` is the relative standard deviation of each tissue's PD, T1 and
    T2 between subjects.
    """

    reference_fields: list[PositiveFloat] = Field(default_factory=lambda: [1.5, 3.0], min_length=1)
    tissues: dict[str, TissueRelaxation]
    snr_constant: PositiveFloat = 0.5
    oversampling: Annotated[int, Field(ge=1, le=4)] = 2
    slab_step_mm: Annotated[float, Field(gt=0, le=5)] = 2.0
    subject_variation: Annotated[float, Field(ge=0, le=0.2)] = 0.03

    @model_validator(mode="after")
    def _table(self) -> PhysicsConfig:
        if sorted(self.reference_fields) != list(self.reference_fields) or len(
            set(self.reference_fields)
        ) != len(self.reference_fields):
            raise ValueError(
                f"cohort.physics.reference_fields: must be increasing, got {self.reference_fields}"
            )
        missing = [t for t in PHYSICS_TISSUES if t not in self.tissues]
        if missing:
            raise ValueError(
                f"cohort.physics.tissues: missing {', '.join(missing)} "
                f"(needed: {', '.join(PHYSICS_TISSUES)})"
            )
        n = len(self.reference_fields)
        for name, tissue in self.tissues.items():
            for key in ("t1_ms", "t2_ms", "t2s_ms"):
                if len(getattr(tissue, key)) != n:
                    raise ValueError(
                        f"cohort.physics.tissues.{name}.{key}: one value per reference field "
                        f"({n}: {self.reference_fields}), got {len(getattr(tissue, key))}"
                    )
        return self


class AnatomyConfig(StrictModel):
    """Per-subject variation applied to the MNI152 template."""

    head_scale_sd: Annotated[float, Field(ge=0, le=0.2)] = 0.05
    rotation_sd_deg: Annotated[float, Field(ge=0, le=20)] = 3.0
    translation_sd_mm: Annotated[float, Field(ge=0, le=20)] = 3.0
    deformation_mm: Annotated[float, Field(ge=0, le=10)] = 2.5
    deformation_grid: Annotated[int, Field(ge=2, le=16)] = 5
    atrophy_per_decade: Annotated[float, Field(ge=0, le=0.2)] = 0.03
    intensity_sd: Annotated[float, Field(ge=0, le=0.3)] = 0.04


class CohortConfig(StrictModel):
    """The whole synthetic cohort. Same seed and config give byte-identical files."""

    seed: Annotated[int, Field(ge=0)] = 20261128
    n_subjects: Annotated[int, Field(ge=1, le=100000)] = 200
    study_date_origin: str = Field("20200101", pattern=r"^\d{8}$")
    patient_prefix: str = Field(
        "SG", pattern=r"^[A-Z]{1,4}$", description="PatientID prefix (SG0001, ...)"
    )
    accession_prefix: str = Field(
        "A", pattern=r"^[A-Z]{1,4}$", description="AccessionNumber prefix"
    )
    readers: list[str] = Field(
        default_factory=lambda: ["reader_a", "reader_b", "reader_c"], min_length=1
    )
    anatomy: AnatomyConfig = Field(default_factory=AnatomyConfig)
    lesion: LesionConfig = Field(default_factory=lambda: LesionConfig())
    rendering: Literal["physics", "legacy"] = Field(
        "physics",
        description="physics: tissue relaxation, signal equations and k-space acquisition; "
        "legacy: the earlier template-intensity renderer",
    )
    physics: PhysicsConfig | None = None
    scanners: dict[str, ScannerProfile]
    sites: list[SiteConfig]

    @model_validator(mode="after")
    def _sites_use_known_scanners(self) -> CohortConfig:
        if self.rendering == "physics" and self.physics is None:
            raise ValueError(
                "cohort.physics: the physics renderer needs the tissue table (conf/cohort/"
                "default.yaml has one), or set cohort.rendering=legacy"
            )
        if not self.sites:
            raise ValueError("cohort.sites: at least one site is needed")
        for i, site in enumerate(self.sites):
            if site.scanner not in self.scanners:
                known = ", ".join(sorted(self.scanners)) or "none"
                raise ValueError(
                    f"cohort.sites[{i}].scanner: unknown scanner profile {site.scanner!r} "
                    f"(known: {known})"
                )
        return self


# --------------------------------------------------------------------------------------------------
# Data: where the cohort's DICOM and labels come from (conf/data/)
# --------------------------------------------------------------------------------------------------

JoinKey = Literal["study_uid", "accession_number", "patient_id+study_date"]
#: the label-file columns each join key needs (names of :class:`LabelColumns` fields)
JOIN_KEY_FIELDS: dict[str, tuple[str, ...]] = {
    "study_uid": ("study_uid",),
    "accession_number": ("accession_number",),
    "patient_id+study_date": ("patient_id", "study_date"),
}
DEFAULT_POSITIVE = ("1", "true", "yes", "y", "positive", "pos", "present", "abnormal")
DEFAULT_NEGATIVE = ("0", "false", "no", "n", "negative", "neg", "absent", "normal")


class LabelColumns(StrictModel):
    """The label file's column for each thing ShiftGuard reads from it (``None``: not in the file).

    ``finding`` is required; the join key's columns (see :data:`JOIN_KEY_FIELDS`) too. ``patient_sex``
    and ``patient_age`` fill the manifest's demographics where the DICOM headers leave them empty;
    ``reader`` and ``reported_at`` (when the report was signed) go to the shadow stage's verified
    diagnoses (``reported_at`` only where identifiers are kept: it is a date).
    """

    finding: str = Field(min_length=1)
    study_uid: str | None = None
    accession_number: str | None = None
    patient_id: str | None = None
    study_date: str | None = None
    patient_sex: str | None = None
    patient_age: str | None = None
    reader: str | None = None
    reported_at: str | None = None


class DataConfig(StrictModel):
    """One data source: a DICOM tree, its label file(s) and how they join (``conf/data/<name>.yaml``).

    ``dicom`` and ``labels`` are paths relative to the project root, or absolute (DVC then hashes them
    where they are, as external dependencies). ``labels`` is one file or a folder of files (CSV, TSV,
    JSON, JSON lines; Excel and Parquet when their readers are installed). ``identifiers``:
    ``pseudonymize`` replaces patient IDs, accession numbers and file paths with keyed hashes and keeps
    study dates to the month in everything the pipeline writes (the key lives outside the project, see
    :mod:`shiftguard.data.identifiers`; ``key_id`` is its fingerprint); ``keep`` is for cohorts whose
    identifiers are made up, like the synthetic one. ``synthetic``: the embedded generator's cohort,
    the only one the stages built on the generator (drift scenarios) run on.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    synthetic: bool = False
    dicom: str = Field(min_length=1)
    labels: str = Field(min_length=1)
    ground_truth: str = Field(
        min_length=1,
        description="per-subject masks and label maps the training may read (the synthetic "
        "cohort's data/ground_truth); a cohort without them names its label file",
    )
    dvc_file: str | None = Field(None, description="the .dvc file tracking the data, if any")
    key: JoinKey = "study_uid"
    columns: LabelColumns
    positive: list[str] = Field(default_factory=lambda: list(DEFAULT_POSITIVE), min_length=1)
    negative: list[str] = Field(default_factory=lambda: list(DEFAULT_NEGATIVE), min_length=1)
    identifiers: Literal["keep", "pseudonymize"] = "pseudonymize"
    key_id: str | None = Field(None, pattern=r"^[0-9a-f]{16}$")

    @model_validator(mode="after")
    def _mapping(self) -> DataConfig:
        missing = [f for f in JOIN_KEY_FIELDS[self.key] if getattr(self.columns, f) is None]
        if missing:
            raise ValueError(
                f"data.key={self.key} needs data.columns.{' and data.columns.'.join(missing)} "
                "(the label file's column(s) holding it)"
            )
        pos = {v.strip().lower() for v in self.positive}
        neg = {v.strip().lower() for v in self.negative}
        if pos & neg:
            raise ValueError(
                f"data.positive and data.negative share {sorted(pos & neg)}; a value means one thing"
            )
        if self.identifiers == "pseudonymize" and self.key_id is None:
            raise ValueError(
                "data.identifiers=pseudonymize needs data.key_id (the pseudonym key's fingerprint); "
                "`shiftguard data init` writes both"
            )
        return self


# --------------------------------------------------------------------------------------------------
# Ingest: any DICOM tree to validated, canonical volumes
# --------------------------------------------------------------------------------------------------


class IngestConfig(StrictModel):
    """How series become volumes.

    Output volumes are in RAS+ canonical orientation, resampled to ``spacing`` (mm) on a grid of
    ``shape`` voxels ``(X, Y, Z)`` centred on the series' field of view. (Not ``size``: DVC's run cache
    ignores any parameter named ``size`` or ``nfiles`` when it decides whether a stage must re-run.)
    """

    spacing: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = (2.0, 2.0, 2.0)
    shape: tuple[
        Annotated[int, Field(ge=4, le=1024)],
        Annotated[int, Field(ge=4, le=1024)],
        Annotated[int, Field(ge=4, le=1024)],
    ] = (80, 96, 80)
    interpolation_order: Literal[0, 1, 3] = 1
    antialias: bool = True
    min_slices: Annotated[int, Field(ge=1)] = 8
    modalities: list[str] = Field(default_factory=lambda: ["MR", "CT"])
    spacing_tolerance: Annotated[float, Field(gt=0, le=0.5)] = Field(
        0.05, description="relative tolerance on slice spacing uniformity"
    )
    orientation_tolerance: Annotated[float, Field(gt=0, le=0.1)] = 1e-3


# --------------------------------------------------------------------------------------------------
# Split: patient-level, stratified, with an external (unseen scanner) test set
# --------------------------------------------------------------------------------------------------


def _date_bound(value: object) -> str | None:
    if value is None:
        return None
    digits = "".join(c for c in str(value) if c.isdigit())
    if len(digits) not in (4, 6, 8):
        raise ValueError(f"{value!r}: write a date as YYYY-MM-DD, YYYY-MM or YYYY")
    return digits


class ExternalSelector(StrictModel):
    """Which series form the external test set: every criterion given must hold.

    * ``column`` + ``values``: the manifest ``column`` (any header field ingest records: site,
      manufacturer, scanner_model, field_strength, station, series_description, ...) holds one of
      ``values`` or one of the lines of ``values_file`` (numbers compare as numbers, so 3 matches
      3.0). Patient IDs and accession numbers given here are pseudonymized like the manifest's.
    * ``date_from`` / ``date_to``: the study date lies in the range (inclusive; a temporal split).
      ``YYYY-MM-DD``, ``YYYY-MM`` or ``YYYY``; on pseudonymized data dates are months.

    With neither, there is no external set. A patient with any external series is external whole.
    """

    column: str = "scanner_model"
    values: list[str | int | float] = Field(default_factory=list)
    values_file: str | None = None
    date_from: Annotated[str | None, BeforeValidator(_date_bound)] = None
    date_to: Annotated[str | None, BeforeValidator(_date_bound)] = None

    @model_validator(mode="after")
    def _range(self) -> ExternalSelector:
        if self.date_from and self.date_to:
            n = min(len(self.date_from), len(self.date_to))
            if self.date_from[:n] > self.date_to[:n]:
                raise ValueError(
                    f"split.external: date_from {self.date_from} is after date_to {self.date_to}"
                )
        return self


class SplitConfig(StrictModel):
    """Patient-level train/val/test split of the internal series, stratified on the finding."""

    seed: int = 0
    fractions: dict[str, Fraction] = Field(
        default_factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15}
    )
    stratify_on: list[str] = Field(default_factory=lambda: ["finding", "site"])
    external: ExternalSelector = Field(default_factory=ExternalSelector)

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        missing = {"train", "val", "test"} - set(self.fractions)
        unknown = set(self.fractions) - {"train", "val", "test"}
        if missing or unknown:
            raise ValueError(
                f"split.fractions: needs exactly train, val and test; "
                f"missing {sorted(missing)}, unknown {sorted(unknown)}"
            )
        total = sum(self.fractions.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split.fractions: must sum to 1, got {total:g}")
        return self


# --------------------------------------------------------------------------------------------------
# Augment: scanner profiles (conf/scanner_sim/) and the scanner-simulating augmentation (conf/augment/)
# --------------------------------------------------------------------------------------------------

SEVERITY_MAX = 4
"""The highest severity level; a profile's ranges are written for it."""

Severity = Annotated[int, Field(ge=0, le=SEVERITY_MAX)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Count = Annotated[int, Field(ge=1, le=64)]
Axis = Literal[0, 1, 2]


def _ordered(value: tuple[float, float]) -> tuple[float, float]:
    """A ``[min, max]`` pair in order; pydantic prefixes the error with the full key."""
    lo, hi = value
    if lo > hi:
        raise ValueError(f"minimum {lo} is above maximum {hi}; write it as [min, max]")
    return value


Range = Annotated[tuple[float, float], AfterValidator(_ordered)]
"""``[min, max]`` of a signed quantity (degrees, translation, log-gamma, ...)."""
MagnitudeRange = Annotated[tuple[NonNegativeFloat, NonNegativeFloat], AfterValidator(_ordered)]
"""``[min, max]`` of a non-negative quantity (a standard deviation, a coefficient magnitude)."""
FractionRange = Annotated[tuple[Fraction, Fraction], AfterValidator(_ordered)]
"""``[min, max]`` within [0, 1]."""
CountRange = Annotated[tuple[Count, Count], AfterValidator(_ordered)]
"""``[min, max]`` of a count, both at least 1."""
FactorRange = Annotated[
    tuple[Annotated[float, Field(ge=1, le=16)], Annotated[float, Field(ge=1, le=16)]],
    AfterValidator(_ordered),
]
"""``[min, max]`` of a factor that is 1 at the identity (down-sampling)."""
SeverityRange = Annotated[tuple[Severity, Severity], AfterValidator(_ordered)]


class BiasFieldSim(StrictModel):
    """TorchIO's polynomial bias field: every coefficient is uniform in ``[-m, m]`` with the
    magnitude ``m`` drawn from ``coefficients``; ``order`` is the polynomial degree (TorchIO draws
    ``(order + 1)(order + 2)(order + 3) / 6`` coefficients)."""

    coefficients: MagnitudeRange
    order: Annotated[int, Field(ge=0, le=6)] = 3


class NoiseSim(StrictModel):
    """Noise standard deviation relative to the image's 99th percentile; Rician (the magnitude of
    complex Gaussian noise, as in low-SNR magnitude images) or Gaussian."""

    std: Annotated[tuple[Fraction, Fraction], AfterValidator(_ordered)]
    rician: bool = False


class GhostingSim(StrictModel):
    """``num_ghosts`` ghosts along one of ``axes`` (the phase-encoding directions), relative
    ``intensity`` in [0, 1]; ``restore`` is the fraction of the k-space centre kept intact."""

    num_ghosts: CountRange
    axes: list[Axis] = Field(default_factory=lambda: list[Axis]([0, 1]), min_length=1)
    intensity: FractionRange
    restore: Fraction = 0.02


class SpikeSim(StrictModel):
    """``num_spikes`` k-space spikes, ``intensity`` relative to the spectrum's maximum (TorchIO's
    ``RandomSpike`` uses (1, 3) by default; the sign is kept)."""

    num_spikes: CountRange
    intensity: Range


class MotionSim(StrictModel):
    """``num_transforms`` rigid movements during the acquisition, each with rotations in ``degrees``
    and translations in ``translation`` (mm) drawn per axis, as TorchIO's ``RandomMotion``."""

    degrees: Range
    translation: Range
    num_transforms: CountRange


class BlurSim(StrictModel):
    """Gaussian point-spread function: standard deviation in mm, drawn per axis."""

    std: MagnitudeRange


class AnisotropySim(StrictModel):
    """Thick slices along one of ``axes``: ``downsampling`` times the voxel size, and back."""

    axes: list[Axis] = Field(default_factory=lambda: list[Axis]([2]), min_length=1)
    downsampling: FactorRange


class GammaSim(StrictModel):
    """Vendor contrast curve: ``gamma = exp(log_gamma)``."""

    log_gamma: Range


class ScaleSim(StrictModel):
    """Vendor intensity scaling: ``factor = exp(log_scale)``."""

    log_scale: Range


class ScannerSimProfile(StrictModel):
    """How one kind of scanner or protocol changes an image (``conf/scanner_sim/<name>.yaml``).

    Every range is ``[min, max]`` at the highest severity (4); a lower severity ``s`` moves each end
    towards the identity, ``identity + s / 4 * (end - identity)`` (see
    :func:`shiftguard.augment.profiles.scaled_ranges`). A transform left out (or ``null``) is never
    applied by this profile.
    """

    description: str
    motion: MotionSim | None = None
    ghosting: GhostingSim | None = None
    spike: SpikeSim | None = None
    blur: BlurSim | None = None
    anisotropy: AnisotropySim | None = None
    bias_field: BiasFieldSim | None = None
    noise: NoiseSim | None = None
    gamma: GammaSim | None = None
    scale: ScaleSim | None = None


class RobustnessConfig(StrictModel):
    """The offline robustness test sets: every validation and test volume under each of
    ``profiles`` at each of ``severities``, reproducible from ``seed``."""

    profiles: list[str] = Field(min_length=1)
    severities: list[Severity] = Field(default_factory=lambda: [0, 1, 2, 3, 4], min_length=1)
    seed: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _unique(self) -> RobustnessConfig:
        repeated = sorted({p for p in self.profiles if self.profiles.count(p) > 1})
        if repeated:
            raise ValueError(f"augment.robustness.profiles: repeated {', '.join(repeated)}")
        twice = sorted({s for s in self.severities if self.severities.count(s) > 1})
        if twice:
            raise ValueError(f"augment.robustness.severities: repeated {twice}")
        return self


ARMS = ("none", "artifact", "intensity", "labels", "physics")
"""The training-time augmentation arms of ``augment.arm`` (``conf/augment/<arm>.yaml``)."""
Arm = Literal["none", "artifact", "intensity", "labels", "physics"]
PositiveRange = Annotated[
    tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]], AfterValidator(_ordered)
]
"""``[min, max]`` of a strictly positive quantity (a gamma, a time in ms, a field in T)."""


class IntensityArmConfig(StrictModel):
    """The intensity and contrast arm: MONAI's random gamma (``RandAdjustContrast``) and histogram
    shift (``RandHistogramShift``), then a random convolution
    (:class:`~shiftguard.augment.randconv.RandConvd`), each applied with its own probability."""

    gamma: PositiveRange = (0.5, 2.0)
    gamma_probability: Fraction = 0.5
    histogram_control_points: CountRange = (5, 15)
    histogram_probability: Fraction = 0.5
    randconv_kernel_sizes: list[Annotated[int, Field(ge=1, le=9)]] = Field(
        default_factory=lambda: [1, 3, 5], min_length=1
    )
    randconv_probability: Fraction = 0.5


class AcquisitionEffectsConfig(StrictModel):
    """What the label-driven arms add to a synthetic image, as SynthSeg does: a Gaussian blur per
    axis (``blur_mm``, the standard deviation; resolution and partial volume), a smooth
    multiplicative bias field (log-amplitude up to ``bias``), and Rician noise (``noise``, the
    standard deviation relative to the image's 99th percentile)."""

    blur_mm: MagnitudeRange = (0.0, 2.5)
    bias: NonNegativeFloat = 0.3
    noise: MagnitudeRange = (0.0, 0.06)


class LabelsArmConfig(StrictModel):
    """The label-driven arm (SynthSeg): a new image from the subject's tissue label map, each label a
    Gaussian with mean in ``mean`` and standard deviation in ``std`` (TorchIO's
    ``RandomLabelsToImage``), then :class:`AcquisitionEffectsConfig`. ``labels_dir`` holds one label
    map per series or subject (``<series_key>.nii.gz`` or ``<patient_id>.nii.gz``)."""

    labels_dir: str = "data/ground_truth/labels"
    mean: Range = (0.0, 1.0)
    std: MagnitudeRange = (0.0, 0.1)
    effects: AcquisitionEffectsConfig = Field(default_factory=AcquisitionEffectsConfig)


class SequenceRanges(StrictModel):
    """Random sequence parameters of the physics arm, per family (ms and degrees)."""

    spgr_tr: PositiveRange = (8.0, 30.0)
    spgr_te: PositiveRange = (2.0, 6.0)
    spgr_flip: PositiveRange = (5.0, 40.0)
    ir_ti: PositiveRange = (500.0, 1400.0)
    ir_flip: PositiveRange = (5.0, 15.0)
    ir_readout_tr: PositiveRange = (6.0, 10.0)
    ir_readouts: Annotated[int, Field(ge=8, le=512)] = 128
    ir_recovery: PositiveRange = (200.0, 1500.0)
    se_tr: PositiveRange = (350.0, 900.0)
    se_te: PositiveRange = (8.0, 25.0)


ArmSequence = Literal["spgr", "ir_gre", "se"]
ARM_SEQUENCES: tuple[ArmSequence, ...] = ("spgr", "ir_gre", "se")


class PhysicsArmConfig(StrictModel):
    """The physics arm: the subject's tissue label map re-rendered with a random field strength and
    a random sequence (family and parameters), through the cohort's signal equations and tissue
    table (``tissue_model``, :mod:`shiftguard.cohort.physics`); the lesion label gets white matter's parameters times
    factors drawn from ``lesion_*``. Then :class:`AcquisitionEffectsConfig`."""

    labels_dir: str = "data/ground_truth/labels"
    tissue_model: PhysicsConfig
    field_strength: PositiveRange = (0.5, 3.0)
    sequences: list[ArmSequence] = Field(default_factory=lambda: list(ARM_SEQUENCES), min_length=1)
    ranges: SequenceRanges = Field(default_factory=SequenceRanges)
    lesion_t1_factor: PositiveRange = (0.6, 2.2)
    lesion_t2_factor: PositiveRange = (0.8, 2.5)
    lesion_pd_factor: PositiveRange = (0.9, 1.1)
    effects: AcquisitionEffectsConfig = Field(default_factory=AcquisitionEffectsConfig)


class AugmentConfig(StrictModel):
    """Scanner-simulating augmentation for training and the robustness test sets.

    ``profiles`` is the catalogue of scanner profiles (composed from ``conf/scanner_sim/``); it is the
    same whether training augments or not, because the robustness sets use it too. Per training
    sample, with ``probability`` (when ``enabled``), a profile is drawn with ``profile_weights``
    (empty: uniform over every profile; otherwise only the listed ones), a severity uniformly from
    the integers of ``severity`` (inclusive), and then the acquisition parameters.
    """

    enabled: bool = True
    arm: Arm = "artifact"
    probability: Fraction = 0.8
    profiles: dict[str, ScannerSimProfile] = Field(default_factory=dict)
    profile_weights: dict[str, NonNegativeFloat] = Field(default_factory=dict)
    severity: SeverityRange = (1, SEVERITY_MAX)
    backend: Literal["fast", "torchio"] = "fast"
    robustness: RobustnessConfig
    intensity: IntensityArmConfig = Field(default_factory=IntensityArmConfig)
    labels: LabelsArmConfig = Field(default_factory=LabelsArmConfig)
    physics: PhysicsArmConfig | None = None
    device: Annotated[str, Field(pattern=r"^(cpu|cuda(:[0-9]+)?)$")] | None = Field(
        None,
        description="where the training arm runs: null, in the loader's worker processes on the "
        "CPU; a torch device (cuda, cuda:N or cpu), in the training process on that device, the "
        "cached volumes with it (torch implementations of the label-driven arms): for a GPU "
        "machine, whose CPU cores would otherwise bound training",
    )

    @property
    def training_arm(self) -> Arm:
        """The arm training uses: ``arm``, or ``none`` when ``enabled`` is false."""
        return self.arm if self.enabled else "none"

    def seen_profiles(self) -> list[str]:
        """The scanner profiles training draws from (the artifact arm's positive weights; every
        profile when ``profile_weights`` is empty); none for any other arm."""
        if self.training_arm != "artifact":
            return []
        if not self.profile_weights:
            return sorted(self.profiles)
        return sorted(name for name, w in self.profile_weights.items() if w > 0)

    def _unknown(self, key: str, names: list[str]) -> None:
        for name in names:
            if name not in self.profiles:
                known = ", ".join(sorted(self.profiles)) or "none"
                raise ValueError(
                    f"{key}: unknown scanner profile {name!r} (known: {known}); fix the name, or "
                    f"write conf/scanner_sim/{name}.yaml and list it in the defaults of conf/augment/"
                )

    @model_validator(mode="after")
    def _profiles_exist(self) -> AugmentConfig:
        self._unknown("augment.profile_weights", list(self.profile_weights))
        self._unknown("augment.robustness.profiles", self.robustness.profiles)
        # (robustness.profiles is never empty, so neither is the catalogue)
        if self.enabled and self.arm == "physics" and self.physics is None:
            raise ValueError(
                "augment.physics: the physics arm needs its tissue table; compose it with "
                "augment=physics (conf/augment/physics.yaml)"
            )
        if self.enabled and self.profile_weights and sum(self.profile_weights.values()) <= 0:
            raise ValueError(
                "augment.profile_weights: at least one weight must be positive while augmentation "
                "is enabled"
            )
        return self


# --------------------------------------------------------------------------------------------------
# Model and training
# --------------------------------------------------------------------------------------------------


def _instantiable(value: dict[str, Any]) -> dict[str, Any]:
    target = value.get("_target_")
    if not isinstance(target, str) or "." not in target:
        raise ValueError(
            "needs a '_target_' naming an importable callable by its dotted path, e.g. "
            "'torch.optim.AdamW'"
        )
    return value


def _partial(value: dict[str, Any]) -> dict[str, Any]:
    if value.get("_partial_") is not True:
        raise ValueError(
            "needs '_partial_: true' (the parameters, learning rate and weight decay are supplied "
            "when training starts)"
        )
    return value


Instantiable = Annotated[dict[str, Any], AfterValidator(_instantiable)]
PartialInstantiable = Annotated[
    dict[str, Any], AfterValidator(_instantiable), AfterValidator(_partial)
]


class ModelConfig(StrictModel):
    """The classifier: ``network`` is instantiated with Hydra (``_target_`` plus its arguments).

    The network maps a batch of volumes ``(B, 1, X, Y, Z)`` to one logit per volume ``(B, 1)``.
    """

    network: Instantiable


class TrainConfig(StrictModel):
    """How the classifier is trained.

    ``optimizer`` is a Hydra partial (``_partial_: true``) called with the parameters, ``lr`` and
    ``weight_decay``; ``loss`` is instantiated with ``pos_weight`` as a one-element tensor when it is
    set (``balanced``: negatives / positives of the training set). Training stops when the validation
    AUROC has not risen by more than ``min_delta`` for ``patience`` epochs; the epoch with the best
    validation AUROC is kept. ``lr_schedule`` sets each epoch's learning rate (:func:`~shiftguard.training.loop.lr_at`).
    ``amp`` applies on CUDA only. Input spacing and shape are read from the
    volumes themselves. Intensities are mapped so the ``intensity_percentiles`` go to 0 and 1.
    """

    seed: Annotated[int, Field(ge=0)] = 0
    epochs: Annotated[int, Field(ge=1, le=10_000)] = 40
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 4
    lr: PositiveFloat = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    optimizer: PartialInstantiable = Field(
        default_factory=lambda: {"_target_": "torch.optim.AdamW", "_partial_": True}
    )
    loss: Instantiable = Field(default_factory=lambda: {"_target_": "torch.nn.BCEWithLogitsLoss"})
    pos_weight: PositiveFloat | Literal["balanced"] | None = None
    patience: Annotated[int, Field(ge=1)] = 8
    min_delta: Annotated[float, Field(ge=0, le=1)] = 0.0
    keep: Literal["best", "last"] = Field(
        "best",
        description="which epoch's weights the run keeps: the best on validation, or the last "
        "(a fixed epoch budget, when the validation split is too small to choose on)",
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="the learning rate per epoch: constant, or cosine (from lr after the warm-up "
        "down to lr * min_lr_ratio at the last epoch)",
    )
    warmup_epochs: Annotated[int, Field(ge=0)] = 0
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.0
    channels_last: bool = Field(
        False,
        description="train in the channels-last 3D memory layout (faster convolutions on CPU and "
        "CUDA); the saved weights are in the default layout either way",
    )
    amp: bool = False
    num_workers: Annotated[int, Field(ge=0, le=64)] | None = Field(
        None,
        description="loader worker processes; null: $SHIFTGUARD_LOADER_WORKERS, else one per "
        "core beyond two, up to 4 (a runtime setting, so leave it null in conf/)",
    )
    cache_rate: Fraction = 1.0
    flip_probability: Fraction = 0.5
    intensity_percentiles: tuple[
        Annotated[float, Field(ge=0, le=100)], Annotated[float, Field(ge=0, le=100)]
    ] = (1.0, 99.0)
    input_shape: (
        tuple[
            Annotated[int, Field(ge=8, le=1024)],
            Annotated[int, Field(ge=8, le=1024)],
            Annotated[int, Field(ge=8, le=1024)],
        ]
        | None
    ) = Field(
        None,
        description="grid (X, Y, Z) the network sees, area-resampled from the ingest grid; "
        "null: the ingest grid itself",
    )
    lesion_masks: str | None = Field(
        None,
        description="folder of lesion masks (<series_key>.nii.gz or <PatientID>.nii.gz, any grid "
        "with a world affine; all zero without a lesion) for the auxiliary lesion-map loss; null: "
        "trained on the labels alone",
    )
    lesion_loss_weight: Annotated[float, Field(ge=0)] = Field(
        1.0,
        description="weight of the lesion-map loss beside the classification loss (used when "
        "lesion_masks is set and the network has a lesion head)",
    )
    registered_model: str = Field(
        "shiftguard-classifier",
        min_length=1,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$",
        description="MLflow registry name; each training run adds a version aliased 'challenger'",
    )

    @model_validator(mode="after")
    def _percentiles(self) -> TrainConfig:
        lo, hi = self.intensity_percentiles
        if lo >= hi:
            raise ValueError(
                f"train.intensity_percentiles: lower {lo} must be below upper {hi}; write [low, high]"
            )
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"train.warmup_epochs ({self.warmup_epochs}) must be below train.epochs "
                f"({self.epochs})"
            )
        return self


class EvaluateConfig(StrictModel):
    """How the validation stage judges the trained model.

    A calibration map (``calibration``) is fitted on the validation split's probabilities first;
    every figure is then computed on calibrated probabilities, and the operating point is chosen on
    the calibrated validation split with ``threshold_rule`` and applied, unchanged, to the internal
    test split, the unseen scanner's external split and the robustness sets. Every figure carries a stratified percentile-bootstrap interval of ``1 - alpha`` coverage.
    Segments with fewer than ``min_segment_size`` series or ``min_segment_positives`` positives
    (or negatives) are listed but marked too small to judge.
    """

    threshold_rule: str = Field(
        "youden",
        pattern=r"^(youden|(sensitivity|specificity)@(0(\.\d+)?|1(\.0+)?))$",
        description="'youden', or the highest threshold reaching a target: 'sensitivity@0.9'",
    )
    n_bootstrap: Annotated[int, Field(ge=10, le=100_000)] = 1000
    alpha: Annotated[float, Field(gt=0, lt=0.5)] = 0.05
    seed: Annotated[int, Field(ge=0)] = 0
    ece_bins: Annotated[int, Field(ge=2, le=100)] = 10
    segments: list[str] = Field(
        default_factory=lambda: [
            "patient_sex",
            "age_band",
            "site",
            "manufacturer",
            "scanner_model",
        ],
        min_length=1,
    )
    age_bands: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: [0, 40, 60, 75, 200], min_length=2
    )
    min_segment_size: Annotated[int, Field(ge=1)] = 10
    min_segment_positives: Annotated[int, Field(ge=1)] = 3
    robustness_splits: list[str] = Field(default_factory=lambda: ["test"], min_length=1)
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 8
    calibration: Literal["platt", "temperature", "isotonic", "none"] = Field(
        "platt",
        description="the map fitted on the validation split that the bundle carries and the "
        "edge applies (shiftguard.calibration): platt (two parameters), temperature (one), "
        "isotonic (free-form: for validation sets of many hundreds), none",
    )

    @model_validator(mode="after")
    def _bands(self) -> EvaluateConfig:
        if any(b <= a for a, b in zip(self.age_bands, self.age_bands[1:], strict=False)):
            raise ValueError(f"evaluate.age_bands: edges {self.age_bands} must increase strictly")
        return self


SCHEMAS: dict[str, type[BaseModel]] = {
    "data": DataConfig,
    "cohort": CohortConfig,
    "ingest": IngestConfig,
    "split": SplitConfig,
    "augment": AugmentConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
}
"""The schema of every lab-side section (the deployment sections, ``export`` and ``edge``, are in
:mod:`shiftguard.config.deploy`; :data:`shiftguard.config.SCHEMAS` holds both)."""


# --------------------------------------------------------------------------------------------------
# The augmentation experiment's design (conf/design/, selected with +design=<name>)
# --------------------------------------------------------------------------------------------------


class DesignConfig(StrictModel):
    """One design of the augmentation experiment (``conf/design/<name>.yaml``): Hydra's sweeper
    runs one cell per arm x training seed x split seed (``hydra.sweeper.params``); this section says
    what each cell trains on and is scored against.

    A cell splits the embedded cohort (``manifest``, ``diagnoses``, ``ingest``) with its split seed,
    trains for a fixed ``epochs`` budget keeping the last epoch, chooses its operating point on the
    ``val`` split of the in-distribution hold-out set (the ``conf/cohort/`` choice
    ``holdout_cohort``), and scores that set and every unseen scanner of ``external_cohort``. Both
    are generated, ingested and split once into ``cohorts/<cohort>/``
    (:func:`shiftguard.experiment.prepare.prepare`), so a design that needs more studies names a
    larger cohort.
    """

    name: str = Field(min_length=1)
    epochs: Annotated[int, Field(ge=1, le=10_000)]
    manifest: str = "artifacts/ingest/manifest.csv"
    diagnoses: str = "data/ris/verified_diagnoses.csv"
    ingest: str = "artifacts/ingest"
    cohorts: str = "artifacts/experiment/cohorts"
    holdout_cohort: str = Field("holdout", pattern=r"^[A-Za-z0-9_-]+$")
    external_cohort: str = Field("external", pattern=r"^[A-Za-z0-9_-]+$")
    reference_arm: Arm = "none"
    delta: Annotated[float, Field(gt=0, lt=0.5)] = 0.05
    power: Annotated[float, Field(gt=0, lt=1)] = 0.8
    correlation: Annotated[float, Field(ge=0, lt=1)] = 0.5
    n_boot: Annotated[int, Field(ge=100, le=100_000)] = 2000
    alpha: Annotated[float, Field(gt=0, lt=1)] = 0.05
    retained_fraction: Annotated[float, Field(gt=0, le=1)] = 0.97
    reference_loss: Annotated[float, Field(gt=0, lt=1)] = 0.10

    def cohort_folder(self, cohort: str, root: Path | None = None) -> Path:
        """``cohorts/<cohort>`` (under ``root`` when ``cohorts`` is relative)."""
        base = Path(self.cohorts)
        return (base if base.is_absolute() or root is None else root / base) / cohort

    @property
    def holdout(self) -> str:
        """The hold-out set's split table."""
        return str(self.cohort_folder(self.holdout_cohort) / "split" / "dataset.csv")

    @property
    def holdout_ingest(self) -> str:
        """The hold-out set's ingest folder."""
        return str(self.cohort_folder(self.holdout_cohort) / "ingest")

    @property
    def external(self) -> str:
        """The unseen scanners' split table."""
        return str(self.cohort_folder(self.external_cohort) / "split" / "dataset.csv")

    @property
    def external_ingest(self) -> str:
        """The unseen scanners' ingest folder."""
        return str(self.cohort_folder(self.external_cohort) / "ingest")
