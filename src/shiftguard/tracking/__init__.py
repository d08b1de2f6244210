"""MLflow glue: one run per stage invocation in the project's tracking store.

The default store is embedded in the project: a SQLite database ``mlflow.db`` and an artifact folder
``mlruns/`` at the repository root, so ``mlflow ui --backend-store-uri sqlite:///mlflow.db``
shows every run. ``MLFLOW_TRACKING_URI`` points it at a team server instead (a runtime setting, never
part of ``conf/``).

Run ids and registry version numbers differ from one store to the next, so no DVC output holds
them: a training run is tagged with the SHA-256 of the ``model.pt`` it wrote, and later stages find
it, and the model version registered from it, by that tag (:func:`trained_model`).

What a reviewer reads per model version, on its page in the registry: the model card as the
version's description, the validate and shadow runs it was judged in (:data:`VALIDATE_RUN_TAG`,
:data:`SHADOW_RUN_TAG`), the bundle (``runs:/`` URI), and the aliases :data:`CHALLENGER` and
:data:`CHAMPION`, the same two words the edge and the shadow report use for the bundles they run.

Params: each stage logs as MLflow params only what a reviewer compares between runs (its
``logged_params``); the full resolved config of every run is its ``config.yaml`` artifact
(:data:`CONFIG_ARTIFACT`).

The experiment is tagged as a model-training one (:data:`EXPERIMENT_KIND_TAG`). The UI of MLflow
3.17 opens in the mode its sidebar switch last chose (GenAI at first); a link with
``?workflowType=machine_learning`` (:func:`ui_url`) opens the model-training view.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
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
#: the model version's tags naming the runs that judged it; the runs carry :data:`MODEL_VERSION_TAG`
VALIDATE_RUN_TAG = "shiftguard.validate_run"
SHADOW_RUN_TAG = "shiftguard.shadow_run"
#: a run's tag naming the registered model version it trained, validated or shadow-evaluated
MODEL_VERSION_TAG = "shiftguard.model_version"
#: the registry's aliases, the words the edge service and the shadow report use for the bundles:
#: ``challenger`` is the newest trained version (run at the edge in shadow, beside the champion or
#: alone), ``champion`` the version the promotion gate last passed (what the edge serves)
CHALLENGER = "challenger"
CHAMPION = "champion"
#: the experiment tag MLflow's UI reads for the kind of experiment, and ours
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: the artifact holding a run's full resolved config (its params are a reviewer's selection)
CONFIG_ARTIFACT = "config.yaml"


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


def ui_url(server: str, path: str = "") -> str:
    """A link into MLflow's UI at ``server`` that opens in the model-training view.

    >>> ui_url("http://127.0.0.1:5000", "models/shiftguard-classifier/versions/3")
    'http://127.0.0.1:5000/#/models/shiftguard-classifier/versions/3?workflowType=machine_learning'
    """
    return f"{server.rstrip('/')}/#/{path.lstrip('/')}?workflowType=machine_learning"


def selected(flat: Mapping[str, str], keys: Sequence[str]) -> dict[str, str]:
    """The entries of a :func:`flatten`-ed config named by ``keys``, each a key or a section
    (``"train"`` selects every ``train.*``).

    >>> selected({"train.lr": "0.1", "train.seed": "0", "model.x": "1"}, ["train.lr", "model"])
    {'train.lr': '0.1', 'model.x': '1'}
    """
    return {
        k: v for k, v in flat.items() if any(k == key or k.startswith(f"{key}.") for key in keys)
    }


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


def data_version(root: Path | None = None, dvc_file: str | None = None) -> str | None:
    """The md5 the data source's ``.dvc`` file records for the raw data (``None`` when there is no
    such file). ``dvc_file`` defaults to ``params.yaml``'s ``data.dvc_file`` (``data.dvc`` for a
    project without a ``data`` section)."""
    import yaml

    root = root or Path.cwd()
    if dvc_file is None:
        try:
            params = yaml.safe_load((root / "params.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            params = {}
        source = params.get("data") if isinstance(params, dict) else None
        dvc_file = source.get("dvc_file") if isinstance(source, dict) else "data.dvc"
        if not dvc_file:
            return None
    path = root / dvc_file
    if not path.is_file():
        return None
    try:
        outs = yaml.safe_load(path.read_text()).get("outs") or []
    except (yaml.YAMLError, AttributeError):
        log.warning("%s is not a DVC file; the data version is not recorded", path)
        return None
    md5 = outs[0].get("md5") if outs and isinstance(outs[0], dict) else None
    return str(md5) if md5 else None


def provenance_tags(root: Path | None = None, dvc_file: str | None = None) -> dict[str, str]:
    """Tags tying a run to its code and data: git commit (and whether the tree was dirty), the DVC
    experiment name (``$DVC_EXP_NAME`` under ``dvc exp run``; ``workspace`` otherwise), its
    baseline, and the hash the data source's ``.dvc`` file records (``data.dvc_file``)."""
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
    data = data_version(root, dvc_file)
    if data:
        tags["shiftguard.data_dvc_md5"] = data
    return tags


