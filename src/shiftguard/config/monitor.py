"""Schema of the ``monitor`` section (``conf/monitor/``): where records are collected, how they are
cut into windows, how drift is scored, and when an alert is raised; and of the drift scenarios
(``conf/monitor/scenarios/*.yaml``) that show what the monitor detects and when.

Kept out of :mod:`shiftguard.config.schema`: monitoring settings do not re-run any lab stage.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from shiftguard.config.schema import StrictModel


class CollectorConfig(StrictModel):
    """The collector service (``shiftguard monitor collect``) and how the edge reaches it."""

    url: str | None = Field(
        None,
        description="where the edge ships records, e.g. https://10.20.0.7:8765; null: spool only",
    )
    token_env: str = Field(
        "SHIFTGUARD_MONITOR_TOKEN", description="environment variable holding the shared token"
    )
    host: str = Field("127.0.0.1", description="collector listen address")
    port: Annotated[int, Field(ge=0, le=65535)] = 8765
    store: str = Field(
        "monitor-data/records.db",
        description="the collector's record store: a SQLite file, or a PostgreSQL server as "
        "postgresql://user@host:port/database (password in PGPASSWORD or ~/.pgpass)",
    )
    tls_cert: str | None = Field(None, description="PEM certificate: HTTPS when set")
    tls_key: str | None = Field(None, description="PEM private key of tls_cert")
    tls_ca: str | None = Field(None, description="CA bundle; set to require client certificates")
    batch_size: Annotated[int, Field(ge=1, le=5000)] = 500
    max_batch: Annotated[int, Field(ge=1)] = 5000

    @model_validator(mode="after")
    def _tls_pair(self) -> CollectorConfig:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError(
                "monitor.collector.tls_cert and tls_key go together: set both or neither"
            )
        return self


class WindowConfig(StrictModel):
    """How a site's stream of records is cut into windows compared with the reference."""

    by: Literal["count", "time"] = "count"
    size: Annotated[int, Field(ge=5, description="studies per window (by: count)")] = 50
    period_hours: Annotated[float, Field(gt=0, description="window length (by: time)")] = 24.0
    min_size: Annotated[
        int, Field(ge=2, description="a time window with fewer studies is not judged")
    ] = 20
    batch_windows: Annotated[
        int,
        Field(
            ge=1,
            description="a batch of past studies (the DVC stage monitor) is cut, in time order, "
            "into at most this many count windows of equal size, each of min_size or more",
        ),
    ] = 4


class DriftConfig(StrictModel):
    """Per-feature tests (Evidently's defaults) and the unified score."""

    drift_share: Annotated[float, Field(gt=0, le=1)] = 0.5
    bootstrap: Annotated[
        int, Field(ge=20, description="reference windows drawn to calibrate the unified score")
    ] = 200
    seed: int = 0
    weights: dict[str, float] = Field(
        default_factory=lambda: {"metadata": 1.0, "image": 1.0, "output": 1.0, "embedding": 1.0},
        description="weight of each feature group in the unified score",
    )


ESTIMATED_METRICS = ("auroc", "sensitivity", "specificity", "positive_rate", "prevalence")
ESTIMATION_METHODS = ("cbpe", "density_ratio")


def estimated_metric(metric: str) -> tuple[str, str, bool] | None:
    """``(metric, method, drop)`` of an ``estimated_<metric>[_drop][@<method>]`` alert metric,
    ``None`` for any other name.

    >>> estimated_metric("estimated_sensitivity_drop@density_ratio")
    ('sensitivity', 'density_ratio', True)
    >>> estimated_metric("unified_score") is None
    True
    """
    if not metric.startswith("estimated_"):
        return None
    rest, _, method = metric.removeprefix("estimated_").partition("@")
    drop = rest.endswith("_drop")
    return rest.removesuffix("_drop"), method or "cbpe", drop


#: the alert rules' fleet metric (judged by the collector, :mod:`shiftguard.monitor.fleet`)
FLEET_METRIC = "heartbeat_age"


