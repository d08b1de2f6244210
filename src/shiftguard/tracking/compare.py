"""Read experiment results back from MLflow: one row per validated model, for side-by-side comparison.

The notebooks and the README's experiment table use these, so what they show is what the tracking
store holds (the embedded one or a team server), not files on one machine.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import pandas as pd

from shiftguard.tracking import EXPERIMENT

log = logging.getLogger(__name__)

#: metric keys of the validate run -> column names of :func:`validation_table`
COLUMNS = {
    "test.auroc.value": "test_auroc",
    "test.auroc.low": "test_auroc_low",
    "test.auroc.high": "test_auroc_high",
    "external.auroc.value": "external_auroc",
    "external.auroc.low": "external_auroc_low",
    "external.auroc.high": "external_auroc_high",
    "test.sensitivity.value": "test_sensitivity",
    "test.specificity.value": "test_specificity",
    "test.ece.value": "test_ece",
    "robustness.auroc_drop_at_max_severity": "robustness_auroc_drop",
}


def validation_table(client: Any, experiment: str = EXPERIMENT) -> pd.DataFrame:
    """One row per ``validate`` run, newest first, joined with its training run.

    Args:
        client: an ``mlflow.tracking.MlflowClient`` on the store to read.
        experiment: the MLflow experiment name.

    Returns:
        Columns ``validate_run_id, train_run_id, dvc_exp, augment, start_time`` and those of
        :data:`COLUMNS` (NaN where a run lacks a figure); empty when nothing was validated.
    """
    found = client.get_experiment_by_name(experiment)
    columns = [
        "validate_run_id",
        "train_run_id",
        "dvc_exp",
        "augment",
        "start_time",
        *COLUMNS.values(),
    ]
    if found is None:
        return pd.DataFrame(columns=columns)
    runs = client.search_runs(
        [found.experiment_id],
        "tags.`shiftguard.stage` = 'validate'",
        order_by=["attributes.start_time DESC"],
        max_results=1000,
    )
    rows = []
    for run in runs:
        train_id = run.data.tags.get("shiftguard.train_run_id")
        augment = None
        if train_id:
            try:
                augment = client.get_run(train_id).data.tags.get("shiftguard.augment")
            except Exception:  # the training run was deleted: keep the validation figures
                augment = None
        row: dict[str, Any] = {
            "validate_run_id": run.info.run_id,
            "train_run_id": train_id,
            "dvc_exp": run.data.tags.get("shiftguard.dvc_exp", "workspace"),
            "augment": {"True": True, "False": False}.get(str(augment)),
            "start_time": pd.Timestamp(run.info.start_time, unit="ms"),
        }
        for key, name in COLUMNS.items():
            row[name] = run.data.metrics.get(key, float("nan"))
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def latest_per_arm(table: pd.DataFrame) -> pd.DataFrame:
    """The newest validation of each arm (augmentation on / off), indexed by ``augment``."""
    known = table.dropna(subset=["augment"])
    return known.sort_values("start_time").groupby("augment").tail(1).set_index("augment")


def artifact_csv(client: Any, run_id: str, name: str) -> pd.DataFrame:
    """A CSV artifact of a run (e.g. ``roc.csv``, ``robustness.csv``) as a frame."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, name, tmp)
        return pd.read_csv(io.StringIO(Path(path).read_text()))


def experiment_table(client: Any, experiment: str = EXPERIMENT) -> tuple[str, str] | None:
    """The newest augmentation experiment report in the store: ``(run id, its table.md)``, or
    ``None`` when no ``experiment`` run has one."""
    import tempfile
    from pathlib import Path

    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id],
        "tags.`shiftguard.stage` = 'experiment'",
        order_by=["attributes.start_time DESC"],
        max_results=20,
    )
    for run in runs:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = client.download_artifacts(run.info.run_id, "table.md", tmp)
            except (MlflowException, OSError) as exc:  # a run without the file: the next one
                log.debug("run %s has no table.md: %s", run.info.run_id, exc)
                continue
            return run.info.run_id, Path(path).read_text()
    return None
