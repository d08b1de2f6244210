"""Configuration: Hydra composition of ``conf/``, ``params.yaml``, and typed stage schemas."""

from __future__ import annotations

from shiftguard.config.deploy import (
    EdgeConfig,
    EdgeDestination,
    ExportConfig,
    SeriesSelection,
)
from shiftguard.config.loader import (
    PARAMS_FILE,
    compose,
    compose_section,
    dump_params,
    find_conf_dir,
    load_section,
    read_params,
    validate,
    validate_all,
    write_params,
)
from shiftguard.config.monitor import AlertRule, MonitorConfig, ScenarioConfig, ScenarioPhase
from shiftguard.config.schema import (
    AugmentConfig,
    CohortConfig,
    DataConfig,
    EvaluateConfig,
    IngestConfig,
    LabelColumns,
    ModelConfig,
    ScannerProfile,
    ScannerSimProfile,
    SiteConfig,
    SplitConfig,
    TrainConfig,
)
from shiftguard.config.sections import SCHEMAS
from shiftguard.config.shadow import GateConfig, ShadowConfig
from shiftguard.errors import ConfigError

__all__ = [
    "PARAMS_FILE",
    "SCHEMAS",
    "AlertRule",
    "AugmentConfig",
    "CohortConfig",
    "ConfigError",
    "DataConfig",
    "EdgeConfig",
    "EdgeDestination",
    "EvaluateConfig",
    "ExportConfig",
    "GateConfig",
    "IngestConfig",
    "LabelColumns",
    "ModelConfig",
    "MonitorConfig",
    "ScannerProfile",
    "ScannerSimProfile",
    "ScenarioConfig",
    "ScenarioPhase",
    "SeriesSelection",
    "ShadowConfig",
    "SiteConfig",
    "SplitConfig",
    "TrainConfig",
    "compose",
    "compose_section",
    "dump_params",
    "find_conf_dir",
    "load_section",
    "read_params",
    "validate",
    "validate_all",
    "write_params",
]
