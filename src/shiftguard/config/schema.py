"""Typed schemas for every stage's section of the composed configuration.

``conf/`` (composed by Hydra) is the single source of truth; these models validate a section when a stage
or command loads it, so a wrong key or value fails at load time with a message that names the key.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class _Strict(BaseModel):
    """Base: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def _check_range(name: str, lo: float, hi: float) -> None:
    if lo > hi:
        raise ValueError(f"{name}: minimum {lo} is above maximum {hi}; write it as [min, max]")


# --------------------------------------------------------------------------------------------------
# Cohort: the embedded synthetic multi-scanner dataset
# --------------------------------------------------------------------------------------------------


class ScannerProfile(_Strict):
    """How one scanner model and protocol acquires and stores a T1-weighted brain series.

    Geometry: ``matrix`` is ``(rows, columns)`` of each slice, ``pixel_spacing`` is ``(row, column)``
    spacing in mm, slices are ``slice_thickness`` thick and ``slice_spacing`` apart (centre to centre),
    ``n_slices`` of them. ``orientation`` is the acquisition plane; ``tilt_deg`` tilts it about the
    left-right axis (an oblique, AC-PC-like acquisition when non-zero).

    Image formation: ``noise`` is the Rician noise standard deviation relative to white-matter signal,
    ``bias_field`` the peak-to-peak amplitude of the smooth multiplicative receive-coil field (0.3 means
    intensities vary by about +-15 %), ``blur_fwhm_mm`` an in-plane point-spread function, ``gamma`` a
    vendor contrast curve, ``intensity_scale`` the vendor's stored value for white matter.

    Storage: stored values are ``round((signal - rescale_intercept) / rescale_slope)`` as ``bits_stored``
    unsigned integers, with ``transfer_syntax`` one of the names in
    :data:`shiftguard.cohort.TRANSFER_SYNTAXES`.
    """

    manufacturer: str
    model: str
    field_strength: PositiveFloat
    software_version: str = "1.0"
    series_description: str = "T1 3D"
    sequence_name: str = "tfl3d1"
    repetition_time: PositiveFloat = 2300.0
    echo_time: PositiveFloat = 2.98
    flip_angle: PositiveFloat = 9.0
    matrix: tuple[Annotated[int, Field(ge=16, le=1024)], Annotated[int, Field(ge=16, le=1024)]]
    pixel_spacing: tuple[PositiveFloat, PositiveFloat]
    slice_thickness: PositiveFloat
    slice_spacing: PositiveFloat
    n_slices: Annotated[int, Field(ge=3, le=1024)]
    orientation: Literal["axial", "coronal", "sagittal"] = "axial"
    tilt_deg: Annotated[float, Field(ge=-45, le=45)] = 0.0
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


class SiteConfig(_Strict):
    """A hospital of the cohort: its scanner, its population and how often it sees the finding."""

    name: str = Field(description="InstitutionName written into every file")
    scanner: str = Field(description="key into CohortConfig.scanners")
    weight: PositiveFloat = Field(1.0, description="relative share of the cohort's subjects")
    prevalence: Fraction = Field(description="fraction of subjects with the finding")
    age_mean: Annotated[float, Field(ge=18, le=100)] = 55.0
    age_sd: Annotated[float, Field(ge=0, le=40)] = 15.0
    female_fraction: Fraction = 0.5


class LesionConfig(_Strict):
    """The binary finding: one focal lesion inside brain tissue, kept as a ground-truth mask.

    ``contrast`` is the relative intensity change against the surrounding tissue (sign drawn at random
    per lesion with ``hyperintense_fraction``); small radius and low contrast make subtle cases.
    """

    radius_mm: tuple[PositiveFloat, PositiveFloat] = (8.0, 16.0)
    contrast: tuple[PositiveFloat, PositiveFloat] = (0.5, 1.0)
    hyperintense_fraction: Fraction = 0.75
    edge_softness_mm: Annotated[float, Field(ge=0, le=5)] = 1.0
    age_log_odds_per_decade: float = Field(
        0.35, description="older subjects are more likely to have the finding, as in real cohorts"
    )

    @model_validator(mode="after")
    def _ranges(self) -> LesionConfig:
        _check_range("cohort.lesion.radius_mm", *self.radius_mm)
        _check_range("cohort.lesion.contrast", *self.contrast)
        return self


