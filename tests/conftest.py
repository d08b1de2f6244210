"""Shared fixtures: the project's conf/ composed with Hydra's compose API.

Like lightning-hydra-template's conftest, tests run the real configuration made small: the
``experiment=tiny`` preset (10 subjects, 40x40x16 acquisitions keeping each scanner's field of view,
a coarse ingest grid).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

from shiftguard.config import compose

REPO = Path(__file__).resolve().parents[1]

# the generator's derived template is cached on disk (shiftguard.cohort.template.cache_dir): under
# the system's temporary folder for tests, shared by xdist workers and the processes they spawn
os.environ.setdefault(
    "SHIFTGUARD_CACHE_DIR", str(Path(tempfile.gettempdir()) / "shiftguard-test-cache")
)
CONF = REPO / "conf"
TINY = ("experiment=tiny",)


def _test_signing_key() -> None:
    """A signing key for this test process, not the user's: export and write_bundle sign with it
    and opening a bundle trusts it (subprocesses inherit both variables)."""
    from shiftguard.edge.signing import SIGNING_KEY_ENV, TRUSTED_KEYS_ENV, generate

    if os.environ.get(SIGNING_KEY_ENV) and os.environ.get(TRUSTED_KEYS_ENV):
        return
    private, public = generate(Path(tempfile.mkdtemp(prefix="shiftguard-test-keys-")), "tests")
    os.environ[SIGNING_KEY_ENV], os.environ[TRUSTED_KEYS_ENV] = str(private), str(public)


_test_signing_key()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest first: the files marked ``slow(seconds=N)``, by N descending, then everything else in
    collection order. ``make test`` runs each file whole on one worker, in this order (``--dist
    loadfile --no-loadscope-reorder``; xdist would otherwise start the files with the most tests
    first), so the long files start first and both workers stay busy to the end of the run."""

    def expected(item: pytest.Item) -> float:
        marker = item.get_closest_marker("slow")
        return -float(marker.kwargs.get("seconds", 30)) if marker is not None else 0.0

    items.sort(key=expected)  # stable: collection order within each file and among the rest


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


@pytest.fixture(autouse=True)
def _mlflow_process_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undo what MLflow leaves behind in the process after each test.

    ``mlflow.set_tracking_uri`` and ``mlflow.set_experiment`` keep the store in module globals and
    export it as ``MLFLOW_TRACKING_URI`` / ``MLFLOW_EXPERIMENT_ID``; left in place, one test's store
    would leak into the next test and into the DVC stages its subprocesses run.
    """
    import importlib.util
    import os

    if importlib.util.find_spec("mlflow") is None:  # a GPU image without MLflow: nothing to undo
        return
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_REGISTRY_URI"):
        if name not in os.environ:
            monkeypatch.setenv(name, "")  # set, then delete: teardown removes what MLflow exports
            monkeypatch.delenv(name)
    monkeypatch.setattr("mlflow.tracking._tracking_service.utils._tracking_uri", None)
    monkeypatch.setattr("mlflow.tracking._model_registry.utils._registry_uri", None)
    monkeypatch.setattr("mlflow.tracking.fluent._active_experiment_id", None)


def _records_frame(n: int, seed: int, shift: float = 0.0, scanner: str = "Skyra") -> Any:
    """Records whose image features are N(shift, 1), whose acquisition parameters take three
    values (scaled by ``1 + shift``), and whose scanner is ``scanner``."""
    import numpy as np
    import pandas as pd

    from shiftguard.records.features import BY_NAME, FEATURE_NAMES

    rng = np.random.default_rng(seed)
    data: dict[str, Any] = {}
    for name in FEATURE_NAMES:
        f = BY_NAME[name]
        if f.kind == "numerical" and f.group == "metadata":  # protocol values: a few, discrete
            data[name] = rng.choice([1.0, 2.0, 3.0], n) * (1.0 + shift)
        elif f.kind == "numerical":
            data[name] = rng.normal(shift if f.group == "image" else 0.0, 1.0, n)
        elif name == "scanner_model":
            data[name] = [scanner] * n
        elif name == "manufacturer":
            data[name] = ["SIEMENS" if scanner == "Skyra" else "Canon"] * n
        elif name == "sex":
            data[name] = rng.choice(["F", "M"], n)
        else:
            data[name] = rng.choice(["40-49", "50-59", "60-69"], n)
    out = pd.DataFrame(data)
    out["site"] = "a"
    out["processed_at"] = "2026-11-01T00:00:00Z"
    return out


@pytest.fixture(scope="session")
def make_frame() -> Any:
    """:func:`_records_frame` (constructed monitor feature records), for tests to build records with."""
    return _records_frame
