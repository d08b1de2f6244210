"""Shared fixtures: the project's conf/ composed with Hydra's compose API, shrunk for fast tests.

Like lightning-hydra-template's conftest: tests run the real configuration, only smaller (few subjects,
small matrices keeping each scanner's field of view, a coarse ingest grid).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shiftguard.config import compose

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def shrink(config: dict[str, Any], n_subjects: int = 6, matrix: int = 40) -> dict[str, Any]:
    """Make a composed config cheap: ``n_subjects`` subjects, each scanner at ``matrix``^2 in-plane
    with about 16 slices, keeping every scanner's field of view (so anatomy and lesions stay in view)
    and its orientation, noise and storage; ingest on a 24 x 28 x 24 grid of 7 mm voxels."""
    cohort = config["cohort"]
    cohort["n_subjects"] = n_subjects
    for profile in cohort["scanners"].values():
        rows, cols = profile["matrix"]
        profile["pixel_spacing"] = [
            profile["pixel_spacing"][0] * rows / matrix,
            profile["pixel_spacing"][1] * cols / matrix,
        ]
        profile["matrix"] = [matrix, matrix]
        coverage = profile["slice_spacing"] * profile["n_slices"]
        profile["n_slices"] = 16
        factor = coverage / (16 * profile["slice_spacing"])
        profile["slice_spacing"] *= factor
        profile["slice_thickness"] *= factor
    config["ingest"]["spacing"] = [7.0, 7.0, 7.0]
    config["ingest"]["size"] = [24, 28, 24]
    return config


@pytest.fixture(scope="session")
def conf_dir() -> Path:
    return CONF


@pytest.fixture
def full_config() -> dict[str, Any]:
    """The default configuration exactly as ``conf/`` composes it."""
    return compose(conf_dir=CONF)


@pytest.fixture
def tiny_config(full_config: dict[str, Any]) -> dict[str, Any]:
    """The default configuration, shrunk for tests (see :func:`shrink`)."""
    return shrink(full_config)
