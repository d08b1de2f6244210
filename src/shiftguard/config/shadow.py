"""Schema of the ``shadow`` section (``conf/shadow/``): how shadow predictions are judged against
the verified diagnoses, and the gate a challenger must pass before ``shiftguard promote`` moves the
MLflow alias ``champion`` to it.

Kept out of :mod:`shiftguard.config.schema`: judging and promoting models re-runs no lab stage.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from shiftguard.config.schema import StrictModel

Metric = Literal["auroc", "sensitivity", "specificity"]


class GateConfig(StrictModel):
    """What a challenger's shadow evaluation must show before it becomes the champion."""

    min_studies: Annotated[
        int, Field(ge=1, description="fewest studies with a verified diagnosis")
    ] = 100
    max_flagged_segments: Annotated[
        int, Field(ge=0, description="segments flagged below overall or validation")
    ] = 0
    noninferiority_margin: Annotated[
        float,
        Field(ge=0, le=1, description="challenger - champion may be at most this much lower"),
    ] = 0.05
    noninferiority_metrics: list[Metric] = Field(
        default_factory=lambda: list[Metric](["auroc", "sensitivity"]),
        description="metrics whose paired difference (lower CI bound) must exceed -margin",
    )
    no_segment_worse: bool = Field(
        True, description="refuse when the challenger is significantly worse on any one segment"
    )
    first_champion: bool = Field(
        True, description="allow a challenger to become champion when there is none yet"
    )


class PacsConfig(StrictModel):
    """Where ``shadow fetch`` / ``shadow evaluate --pacs`` (DIMSE) or ``--dicomweb`` read verified
    reports (each a flag too)."""

    address: str | None = Field(
        None, description="the PACS as AE_TITLE@host:port, e.g. ORTHANC@10.20.0.5:4242"
    )
    ae_title: str = Field(
        "SHIFTGUARD", min_length=1, max_length=16, description="our AE title at the PACS"
    )
    retrieve: Literal["move", "get"] = Field(
        "move", description="C-MOVE (the PACS connects back) or C-GET (on our association)"
    )
    move_host: str = Field(
        "127.0.0.1",
        description="C-MOVE: the address we receive on, the one the PACS has for our AE "
        "(0.0.0.0: every interface)",
    )
    move_port: Annotated[int, Field(ge=1, le=65535)] | None = Field(
        None, description="C-MOVE: the port we receive on, the one the PACS has for our AE"
    )
    dicomweb: str | None = Field(
        None,
        description="instead of address: a DICOMweb service root (QIDO-RS, WADO-RS), e.g. "
        "https://pacs.example/dicom-web; http:// on loopback only",
    )
    token_env: str | None = Field(
        None, description="DICOMweb: the environment variable holding a bearer token"
    )
    ca: str | None = Field(None, description="DICOMweb: CA bundle the server is checked against")
    cert: str | None = Field(None, description="DICOMweb: client certificate (PEM)")
    key: str | None = Field(None, description="DICOMweb: the client certificate's key (PEM)")


class RolloutWave(StrictModel):
    """One wave of a staged rollout: its sites are those whose ``edge.follow.wave`` is its
    index. The next wave opens when every site of this one serves the new champion with its
    observation passed, they processed ``min_studies`` studies on it together, and the wave has
    been open ``min_hours``."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    min_studies: Annotated[int, Field(ge=0)] = 0
    min_hours: Annotated[float, Field(ge=0)] = 0.0


def _default_waves() -> list[RolloutWave]:
    return [
        RolloutWave(name="canary", min_studies=50, min_hours=24.0),
        RolloutWave(name="everyone"),
    ]


class RolloutConfig(StrictModel):
    """How a new champion reaches the sites (``shiftguard promote`` starts it at wave 0,
    ``shiftguard fleet rollout`` moves it on, or halts it when a site rolled back)."""

    waves: list[RolloutWave] = Field(default_factory=_default_waves, min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> RolloutConfig:
        names = [w.name for w in self.waves]
        if len(names) != len(set(names)):
            raise ValueError(f"shadow.rollout.waves: names must be unique, got {names}")
        return self


class ShadowConfig(StrictModel):
    """``shiftguard shadow evaluate`` and ``shiftguard promote``."""

    segments: list[str] = Field(
        default_factory=lambda: ["sex", "age_band", "site", "manufacturer", "scanner_model"],
        description="shadow-log columns each figure is broken down by",
    )
    min_n: Annotated[int, Field(ge=2, description="fewest studies in a judgeable segment")] = 20
    min_positive: Annotated[
        int, Field(ge=1, description="fewest positives (and negatives) in a judgeable segment")
    ] = 5
    n_boot: Annotated[int, Field(ge=50, description="bootstrap resamples")] = 1000
    alpha: Annotated[float, Field(gt=0, lt=0.5, description="1 - alpha: CI coverage")] = 0.05
    seed: int = 0
    experiment: str = Field("shiftguard", description="MLflow experiment of evaluation runs")
    registered_model: str | None = Field(
        None, description="MLflow registered model; null: the bundle's name"
    )
    gate: GateConfig = Field(default_factory=GateConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    pacs: PacsConfig = Field(default_factory=PacsConfig)