class AnatomyConfig(_Strict):
    """Per-subject variation applied to the MNI152 template."""

    head_scale_sd: Annotated[float, Field(ge=0, le=0.2)] = 0.05
    rotation_sd_deg: Annotated[float, Field(ge=0, le=20)] = 3.0
    translation_sd_mm: Annotated[float, Field(ge=0, le=20)] = 3.0
    deformation_mm: Annotated[float, Field(ge=0, le=10)] = 2.5
    deformation_grid: Annotated[int, Field(ge=2, le=16)] = 5
    atrophy_per_decade: Annotated[float, Field(ge=0, le=0.2)] = 0.03
    intensity_sd: Annotated[float, Field(ge=0, le=0.3)] = 0.04


class CohortConfig(_Strict):
    """The whole synthetic cohort. Same seed and config give byte-identical files."""

    seed: Annotated[int, Field(ge=0)] = 20261128
    n_subjects: Annotated[int, Field(ge=1, le=100000)] = 200
    study_date_origin: str = Field("20200101", pattern=r"^\d{8}$")
    readers: list[str] = Field(
        default_factory=lambda: ["reader_a", "reader_b", "reader_c"], min_length=1
    )
    anatomy: AnatomyConfig = Field(default_factory=AnatomyConfig)
    lesion: LesionConfig = Field(default_factory=lambda: LesionConfig())
    scanners: dict[str, ScannerProfile]
    sites: list[SiteConfig]

    @model_validator(mode="after")
    def _sites_use_known_scanners(self) -> CohortConfig:
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
# Ingest: any DICOM tree to validated, canonical volumes
# --------------------------------------------------------------------------------------------------


class IngestConfig(_Strict):
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


class ExternalSelector(_Strict):
    """Series whose manifest ``column`` holds one of ``values`` form the external test set."""

    column: str = "scanner_model"
    values: list[str] = Field(default_factory=list)


class SplitConfig(_Strict):
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
# Augment: scanner profiles (conf/scanner/) and the scanner-simulating augmentation (conf/augment/)
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


class BiasFieldSim(_Strict):
    """TorchIO's polynomial bias field: every coefficient is uniform in ``[-m, m]`` with the
    magnitude ``m`` drawn from ``coefficients``; ``order`` is the polynomial degree (TorchIO draws
    ``(order + 1)(order + 2)(order + 3) / 6`` coefficients)."""

    coefficients: MagnitudeRange
    order: Annotated[int, Field(ge=0, le=6)] = 3


class NoiseSim(_Strict):
    """Noise standard deviation relative to the image's 99th percentile; Rician (the magnitude of
    complex Gaussian noise, as in low-SNR magnitude images) or Gaussian."""

    std: Annotated[tuple[Fraction, Fraction], AfterValidator(_ordered)]
    rician: bool = False


class GhostingSim(_Strict):
    """``num_ghosts`` ghosts along one of ``axes`` (the phase-encoding directions), relative
    ``intensity`` in [0, 1]; ``restore`` is the fraction of the k-space centre kept intact."""

    num_ghosts: CountRange
    axes: list[Axis] = Field(default_factory=lambda: list[Axis]([0, 1]), min_length=1)
    intensity: FractionRange
    restore: Fraction = 0.02


class SpikeSim(_Strict):
    """``num_spikes`` k-space spikes, ``intensity`` relative to the spectrum's maximum (TorchIO's
    ``RandomSpike`` uses (1, 3) by default; the sign is kept)."""

    num_spikes: CountRange
    intensity: Range


class MotionSim(_Strict):
    """``num_transforms`` rigid movements during the acquisition, each with rotations in ``degrees``
    and translations in ``translation`` (mm) drawn per axis, as TorchIO's ``RandomMotion``."""

    degrees: Range
    translation: Range
    num_transforms: CountRange


class BlurSim(_Strict):
    """Gaussian point-spread function: standard deviation in mm, drawn per axis."""

    std: MagnitudeRange


class AnisotropySim(_Strict):
    """Thick slices along one of ``axes``: ``downsampling`` times the voxel size, and back."""

    axes: list[Axis] = Field(default_factory=lambda: list[Axis]([2]), min_length=1)
    downsampling: FactorRange


