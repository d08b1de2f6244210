"""Shared fixtures: the project's conf/ composed with Hydra's compose API.

Like lightning-hydra-template's conftest, tests run the real configuration made small: the
``experiment=tiny`` preset (10 subjects, 40x40x16 acquisitions keeping each scanner's field of view,
a coarse ingest grid).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shiftguard.config import compose

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
TINY = ("experiment=tiny",)


@pytest.fixture(scope="session")
def conf_dir() -> Path:
    return CONF


@pytest.fixture
def full_config() -> dict[str, Any]:
    """The default configuration exactly as ``conf/`` composes it."""
    return compose(conf_dir=CONF)


@pytest.fixture
def tiny_config() -> dict[str, Any]:
    """The ``experiment=tiny`` configuration."""
    return compose(TINY, conf_dir=CONF)
