"""One review page per model version: the stages' own code (train, validate, export, shadow,
promote) on a tiny cohort, tracked in a temporary SQLite store, leave the registered version with
its model card as description, the runs that judged it as tags, the metrics of its saved weights
on its logged model, a bundle URI any machine can resolve, and the aliases the shadow report uses;
an ``mlflow server`` on that store serves the same through its REST API."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from shiftguard.config import compose_section
from shiftguard.config.deploy import ExportConfig
from shiftguard.config.schema import (
    AugmentConfig,
    EvaluateConfig,
    IngestConfig,
    ModelConfig,
    TrainConfig,
)
from shiftguard.config.shadow import GateConfig, ShadowConfig

pytestmark = pytest.mark.integration

SHAPE = (16, 20, 16)
NAME = "shiftguard-classifier"


def _volume(path: Path, blob: bool, rng: np.random.Generator) -> None:
    x, y, z = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    head = ((x - 8) ** 2 / 40 + (y - 10) ** 2 / 60 + (z - 8) ** 2 / 40) < 1
    spot = ((x - 6) ** 2 + (y - 11) ** 2 + (z - 8) ** 2) < 5
    data = head * (1 + 0.05 * rng.standard_normal(SHAPE)) + blob * 1.5 * spot
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image((800 * data).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])).to_filename(
        path
    )


def _cohort(root: Path) -> Path:
    """Volumes under ``root/ingest`` and their split table; returns the table's path."""
    rng = np.random.default_rng(0)
    rows = []
    for split, n in (("train", 12), ("val", 8), ("test", 12), ("external", 8)):
        for i in range(n):
            key = f"{split}{i:02d}"
            finding = i % 2
            _volume(root / "ingest/volumes" / f"{key}.nii", bool(finding), rng)
            rows.append(
                {"series_key": key, "series_uid": f"1.2.3.{len(rows)}",
                 "volume_path": f"volumes/{key}.nii", "finding": str(finding), "split": split,
                 "patient_sex": "FM"[i % 2], "patient_age": str(30 + 7 * i),
                 "site": f"site{i % 2}", "manufacturer": "Siemens", "scanner_model": "Skyra"}
            )  # fmt: skip
    pd.DataFrame(rows).to_csv(root / "dataset.csv", index=False)
    return root / "dataset.csv"


def _shadow_inputs(root: Path, bundle_version: str) -> tuple[Path, Path]:
    """An ``edge predict`` results table of the bundle, run alone in shadow mode on 160 studies,
    and the verified diagnoses of those studies."""
    rng = np.random.default_rng(1)
    n = 160
    finding = rng.random(n) < 0.4
    probability = 1 / (1 + np.exp(-(2.5 * finding - 1.2 + rng.standard_normal(n))))
    uids = [f"1.2.826.0.9.{i}" for i in range(n)]
    pd.DataFrame(
        {"study_uid": uids, "series_uid": [f"{u}.1" for u in uids], "probability": probability,
         "threshold": 0.5, "shadow": 1, "model": NAME, "model_version": bundle_version,
         "sex": rng.choice(["F", "M"], n), "age_band": rng.choice(["40-59", "60-74"], n),
         "manufacturer": "Canon", "scanner_model": "Orian", "institution": "Lakeshore"}
    ).to_csv(root / "results.csv", index=False)  # fmt: skip
    pd.DataFrame(
        {"study_uid": uids, "finding": finding.astype(int), "reader": "dr",
         "report_date": "20260101"}
    ).to_csv(root / "diagnoses.csv", index=False)  # fmt: skip
    return root / "results.csv", root / "diagnoses.csv"


