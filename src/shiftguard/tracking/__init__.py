"""MLflow glue: one run per stage invocation in the project's tracking store.

The default store is embedded in the project: a SQLite database ``mlflow.db`` and an artifact folder
``mlruns/`` at the repository root, so ``mlflow ui --backend-store-uri sqlite:///mlflow.db``
shows every run. ``MLFLOW_TRACKING_URI`` points it at a team server instead (a runtime setting, never
part of ``conf/``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EXPERIMENT = "shiftguard"
DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlruns"


def tracking_uri(root: Path | None = None) -> str:
    """``$MLFLOW_TRACKING_URI``, else the embedded SQLite store under ``root`` (default: cwd)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{((root or Path.cwd()) / DEFAULT_DB).resolve()}"


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"a.b.c": "value"}`` for MLflow params (values as strings).

    >>> flatten({"augment": {"severity": [1, 4], "robustness": {"seed": 3}}})
    {'augment.severity': '[1, 4]', 'augment.robustness.seed': '3'}
    """
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


@contextmanager
def stage_run(
    stage: str,
    params: Mapping[str, Any],
    root: Path | None = None,
    experiment: str = EXPERIMENT,
) -> Iterator[Any]:
    """Open an MLflow run for one invocation of ``stage`` with ``params`` logged, and yield it.

    Params are logged in batches (MLflow accepts 100 per call), the stage name as the run name and
    as the ``shiftguard.stage`` tag.
    """
    import mlflow

    root = root or Path.cwd()
    mlflow.set_tracking_uri(tracking_uri(root))
    if mlflow.get_experiment_by_name(experiment) is None:
        artifacts = None
        if "MLFLOW_TRACKING_URI" not in os.environ:
            artifacts = (root / DEFAULT_ARTIFACTS).resolve().as_uri()
        mlflow.create_experiment(experiment, artifact_location=artifacts)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=stage, tags={"shiftguard.stage": stage}) as run:
        items = sorted(flatten(params).items())
        for start in range(0, len(items), 100):
            mlflow.log_params(dict(items[start : start + 100]))
        yield run
    log.info("%s: MLflow run %s in %s", stage, run.info.run_id, mlflow.get_tracking_uri())