class GammaSim(_Strict):
    """Vendor contrast curve: ``gamma = exp(log_gamma)``."""

    log_gamma: Range


class ScaleSim(_Strict):
    """Vendor intensity scaling: ``factor = exp(log_scale)``."""

    log_scale: Range


class ScannerSimProfile(_Strict):
    """How one kind of scanner or protocol changes an image (``conf/scanner/<name>.yaml``).

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


class RobustnessConfig(_Strict):
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


class AugmentConfig(_Strict):
    """Scanner-simulating augmentation for training and the robustness test sets.

    ``profiles`` is the catalogue of scanner profiles (composed from ``conf/scanner/``); it is the
    same whether training augments or not, because the robustness sets use it too. Per training
    sample, with ``probability`` (when ``enabled``), a profile is drawn with ``profile_weights``
    (empty: uniform over every profile; otherwise only the listed ones), a severity uniformly from
    the integers of ``severity`` (inclusive), and then the acquisition parameters.
    """

    enabled: bool = True
    probability: Fraction = 0.8
    profiles: dict[str, ScannerSimProfile] = Field(default_factory=dict)
    profile_weights: dict[str, NonNegativeFloat] = Field(default_factory=dict)
    severity: SeverityRange = (1, SEVERITY_MAX)
    backend: Literal["fast", "torchio"] = "fast"
    robustness: RobustnessConfig

    def _unknown(self, key: str, names: list[str]) -> None:
        for name in names:
            if name not in self.profiles:
                known = ", ".join(sorted(self.profiles)) or "none"
                raise ValueError(
                    f"{key}: unknown scanner profile {name!r} (known: {known}); fix the name, or "
                    f"write conf/scanner/{name}.yaml and list it in the defaults of conf/augment/"
                )

    @model_validator(mode="after")
    def _profiles_exist(self) -> AugmentConfig:
        self._unknown("augment.profile_weights", list(self.profile_weights))
        self._unknown("augment.robustness.profiles", self.robustness.profiles)
        # (robustness.profiles is never empty, so neither is the catalogue)
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


class ModelConfig(_Strict):
    """The classifier: ``network`` is instantiated with Hydra (``_target_`` plus its arguments).

    The network maps a batch of volumes ``(B, 1, X, Y, Z)`` to one logit per volume ``(B, 1)``.
    """

    network: Instantiable


class TrainConfig(_Strict):
    """How the classifier is trained.

    ``optimizer`` is a Hydra partial (``_partial_: true``) called with the parameters, ``lr`` and
    ``weight_decay``; ``loss`` is instantiated with ``pos_weight`` as a one-element tensor when it is
    set (``balanced``: negatives / positives of the training set). Training stops when the validation
    AUROC has not risen by more than ``min_delta`` for ``patience`` epochs; the epoch with the best
    validation AUROC is kept. ``amp`` applies on CUDA only. Input spacing and shape are read from the
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
    amp: bool = False
    num_workers: Annotated[int, Field(ge=0, le=64)] | None = Field(
        None,
        description="loader worker processes; null: $SHIFTGUARD_LOADER_WORKERS, else one per "
        "spare core up to 4 (a runtime setting, so leave it null in conf/)",
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
    registered_model: str = Field(
        "shiftguard-classifier",
        min_length=1,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$",
        description="MLflow registry name; each training run adds a version aliased 'candidate'",
    )

    @model_validator(mode="after")
    def _percentiles(self) -> TrainConfig:
        lo, hi = self.intensity_percentiles
        if lo >= hi:
            raise ValueError(
                f"train.intensity_percentiles: lower {lo} must be below upper {hi}; write [low, high]"
            )
        return self


class EvaluateConfig(_Strict):
    """How the validation stage judges the trained model.

    The operating point is chosen on the validation split with ``threshold_rule`` and then applied,
    unchanged, to the internal test split, the unseen scanner's external split and the robustness
    sets. Every figure carries a stratified percentile-bootstrap interval of ``1 - alpha`` coverage.
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

    @model_validator(mode="after")
    def _bands(self) -> EvaluateConfig:
        if any(b <= a for a, b in zip(self.age_bands, self.age_bands[1:], strict=False)):
            raise ValueError(f"evaluate.age_bands: edges {self.age_bands} must increase strictly")
        return self


SCHEMAS: dict[str, type[BaseModel]] = {
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
