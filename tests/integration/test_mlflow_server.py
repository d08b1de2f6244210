"""The team tracking set-up, not only the embedded SQLite store: with ``MLFLOW_TRACKING_URI`` pointing at
an ``mlflow server`` backed by PostgreSQL, a stage's run, params, metrics and artifacts reach the
server, the database and the artifact store."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from shiftguard.tracking import EXPERIMENT, stage_run

if TYPE_CHECKING:
    from .conftest import MlflowServer

pytestmark = pytest.mark.integration

PARAMS = {"augment": {"severity": [1, 4], "robustness": {"seed": 3, "scanners": ["ge", "siemens"]}}}
FLAT = {
    "augment.severity": "[1, 4]",
    "augment.robustness.seed": "3",
    "augment.robustness.scanners": "['ge', 'siemens']",
}


@pytest.fixture
def team_tracking(mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch) -> MlflowServer:
    """Point MLflow at the server for one test (tests/conftest.py undoes MLflow's globals after)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # a broken server fails fast
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    return mlflow_server


def test_stage_run_reaches_postgres_backed_server(
    team_tracking: MlflowServer, tmp_path: Path
) -> None:
    report = tmp_path / "report.txt"
    report.write_text("severity 1..4: dice 0.91\n")

    with stage_run("augment", PARAMS, root=tmp_path) as run:
        mlflow.log_metric("dice_drop", 0.05)
        mlflow.log_artifact(str(report))
    run_id = run.info.run_id
    assert mlflow.get_tracking_uri() == team_tracking.url
    # The team server is the only store: nothing embedded was created under root.
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "mlruns").exists()

    client = MlflowClient(tracking_uri=team_tracking.url)
    stored = client.get_run(run_id)
    experiment = client.get_experiment(stored.info.experiment_id)
    assert experiment.name == EXPERIMENT
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # proxied by the server
    assert stored.info.status == "FINISHED"
    assert stored.info.run_name == "augment"
    assert stored.data.tags["shiftguard.stage"] == "augment"
    assert stored.data.params == FLAT
    assert stored.data.metrics == {"dice_drop": 0.05}
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.yaml", "report.txt"]
    downloaded = Path(client.download_artifacts(run_id, "report.txt", str(tmp_path / "dl")))
    assert downloaded.read_text() == report.read_text()
    # Proxied uploads land in the server's --artifacts-destination.
    on_disk = list(team_tracking.artifacts.rglob("report.txt"))
    assert len(on_disk) == 1
    assert run_id in on_disk[0].parts

    # And PostgreSQL, not some fallback store, holds the run.
    with team_tracking.postgres.connect("mlflow", connect_timeout=5) as conn, conn.cursor() as cur:
        cur.execute("SELECT run_uuid, name, status FROM runs")
        assert cur.fetchall() == [(run_id, "augment", "FINISHED")]
        cur.execute("SELECT key, value FROM params WHERE run_uuid = %s", (run_id,))
        assert dict(cur.fetchall()) == FLAT
        cur.execute("SELECT key, value FROM latest_metrics WHERE run_uuid = %s", (run_id,))
        assert cur.fetchall() == [("dice_drop", 0.05)]
    conn.close()