class AlertRule(StrictModel):
    """Raise an alert when ``metric`` is above ``above`` (or below ``below``) in ``windows``
    consecutive windows."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    metric: str = Field(
        description="drift_share, unified_score, score_<group>, drift:<feature> (1 if drifted), "
        "novel:<feature> (share of the window's values the reference never had), "
        "estimated_<metric>[@<method>] (label-free estimate: metric auroc, sensitivity, "
        "specificity, positive_rate or prevalence; method cbpe, the default, or density_ratio), "
        "estimated_<metric>_drop[@<method>] (the bundle's held-out reference value minus it); "
        "heartbeat_age (a site's time since its last heartbeat over its interval: judged by the "
        "collector on the fleet, not on windows)"
    )
    above: float | None = None
    below: float | None = None
    windows: Annotated[int, Field(ge=1)] = 1

    @model_validator(mode="after")
    def _known_metric(self) -> AlertRule:
        estimated = estimated_metric(self.metric)
        ok = self.metric in (
            "drift_share",
            "unified_score",
            "heartbeat_age",
        ) or self.metric.startswith(("score_", "drift:", "novel:"))
        if estimated is not None:
            metric, method, _ = estimated
            ok = metric in ESTIMATED_METRICS and method in ESTIMATION_METHODS
        if not ok:
            raise ValueError(
                f"alert {self.name!r}: metric {self.metric!r} is not drift_share, unified_score, "
                "score_<group>, drift:<feature>, novel:<feature>, heartbeat_age or "
                f"estimated_<metric>[_drop][@<method>] (metrics: {', '.join(ESTIMATED_METRICS)}; "
                f"methods: {', '.join(ESTIMATION_METHODS)})"
            )
        if (self.above is None) == (self.below is None):
            raise ValueError(
                f"alert {self.name!r}: give exactly one of 'above' and 'below' (the threshold "
                "and which side of it fires)"
            )
        return self

    @property
    def limit(self) -> float:
        """The threshold, whichever side fires."""
        return float(self.above if self.above is not None else self.below)  # type: ignore[arg-type]

    def fires(self, value: float) -> bool:
        """Whether ``value`` is on the firing side of the threshold."""
        return value > self.above if self.above is not None else value < self.limit


class EstimationConfig(StrictModel):
    """Label-free performance estimation per window (:mod:`shiftguard.monitor.performance`): CBPE
    from the calibrated outputs, and the density-ratio variant that reweights the bundle's
    labelled held-out reference by a domain classifier on the PHI-free image, output and embedding
    features."""

    enabled: bool = True
    n_draws: Annotated[
        int, Field(ge=50, description="CBPE: label vectors drawn for the interval")
    ] = 1000
    n_boot: Annotated[
        int, Field(ge=20, description="density ratio: bootstrap resamples for the interval")
    ] = 200
    alpha: Annotated[float, Field(gt=0, lt=0.5)] = 0.05
    seed: int = 0
    min_ess: Annotated[
        float,
        Field(
            gt=0,
            description="density ratio: below this effective sample size of the reweighted "
            "reference the window is marked unsupported (the reference has no cases like it)",
        ),
    ] = 10.0
    clip: Annotated[
        float, Field(gt=1, description="density ratio: weights capped at this x mean")
    ] = 20.0
    l2: Annotated[float, Field(ge=0, description="density ratio: domain classifier's L2")] = 1.0


class ScenarioSettings(StrictModel):
    """Where the drift scenarios are defined and how big their simulated pools are."""

    folder: str = Field("conf/monitor/scenarios", description="one YAML file per scenario")
    pool_training: Annotated[
        int, Field(ge=10, description="simulated studies from the training scanners")
    ] = 150
    pool_other: Annotated[
        int, Field(ge=10, description="simulated studies per other condition")
    ] = 60
    seed: int = 1
    cache: str = Field("artifacts/scenarios/pools", description="simulated pools, reused")
    estimation_windows: Annotated[
        int,
        Field(
            ge=10,
            description="windows drawn from each pool to judge the label-free estimates against "
            "the pool's verified findings",
        ),
    ] = 100


class MonitorConfig(StrictModel):
    """``shiftguard monitor``: collection, windows, drift scoring, alerts, reports."""

    site: str = Field("site", pattern=r"^[A-Za-z0-9_.\-]{1,64}$", description="this edge's name")
    collector: CollectorConfig = Field(default_factory=CollectorConfig)
    window: WindowConfig = Field(default_factory=WindowConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    alerts: list[AlertRule] = Field(default_factory=list)
    estimation: EstimationConfig = Field(default_factory=EstimationConfig)
    webhook: str | None = Field(None, description="POST each new alert here (JSON)")
    state: str = Field("monitor-data/monitor.db", description="judged windows and alerts")
    workspace: str = Field("monitor-data/workspace", description="Evidently workspace folder")
    reports: str = Field("monitor-data/reports", description="static HTML reports")
    html: Literal["latest", "alerts", "all", "none"] = Field(
        "latest", description="which windows get a static HTML report"
    )
    scenarios: ScenarioSettings = Field(default_factory=lambda: ScenarioSettings())

    @property
    def window_rules(self) -> list[AlertRule]:
        """The rules judged on windows of records (all but the fleet's ``heartbeat_age``)."""
        return [r for r in self.alerts if r.metric != FLEET_METRIC]

    @property
    def fleet_rules(self) -> list[AlertRule]:
        """The rules the collector judges on the sites' heartbeats."""
        return [r for r in self.alerts if r.metric == FLEET_METRIC]

    @model_validator(mode="after")
    def _unique_alerts(self) -> MonitorConfig:
        names = [a.name for a in self.alerts]
        if len(names) != len(set(names)):
            raise ValueError(f"monitor.alerts: names must be unique, got {names}")
        return self


class ScenarioPhase(StrictModel):
    """A stretch of a simulated stream: ``studies`` drawn from one generating condition."""

    studies: Annotated[int, Field(ge=1)]
    scanners: list[str] = Field(
        default_factory=list, description="scanner profile names; empty: the training scanners"
    )
    slice_thickness_mm: float | None = Field(None, description="override the protocol's thickness")
    prevalence: Annotated[float, Field(ge=0, le=1)] | None = None
    ramp: bool = Field(
        False, description="blend linearly from the previous phase's condition to this one"
    )


class ScenarioConfig(StrictModel):
    """A drift scenario: phases in order; ``onset`` is the study at which drift begins (None: no
    drift, so any alert is a false alarm)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str = ""
    phases: list[ScenarioPhase] = Field(min_length=1)
    onset: Annotated[int, Field(ge=0)] | None = None
    expect_detection_within: Annotated[int, Field(ge=1)] | None = Field(
        None, description="the target: flagged within this many studies of the onset"
    )
    seed: int = 0
