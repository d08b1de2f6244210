"""MLflow glue: one run per stage invocation in the project's tracking store.

The default store is embedded in the project: a SQLite database ``mlflow.db`` and an artifact folder
``mlruns/`` at the repository root, so ``mlflow ui --backend-store-uri sqlite:///mlflow.db``
shows every run. ``MLFLOW_TRACKING_URI`` points it at a team server instead (a runtime setting, never
part of ``conf/``).

Run ids and registry version numbers differ from one store to the next, so no DVC output holds
them: a training run is tagged with the SHA-256 of the ``model.pt`` it wrote, and later stages find
it, and the model version registered from it, by that tag (:func:`trained_model`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EXPERIMENT = "shiftguard"
DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlruns"
#: the training run's tag holding the SHA-256 of the ``model.pt`` it wrote
MODEL_SHA256_TAG = "shiftguard.model_sha256"
#: the registered model version's tag holding the version of the edge bundle exported from it
BUNDLE_VERSION_TAG = "bundle_version"


#: embedded-store URIs this process handed to ``mlflow.set_tracking_uri``, which exports its argument
#: as ``$MLFLOW_TRACKING_URI``: such a value is ours, not a server the user chose
_EXPORTED: set[str] = set()


def embedded_uri(root: Path | None = None) -> str:
    """The embedded SQLite store ``mlflow.db`` under ``root`` (default: cwd)."""
    return f"sqlite:///{((root or Path.cwd()) / DEFAULT_DB).resolve()}"


def artifact_root(uri: str) -> str | None:
    """Where a new experiment's artifacts go: beside a SQLite store's file (``<folder>/mlruns``),
    whichever folder the command runs in; ``None`` (the server decides) for any other store.

    MLflow's own default for a SQLite store is ``./mlruns`` under the working directory, so runs
    started from different folders would scatter their artifacts.

    >>> artifact_root("sqlite:////srv/mlflow/mlflow.db")
    'file:///srv/mlflow/mlruns'
    >>> artifact_root("http://mlflow.example:5000") is None
    True
    """
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    database = Path(uri[len(prefix) :])
    return (database.resolve().parent / DEFAULT_ARTIFACTS).as_uri()


def tracking_uri(root: Path | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` when the user set it, else the embedded store under ``root``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env and env not in _EXPORTED:
        return env
    return embedded_uri(root)


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


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def data_version(root: Path | None = None, dvc_file: str = "data.dvc") -> str | None:
    """The md5 ``data.dvc`` records for the raw data (``None`` when there is no such file)."""
    import yaml

    path = (root or Path.cwd()) / dvc_file
    if not path.is_file():
        return None
    try:
        outs = yaml.safe_load(path.read_text()).get("outs") or []
    except (yaml.YAMLError, AttributeError):
        log.warning("%s is not a DVC file; the data version is not recorded", path)
        return None
    md5 = outs[0].get("md5") if outs and isinstance(outs[0], dict) else None
    return str(md5) if md5 else None


def provenance_tags(root: Path | None = None) -> dict[str, str]:
    """Tags tying a run to its code and data: git commit (and whether the tree was dirty), the DVC
    experiment name (``$DVC_EXP_NAME`` under ``dvc exp run``; ``workspace`` otherwise), its
    baseline, and the ``data.dvc`` hash."""
    root = root or Path.cwd()
    tags = {"shiftguard.dvc_exp": os.environ.get("DVC_EXP_NAME") or "workspace"}
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["shiftguard.dvc_exp_baseline"] = os.environ["DVC_EXP_BASELINE_REV"]
    commit = _git(root, "rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["shiftguard.git_commit"] = commit
        status = _git(root, "status", "--porcelain", "--untracked-files=no")
        tags["shiftguard.git_dirty"] = str(bool(status))
    data = data_version(root)
    if data:
        tags["shiftguard.data_dvc_md5"] = data
    return tags


class MetricLogger:
    """Collects metrics and sends each step's in one ``log_batch`` call, timing what logging costs.

    ``seconds`` is the wall time spent inside MLflow calls, for the logging-overhead figure.
    """

    def __init__(self, run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self.run_id = run_id
        self.client = MlflowClient()
        self.seconds = 0.0
        self.calls = 0

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log ``metrics`` (non-finite values are skipped: MLflow stores no NaN) in one call."""
        import math

        from mlflow.entities import Metric

        began = time.perf_counter()
        stamp = int(time.time() * 1000)
        batch = [
            Metric(key=k, value=float(v), timestamp=stamp, step=step or 0)
            for k, v in metrics.items()
            if v is not None and math.isfinite(float(v))
        ]
        for start in range(0, len(batch), 1000):  # the server's per-call limit
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])
        self.calls += 1
        self.seconds += time.perf_counter() - began