@pytest.fixture(scope="module")
def review(tmp_path_factory: pytest.TempPathFactory, conf_dir: Path) -> dict[str, Any]:
    """Every stage once, in order, on the tiny cohort; what the registry said at each moment."""
    from mlflow.tracking import MlflowClient

    from shiftguard.evaluation import validate
    from shiftguard.export import run as export
    from shiftguard.shadow.promote import promote
    from shiftguard.shadow.stage import evaluate_files
    from shiftguard.tracking import embedded_uri, set_store
    from shiftguard.training.stage import run as train
    from shiftguard.utils import write_json

    root = tmp_path_factory.mktemp("review")
    dataset = _cohort(root)
    client = MlflowClient(embedded_uri(root))
    moments: dict[str, Any] = {}
    with pytest.MonkeyPatch.context() as mp:
        # set here (not deleted): leaving the context removes it again, also what MLflow exported
        mp.setenv("MLFLOW_TRACKING_URI", embedded_uri(root))
        mp.delenv("DVC_EXP_NAME", raising=False)
        # the drift reference runs the edge runner on DICOM files; this cohort has none
        mp.setattr(
            "shiftguard.export.stage.monitor_reference",
            lambda bundle, dicom, splits, trust=None, uid_of=str, findings=None: (
                b"mean,split\n1.0,train\n",
                b"{}",
                1,
            ),
        )
        augment = compose_section("augment", AugmentConfig, ["augment.enabled=false"], conf_dir)
        model = ModelConfig(
            network={"_target_": "shiftguard.models.SmallCNN3d", "channels": [4, 8]}
        )
        train_cfg = TrainConfig(seed=0, epochs=3, batch_size=4, num_workers=0, keep="last")
        evaluate_cfg = EvaluateConfig(n_bootstrap=100, min_segment_size=4)
        config = {
            "train": train_cfg.model_dump(mode="json"),
            "model": model.model_dump(mode="json"),
            "augment": augment.model_dump(mode="json"),
            "evaluate": evaluate_cfg.model_dump(mode="json"),
        }
        trained = train(
            train_cfg, model, augment, dataset, root / "ingest", root / "train",
            params=config, root=root,
        )  # fmt: skip
        moments["after train"] = client.get_registered_model(NAME).aliases
        reports = root / "reports"
        result = validate.run(
            evaluate_cfg, root / "train/model.pt", dataset, root / "ingest", None, reports,
            params=config, root=root,
        )  # fmt: skip
        write_json(reports / "metrics.json", result.to_metrics())
        exported = export(
            ExportConfig(torchscript=False), IngestConfig(shape=SHAPE), root / "train/model.pt",
            dataset, root / "ingest", reports, root / "export", root=root, parity_series=2,
        )  # fmt: skip
        results, diagnoses = _shadow_inputs(root, exported.version)
        shadow_cfg = ShadowConfig(n_boot=100, min_n=10)
        evaluate_files(
            results, shadow_cfg, [diagnoses], bundles=[exported.bundle], out=root / "shadow",
            root=root,
        )  # fmt: skip
        moments["shadow report"] = json.loads((root / "shadow/summary.json").read_text())
        moments["before promote"] = client.get_registered_model(NAME).aliases
        decision = promote(
            root / "shadow", GateConfig(min_studies=50, max_flagged_segments=99), root=root
        )
        moments["after promote"] = client.get_registered_model(NAME).aliases
        set_store(embedded_uri(root))
    return {
        "root": root,
        "client": client,
        "trained": trained,
        "exported": exported,
        "decision": decision,
        "moments": moments,
    }


