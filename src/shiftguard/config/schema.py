"""Typed schemas for every stage's section of the composed configuration.

``conf/`` (composed by Hydra) is the single source of truth; these models validate a section when a stage
or command loads it, so a wrong key or value fails at load time with a message that names the key.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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

    radius_mm: tuple[PositiveFloat, PositiveFloat] = (3.0, 12.0)
    contrast: tuple[PositiveFloat, PositiveFloat] = (0.15, 0.6)
    hyperintense_fraction: Fraction = 0.3
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


SCHEMAS: dict[str, type[BaseModel]] = {
    "cohort": CohortConfig,
    "ingest": IngestConfig,
    "split": SplitConfig,
}
"""The schema of every top-level section of the composed configuration."""