def run_name(what: str) -> str:
    """A run's name: ``what`` (``"train artifact seed 0"``), with the DVC experiment it ran in
    (``$DVC_EXP_NAME`` under ``dvc exp run``) in brackets, so repeated runs do not look alike:
    ``train artifact seed 0 [lusty-kiln]``."""
    experiment = os.environ.get("DVC_EXP_NAME")
    return f"{what} [{experiment}]" if experiment else what


@contextmanager
def stage_run(
    stage: str,
    params: Mapping[str, Any],
    root: Path | None = None,
    experiment: str = EXPERIMENT,
    tags: Mapping[str, str] | None = None,
    name: str | None = None,
) -> Iterator[Any]:
    """Open an MLflow run for one invocation of ``stage`` with ``params`` logged, and yield it.

    Params are logged in batches (MLflow accepts 100 per call), the stage name as the
    ``shiftguard.stage`` tag, with :func:`provenance_tags` and ``tags`` added. The run's name says
    what and which (:func:`run_name`): ``name`` (default: the stage), then the DVC experiment it
    ran in, if any.
    """
    import mlflow

    root = root or Path.cwd()
    uri = tracking_uri(root)
    embedded = uri == embedded_uri(root)
    mlflow.set_tracking_uri(uri)
    if embedded:
        _EXPORTED.add(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(experiment, artifact_location=artifact_root(uri))
    mlflow.set_experiment(experiment)
    all_tags = {"shiftguard.stage": stage, **provenance_tags(root), **dict(tags or {})}
    with mlflow.start_run(run_name=run_name(name or stage), tags=all_tags) as run:
        items = sorted(flatten(params).items())
        for start in range(0, len(items), 100):
            mlflow.log_params(dict(items[start : start + 100]))
        yield run
    log.info("%s: MLflow run %s in %s", stage, run.info.run_id, mlflow.get_tracking_uri())


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class TrainedModel:
    """The MLflow training run that wrote a model file, and the model version registered from it
    (``None`` when the run registered none)."""

    run_id: str
    registered_model: str | None = None
    version: str | None = None


def trained_model(
    model_file: Path, root: Path | None = None, experiment: str = EXPERIMENT
) -> TrainedModel | None:
    """The latest training run in the tracking store (:func:`tracking_uri`) tagged with
    ``model_file``'s SHA-256 (:data:`MODEL_SHA256_TAG`), and the newest model version registered
    from it; ``None`` when no run there wrote these bytes (trained untracked, or another store).

    >>> trained_model(Path("no-such-model.pt")) is None
    True
    """
    if not Path(model_file).is_file():
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(root))
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id],
        f"tags.`{MODEL_SHA256_TAG}` = '{file_sha256(model_file)}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    run_id = str(runs[0].info.run_id)
    versions = client.search_model_versions(f"run_id = '{run_id}'")
    if not versions:
        return TrainedModel(run_id)
    newest = max(versions, key=lambda v: int(v.version))
    return TrainedModel(run_id, str(newest.name), str(newest.version))
