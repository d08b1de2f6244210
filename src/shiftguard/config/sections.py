"""The schema of every top-level section of the composed configuration: the lab's stages, the
deployment files, monitoring and shadow evaluation."""

from __future__ import annotations

from pydantic import BaseModel

from shiftguard.config.deploy import DEPLOY_SCHEMAS
from shiftguard.config.monitor import MonitorConfig
from shiftguard.config.schema import SCHEMAS as LAB_SCHEMAS
from shiftguard.config.shadow import ShadowConfig

#: the schema of every top-level section of the composed configuration
SCHEMAS: dict[str, type[BaseModel]] = {
    **LAB_SCHEMAS,
    **DEPLOY_SCHEMAS,
    "monitor": MonitorConfig,
    "shadow": ShadowConfig,
}