class MetricLogger:
    """Collects metrics and sends each step's in one ``log_batch`` call, timing what logging costs.

    ``seconds`` is the wall time spent inside MLflow calls, for the logging-overhead figure.
    ``model_id`` links the metrics to that logged model as well (its page lists them).
    """

    def __init__(self, run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self.run_id = run_id
        self.client = MlflowClient()
        self.seconds = 0.0
        self.calls = 0

    def log(
        self, metrics: Mapping[str, float], step: int | None = None, model_id: str | None = None
    ) -> None:
        """Log ``metrics`` (non-finite values are skipped: MLflow stores no NaN) in one call."""
        import math

        from mlflow.entities import Metric

        began = time.perf_counter()
        stamp = int(time.time() * 1000)
        batch = [
            Metric(
                key=k,
                value=float(v),
                timestamp=stamp,
                step=step or 0,
                model_id=model_id,
                run_id=self.run_id if model_id else None,
            )
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


def set_store(uri: str) -> None:
    """Point this process's MLflow at ``uri``, leaving ``$MLFLOW_TRACKING_URI`` as it was.

    ``mlflow.set_tracking_uri`` also exports its argument as ``$MLFLOW_TRACKING_URI``, so every
    program started afterwards (``dvc repro``, a notebook's kernel, a test's subprocess) would take
    this store for the user's choice and log there.
    """
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def use_experiment(uri: str, experiment: str = EXPERIMENT) -> str:
    """Point MLflow at ``uri`` and ``experiment`` (created when missing, its artifacts beside a
    SQLite store: :func:`artifact_root`), tagged as a model-training experiment
    (:data:`EXPERIMENT_KIND_TAG`); returns the experiment's id."""
    import mlflow

    set_store(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        experiment_id = mlflow.create_experiment(
            experiment,
            artifact_location=artifact_root(uri),
            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
        )
    else:
        experiment_id = found.experiment_id
        if found.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            mlflow.MlflowClient().set_experiment_tag(
                experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
            )
    mlflow.set_experiment(experiment_id=experiment_id)
    return str(experiment_id)


@contextmanager
def stage_run(
    stage: str,
    params: Mapping[str, Any],
    root: Path | None = None,
    experiment: str = EXPERIMENT,
    tags: Mapping[str, str] | None = None,
    name: str | None = None,
    logged_params: Sequence[str] | None = None,
) -> Iterator[Any]:
    """Open an MLflow run for one invocation of ``stage`` and yield it.

    The full ``params`` go to the run's ``config.yaml`` artifact (:data:`CONFIG_ARTIFACT`); the
    run's MLflow params are those of them ``logged_params`` names (:func:`selected`; all when
    ``None``), so the runs list shows what a reviewer compares. The stage name is the
    ``shiftguard.stage`` tag, with :func:`provenance_tags` and ``tags`` added. The run's name says
    what and which (:func:`run_name`): ``name`` (default: the stage), then the DVC experiment it
    ran in, if any. The experiment is set up by :func:`use_experiment`.
    """
    import mlflow

    root = root or Path.cwd()
    uri = tracking_uri(root)
    if uri == embedded_uri(root):
        _EXPORTED.add(uri)
    use_experiment(uri, experiment)
    source = params.get("data") if isinstance(params, Mapping) else None
    source = source if isinstance(source, Mapping) else {}
    all_tags = {
        "shiftguard.stage": stage,
        **provenance_tags(root, source.get("dvc_file", "data.dvc") if source else None),
        **({"shiftguard.data_source": str(source["name"])} if source.get("name") else {}),
        **dict(tags or {}),
    }
    flat = flatten(params)
    chosen = flat if logged_params is None else selected(flat, logged_params)
    if source and not source.get("synthetic", True):
        # a site's own data: the generator's settings describe nothing it trained on
        chosen = {k: v for k, v in chosen.items() if not k.startswith("cohort.")}
    with mlflow.start_run(run_name=run_name(name or stage), tags=all_tags) as run:
        items = sorted(chosen.items())
        for start in range(0, len(items), 100):
            mlflow.log_params(dict(items[start : start + 100]))
        if params:
            mlflow.log_dict(_plain(params), CONFIG_ARTIFACT)
        yield run
    log.info("%s: MLflow run %s in %s", stage, run.info.run_id, mlflow.get_tracking_uri())


def _plain(value: Any) -> Any:
    """``value`` with mappings and sequences as plain dicts and lists (for a YAML artifact)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


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
    model_id: str | None = None  # the logged model (MLflow 3's ``models:/m-...``)


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
    outputs = runs[0].outputs.model_outputs if runs[0].outputs else []
    model_id = str(outputs[-1].model_id) if outputs else None
    versions = client.search_model_versions(f"run_id = '{run_id}'")
    if not versions:
        return TrainedModel(run_id, model_id=model_id)
    newest = max(versions, key=lambda v: int(v.version))
    return TrainedModel(run_id, str(newest.name), str(newest.version), model_id)


def bundle_model_version(client: Any, name: str, bundle_version: str) -> str | None:
    """The registry's version number of ``name`` an edge bundle of version ``bundle_version`` was
    exported from: the newest one the export stage tagged :data:`BUNDLE_VERSION_TAG` with it;
    ``None`` when none is."""
    if not (name and bundle_version):
        return None
    tagged = client.search_model_versions(
        f"name = '{name}' and tags.`{BUNDLE_VERSION_TAG}` = '{bundle_version}'"
    )
    return str(max(int(v.version) for v in tagged)) if tagged else None


def link_run(client: Any, name: str, version: str, run_id: str, version_tag: str) -> None:
    """Tag model version ``name`` ``version`` with ``run_id`` under ``version_tag``, and the run
    with the version (:data:`MODEL_VERSION_TAG`, ``name/version``)."""
    client.set_model_version_tag(name, version, version_tag, run_id)
    client.set_tag(run_id, MODEL_VERSION_TAG, f"{name}/{version}")