def test_the_version_reads_as_its_review_page(review: dict[str, Any]) -> None:
    from shiftguard.edge.bundle import open_bundle
    from shiftguard.tracking import (
        EXPERIMENT,
        EXPERIMENT_KIND,
        EXPERIMENT_KIND_TAG,
        MODEL_VERSION_TAG,
        SHADOW_RUN_TAG,
        VALIDATE_RUN_TAG,
    )

    client, trained = review["client"], review["trained"]
    version = client.get_model_version(NAME, trained.version)
    # the description is the model card the bundle carries
    card = open_bundle(Path(review["exported"].bundle)).text("model_card.md")
    assert version.description == card and card.startswith("# Model card")
    # the runs that judged it, both ways
    validate_run = client.get_run(version.tags[VALIDATE_RUN_TAG])
    shadow_run = client.get_run(version.tags[SHADOW_RUN_TAG])
    assert validate_run.data.tags["shiftguard.stage"] == "validate"
    assert shadow_run.data.tags["shiftguard.stage"] == "shadow"
    for run in (validate_run, shadow_run, client.get_run(trained.run_id)):
        assert run.data.tags[MODEL_VERSION_TAG] == f"{NAME}/{trained.version}"
    assert validate_run.info.run_name == f"validate v{trained.version}"
    assert shadow_run.info.run_name == f"shadow challenger v{trained.version}"
    assert client.get_run(trained.run_id).info.run_name == f"train v{trained.version} none seed 0"
    # the bundle: a URI the registry's store serves, not a path on the machine that exported it
    uri = version.tags["bundle_uri"]
    assert uri.startswith(f"runs:/{trained.run_id}/") and str(review["root"]) not in uri
    # a model-training experiment
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_the_logged_model_holds_the_saved_weights_figures(review: dict[str, Any]) -> None:
    """``keep: last``: the weights are the last epoch's, so are the model's training metrics;
    the validation's headline figures join them."""
    client, trained = review["client"], review["trained"]
    model_id = client.get_run(trained.run_id).outputs.model_outputs[0].model_id
    metrics = {m.key: m for m in client.get_logged_model(model_id).metrics or []}
    last = trained.fit.history[-1]
    assert metrics["train_loss"].step == last.epoch == 2
    assert metrics["train_loss"].value == pytest.approx(last.train_loss)
    assert metrics["val_auroc"].value == pytest.approx(last.val_auroc)
    assert metrics["epochs_run"].value == 3
    validate_run = client.get_run(client.get_model_version(NAME, trained.version).tags[
        "shiftguard.validate_run"])  # fmt: skip
    assert metrics["validate.test_auroc"].value == pytest.approx(
        validate_run.data.metrics["test.auroc.value"]
    )


def test_the_aliases_say_what_the_shadow_report_says(review: dict[str, Any]) -> None:
    """Trained: the challenger. The edge ran it alone in shadow mode: the report's challenger.
    Passed the gate: the champion, and no longer the challenger."""
    version = review["trained"].version
    moments = review["moments"]
    assert {k: str(v) for k, v in moments["after train"].items()} == {"challenger": version}
    roles = moments["shadow report"]["roles"]
    assert list(roles) == ["challenger"]
    assert roles["challenger"]["model_version"] == review["exported"].version
    assert {k: str(v) for k, v in moments["before promote"].items()} == {"challenger": version}
    assert review["decision"].promoted and review["decision"].challenger == version
    assert {k: str(v) for k, v in moments["after promote"].items()} == {"champion": version}


def test_the_tables_and_the_card_are_artifacts_mlflow_previews(review: dict[str, Any]) -> None:
    """Markdown, CSV with its header on the first line, PNG and HTML: what the UI shows inline."""
    client, trained = review["client"], review["trained"]
    version = client.get_model_version(NAME, trained.version)
    dl = review["root"] / "downloads"
    card = client.download_artifacts(trained.run_id, "model_card.md", str(dl / "t"))
    assert Path(card).read_text() == version.description
    validate_id = version.tags["shiftguard.validate_run"]
    names = {a.path for a in client.list_artifacts(validate_id)}
    assert {"segments.csv", "roc.png", "config.yaml"} <= names
    segments = client.download_artifacts(validate_id, "segments.csv", str(dl / "v"))
    assert Path(segments).read_text().splitlines()[0].startswith("column,segment,n,")
    shadow_id = version.tags["shiftguard.shadow_run"]
    shadow = {a.path for a in client.list_artifacts(shadow_id, "shadow")}
    assert {"shadow/report.html", "shadow/segments.csv"} <= shadow
    segments = client.download_artifacts(shadow_id, "shadow/segments.csv", str(dl / "s"))
    assert Path(segments).read_text().splitlines()[0].startswith("role,column,segment,n,")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_server_serves_the_review_page(review: dict[str, Any]) -> None:
    """``mlflow server`` on the same store: the version, with its description, tags and aliases,
    through the REST API the UI reads."""
    root, version = review["root"], review["trained"].version
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
         f"sqlite:///{root / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(1)
        query = urllib.parse.urlencode({"name": NAME, "version": version})
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/model-versions/get?{query}") as r:
            served = json.load(r)["model_version"]
    finally:
        server.terminate()
        server.wait(30)
    assert served["description"].startswith("# Model card")
    tags = {t["key"]: t["value"] for t in served["tags"]}
    assert {"shiftguard.validate_run", "shiftguard.shadow_run", "bundle_uri"} <= tags.keys()
    assert served["aliases"] == ["champion"]
