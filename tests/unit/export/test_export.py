from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from torch import nn

from shiftguard.calibration import Calibration
from shiftguard.config import ExportConfig, IngestConfig, ModelConfig, TrainConfig
from shiftguard.data.volume import write_nifti
from shiftguard.edge.infer import Model
from shiftguard.export.stage import (
    ExportError,
    check_parity,
    export_onnx,
    export_torchscript,
    model_card,
    onnx_logits,
    preprocessing_spec,
    reference_table,
    run,
)
from shiftguard.models import SmallCNN3d
from shiftguard.training.stage import save_model
from shiftguard.utils import write_json

SHAPE = (16, 20, 16)


def net() -> SmallCNN3d:
    torch.manual_seed(0)
    return SmallCNN3d(channels=(4, 8), local_contrast=3, pooling="meanmax").eval()


def test_onnx_has_logit_activation_map_and_embedding_matching_torch_in_eval_mode() -> None:
    model = net()
    x = torch.rand(3, 1, *SHAPE)
    data = export_onnx(model, x[:1])
    assert not model.training  # the exporter must not switch batch norm back to training
    graph = onnx.load_model_from_string(data).graph
    assert [o.name for o in graph.output] == ["logit", "saliency", "embedding"]
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    logit, cam, emb = session.run(None, {"image": x.numpy()})  # batch 3, graph traced on 1
    with torch.no_grad():
        np.testing.assert_allclose(logit, model(x).numpy(), atol=1e-5)
        np.testing.assert_allclose(cam, model.activation_map(x).numpy(), atol=1e-4)
        # the embedding is what the head sees: the head applied to it gives the logit
        np.testing.assert_allclose(model.head(torch.from_numpy(emb)).numpy(), logit, atol=1e-4)
    assert emb.shape[0] == 3 and emb.shape[1] == model.head.in_features


def test_network_without_activation_map_exports_the_logit_and_embedding() -> None:
    plain = nn.Sequential(
        nn.Conv3d(1, 2, 3), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(2, 1)
    )
    data = export_onnx(plain.eval(), torch.zeros(1, 1, *SHAPE))
    names = [o.name for o in onnx.load_model_from_string(data).graph.output]
    assert names == ["logit", "embedding"]


def test_torchscript_round_trip_without_debug_info_or_paths() -> None:
    """The archive holds no ``*.debug_pkl`` (source ranges with each traced module's absolute
    path: a checkout elsewhere gave another bundle) and predicts exactly what the traced module
    with its debug information does."""
    import zipfile

    import shiftguard

    model = net()
    x = torch.rand(2, 1, *SHAPE)
    data = export_torchscript(model, x[:1])
    assert data is not None
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = zf.namelist()
        blob = b"".join(zf.read(n) for n in names)
    assert not [n for n in names if n.endswith(".debug_pkl")]
    assert any(n.endswith("small_cnn.py") for n in names)  # the code itself is kept
    package = str(Path(shiftguard.__file__).resolve().parent)
    assert package.encode() not in blob
    loaded = torch.jit.load(io.BytesIO(data))
    with torch.no_grad():
        traced = torch.jit.trace(model, x[:1])
        assert torch.equal(loaded(x), traced(x))
        assert torch.allclose(loaded(x), model(x), atol=1e-6)


def _volumes(tmp_path: Path, n: int = 3) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        paths.append(tmp_path / f"v{i}.nii")
        write_nifti(paths[-1], rng.gamma(2.0, 100.0, (24, 28, 24)).astype(np.float32), np.eye(4))
    return paths


def test_parity_passes_on_a_faithful_export_and_fails_with_the_figure(tmp_path: Path) -> None:
    model = net()
    train = TrainConfig(input_shape=SHAPE)
    spec = preprocessing_spec(IngestConfig(shape=(24, 28, 24)), train, SHAPE)
    paths = _volumes(tmp_path)
    data = export_onnx(model, torch.zeros(1, 1, *SHAPE))
    onnx_diff, prep_diff = check_parity(model, data, paths, train, spec, 1e-4)
    assert onnx_diff < 1e-5 and prep_diff < 1e-5
    other = SmallCNN3d(channels=(4, 8), local_contrast=3, pooling="meanmax").eval()  # new weights
    unfaithful = export_onnx(other, torch.zeros(1, 1, *SHAPE))
    with pytest.raises(ExportError, match=r"differ from PyTorch's by .* on 3 validation series"):
        check_parity(model, unfaithful, paths, train, spec, 1e-4)
    wrong = {**spec, "intensity_percentiles": [5.0, 95.0]}
    with pytest.raises(ExportError, match="edge preprocessing differs from training"):
        check_parity(model, data, paths, train, wrong, 1e-4)


def test_reference_table_has_the_monitor_features_and_nothing_else() -> None:
    from shiftguard.records.features import FEATURE_NAMES

    records = [
        {
            "patient_id": "SG1",
            "series_uid": "1.2",
            "mean": 1.0,
            "manufacturer": "GE",
            "split": "train",
        },
        {
            "patient_id": "SG2",
            "series_uid": "1.3",
            "mean": 2.0,
            "probability": 0.75,
            "split": "val",
            "finding": 1,
        },
    ]
    table = pd.read_csv(io.BytesIO(reference_table(records)))
    assert tuple(table.columns) == (*FEATURE_NAMES, "split", "finding", "raw_probability")
    assert table["finding"].isna().tolist() == [True, False] and table["finding"][1] == 1
    assert table["split"].tolist() == ["train", "val"]
    assert table["mean"].tolist() == [1.0, 2.0]
    assert table["manufacturer"].tolist() == ["GE", "unknown"]
    assert "patient_id" not in table and "series_uid" not in table


def test_model_card_quotes_the_validation_tables() -> None:
    rows = pd.DataFrame(
        {
            "split": ["train", "train", "test"],
            "finding": [0, 1, 1],
            "scanner_model": ["A", "B", "A"],
        }
    )
    metrics = {
        "threshold": 0.42,
        "test": {"n": 25, "auroc": {"value": 0.9, "low": 0.8, "high": 0.97}},
        "external": {"n": 18, "auroc": {"value": 0.85, "low": 0.7, "high": 0.95}},
        "external_scanners": {
            "SIGNA Premier": {"n": 5, "n_positive": 0, "auroc": {"value": None}, "reason": "one"},
            "Vantage Orian": {
                "n": 13,
                "n_positive": 6,
                "auroc": {"value": 0.88, "low": 0.75, "high": 0.96},
                "sensitivity": {"value": 0.5, "low": 0.25, "high": 0.75},
                "reason": "",
            },
        },
    }
    segments = pd.DataFrame(
        [
            {
                "column": "patient_sex",
                "segment": "F",
                "n": 12,
                "n_positive": 4,
                "auroc": 0.8,
                "auroc_gap": -0.1,
                "judgeable": True,
            }
        ]
    )
    robustness = pd.DataFrame(
        [{"profile": "low_field", "severity": s, "auroc": 0.9 - 0.1 * s} for s in range(3)]
    )
    card = model_card(
        ExportConfig(),
        "m",
        "3",
        TrainConfig(),
        {"network": {"_target_": "x.Net"}},
        rows,
        metrics,
        segments,
        robustness,
    )
    assert card.startswith("# Model card: m v3") and "0.4200" in card
    assert "AUROC 0.900 (0.800–0.970)" in card
    assert "- external (n=18): AUROC 0.850 (0.700–0.950)" in card
    assert "  - Vantage Orian (n=13, 6 with the finding): AUROC 0.880 (0.750–0.960), " in card
    assert "sensitivity 0.500 (0.250–0.750)" in card
    assert "  - SIGNA Premier (n=5, 0 with the finding): AUROC n/a (one)" in card
    assert "| patient_sex | F | 12 | 4 | 0.800 | -0.100 | yes |" in card
    assert "| low_field | n/a | 0.900 | 0.800 | 0.700 |" in card
    assert "train: 2 series, 1 with the finding" in card and "Known limitations" in card


def test_model_card_names_the_unseen_scanners_and_says_when_an_interval_collapsed() -> None:
    robustness = pd.DataFrame(
        [
            *[
                {"profile": p, "severity": s, "n": 24, "n_positive": 10, "auroc": a,
                 "auroc_low": a - 0.1 if a < 1 else 1.0, "auroc_high": min(a + 0.1, 1.0),
                 "seen_in_training": p == "low_field"}
                for p, a in (("low_field", 0.8), ("rf_spike", 1.0))
                for s in (0, 1, 2)
            ],
            {"profile": "external", "severity": -1, "n": 38, "n_positive": 14, "auroc": 0.7,
             "auroc_low": 0.55, "auroc_high": 0.84, "seen_in_training": False},
            {"profile": "external:MAGNETOM Free.Max", "severity": -1, "n": 19, "n_positive": 4,
             "auroc": 1.0, "auroc_low": 1.0, "auroc_high": 1.0, "seen_in_training": False},
        ]
    )  # fmt: skip
    metrics = {
        "threshold": 0.5,
        "test": {
            "n": 25,
            "n_positive": 10,
            "auroc": {"value": 1.0, "low": 1.0, "high": 1.0},
            "sensitivity": {"value": 0.9, "low": 0.7, "high": 1.0},
        },
    }
    card = model_card(
        ExportConfig(), "m", "3", TrainConfig(), {}, pd.DataFrame(), metrics, pd.DataFrame(),
        robustness,
    )  # fmt: skip
    robustness_part = card.split("## Robustness", 1)[1].split("## Known limitations", 1)[0]
    # no severity -1 column: the simulated profiles by severity, the real scanners by name
    assert "-1" not in robustness_part
    header = next(line for line in robustness_part.splitlines() if line.startswith("| profile"))
    assert header.count("severity") == 3 and "severity 0" in header
    assert "| rf_spike | no (held out) |" in robustness_part
    assert "| low_field | yes | 0.800 (0.700–0.900) |" in robustness_part
    assert "| all unseen scanners (pooled) | 38 | 14 | 0.700 (0.550–0.840) |" in robustness_part
    scanner = next(line for line in robustness_part.splitlines() if "Free.Max" in line)
    assert "interval collapsed" in scanner and "n=19, positives=4" in scanner
    # a collapsed interval is never printed as one, anywhere in the card
    assert "1.000 (1.000–1.000)" not in card and "(1.000-1.000)" not in card
    assert "AUROC 1.000 (interval collapsed: every bootstrap resample scored 1.000; n=25, " in card
    assert "sensitivity 0.900 (0.700–1.000)" in card


def test_run_without_validation_reports_says_which_stage_to_run(tmp_path: Path) -> None:
    model_file = save_model(
        tmp_path / "model.pt",
        net(),
        ModelConfig(
            network={
                "_target_": "shiftguard.models.SmallCNN3d",
                "channels": [4, 8],
                "local_contrast": 3,
                "pooling": "meanmax",
            }
        ),
        TrainConfig(),
        (2.0, 2.0, 2.0),
        (24, 28, 24),
    )
    with pytest.raises(
        ExportError,
        match=r"lacks metrics.json, segments.csv, robustness.csv, calibration.json; run the validate",
    ):
        run(
            ExportConfig(),
            IngestConfig(),
            model_file,
            tmp_path / "dataset.csv",
            tmp_path,
            tmp_path / "reports",
            tmp_path / "out",
            track=False,
        )


def test_onnx_logits_helper_and_edge_model_agree(tmp_path: Path) -> None:
    from shiftguard.edge.bundle import open_bundle, write_bundle

    model = net()
    data = export_onnx(model, torch.zeros(1, 1, *SHAPE))
    manifest = {
        "name": "m",
        "version": "1",
        "models": [{"member": "model.onnx", "format": "onnx"}],
        "input": {"shape": [None, 1, *SHAPE]},
        "preprocessing": {},
        "threshold": 0.5,
    }
    bundle = open_bundle(write_bundle(tmp_path / "m-v1.sgbundle", manifest, {"model.onnx": data}))
    x = np.random.default_rng(0).random((1, 1, *SHAPE), dtype=np.float32)
    probability, saliency = Model(bundle).predict(x, canonical_shape=(32, 40, 32))
    logit = float(onnx_logits(data, x)[0, 0])
    assert probability == pytest.approx(1 / (1 + np.exp(-logit)), abs=1e-6)
    assert saliency is not None and saliency.shape == (32, 40, 32)


def _store(root: Path, earlier_versions: int) -> tuple[Any, str]:
    """A fresh embedded MLflow store under ``root`` holding ``earlier_versions`` versions of
    ``shiftguard-classifier`` and then the run that trained ``root/model.pt`` (tagged with its
    SHA-256, as the train stage tags it) registered as the next one; the client and that run's id."""
    from mlflow.tracking import MlflowClient

    from shiftguard.tracking import EXPERIMENT, MODEL_SHA256_TAG, embedded_uri, file_sha256

    client = MlflowClient(embedded_uri(root))
    experiment = client.create_experiment(EXPERIMENT, (root / "mlruns").resolve().as_uri())
    client.create_registered_model("shiftguard-classifier")
    for _ in range(earlier_versions):
        other = client.create_run(experiment).info.run_id
        client.create_model_version("shiftguard-classifier", (root / "x").as_uri(), other)
    run_id = client.create_run(
        experiment, tags={MODEL_SHA256_TAG: file_sha256(root / "model.pt")}
    ).info.run_id
    client.create_model_version("shiftguard-classifier", (root / "x").as_uri(), run_id)
    return client, run_id


def _export_inputs(root: Path, volumes: list[Path]) -> None:
    """What the export stage reads, made small: a model file, a split table, validation reports."""
    cfg = ModelConfig(
        network={
            "_target_": "shiftguard.models.SmallCNN3d",
            "channels": [4, 8],
            "local_contrast": 3,
            "pooling": "meanmax",
        }
    )
    save_model(
        root / "model.pt", net(), cfg, TrainConfig(input_shape=SHAPE), (2.0,) * 3, (24, 28, 24)
    )
    rows = pd.DataFrame(
        {
            "series_uid": [f"1.2.{i}" for i in range(len(volumes))],
            "volume_path": [str(v) for v in volumes],
            "split": ["train", "val", "test"][: len(volumes)],
            "finding": [0, 1, 1][: len(volumes)],
            "scanner_model": "A",
        }
    )
    rows.to_csv(root / "dataset.csv", index=False)
    reports = root / "reports"
    reports.mkdir()
    (reports / "metrics.json").write_text('{"threshold": 0.42, "test": {"n": 1}}\n')
    pd.DataFrame(
        [{"column": "sex", "segment": "F", "n": 1, "n_positive": 1, "auroc": None,
          "auroc_gap": None, "judgeable": False}]
    ).to_csv(reports / "segments.csv", index=False)  # fmt: skip
    pd.DataFrame([{"profile": "p", "severity": 0, "auroc": 0.5}]).to_csv(
        reports / "robustness.csv", index=False
    )
    write_json(reports / "calibration.json", Calibration("platt", a=0.8, b=-0.3, n=1).to_json())


def test_the_export_gives_the_same_bundle_whatever_the_mlflow_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two fresh MLflow stores give the training run other ids and the model other registry
    numbers (v1 and v4): the bundles are byte for byte the same and name neither; each store's
    model version is tagged with the bundle's version, name and SHA-256."""
    from shiftguard.edge.bundle import open_bundle
    from shiftguard.edge.signing import default_signer
    from shiftguard.tracking import file_sha256

    # the drift reference runs the edge runner on DICOM files; these tests have none
    monkeypatch.setattr(
        "shiftguard.export.stage.monitor_reference",
        lambda bundle, dicom, splits, trust=None, uid_of=str, findings=None: (
            b"mean,split\n1.0,train\n",
            b"{}",
            1,
        ),
    )
    volumes = _volumes(tmp_path)
    bundles, tags, runs = [], [], []
    for name, earlier in (("a", 0), ("b", 3)):
        root = tmp_path / name
        root.mkdir()
        _export_inputs(root, volumes)
        client, run_id = _store(root, earlier)
        summary = run(
            ExportConfig(torchscript=False),  # traced twice in one process, torch renames its types
            IngestConfig(shape=(24, 28, 24)),
            root / "model.pt",
            root / "dataset.csv",
            tmp_path,
            root / "reports",
            root / "out",
            root=root,
            parity_series=1,
        )
        path = Path(summary.bundle)
        assert path.name == "shiftguard-classifier.sgbundle"
        bundles.append(path.read_bytes())
        runs.append(run_id)
        tags.append(client.get_model_version("shiftguard-classifier", str(earlier + 1)).tags)
        assert client.get_run(run_id).data.tags["shiftguard.bundle_sha256"] == summary.bundle_sha256
    assert runs[0] != runs[1]
    assert bundles[0] == bundles[1]
    bundle = open_bundle(path)
    assert "mlflow" not in bundle.manifest and runs[0].encode() not in bundles[0]
    # the validate stage's calibration map travels in the bundle and the edge reads it
    assert bundle.manifest["calibration"]["method"] == "platt"
    assert bundle.calibration == Calibration("platt", a=0.8, b=-0.3, n=1)
    assert bundle.manifest["trained_model"]["sha256"] == file_sha256(tmp_path / "a" / "model.pt")
    assert bundle.text("model_card.md").startswith(
        f"# Model card: shiftguard-classifier v{bundle.version}"
    )
    # signed with this process's key (tests/conftest.py): the card, export.json and MLflow say which
    signer = default_signer()
    assert signer is not None and bundle.signer == signer.key_id == summary.signer
    assert bundle.trusted and f"Signed by key {signer.key_id}" in bundle.text("model_card.md")
    assert client.get_run(run_id).data.tags["shiftguard.bundle_signer"] == signer.key_id
    for found in tags:
        assert found["bundle_version"] == bundle.version and found["bundle_signer"] == signer.key_id
        assert found["bundle"] == path.name and found["bundle_sha256"] == summary.bundle_sha256


def test_the_model_version_page_is_the_review_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After export the registered version reads as its review page: the model card is its
    description (and a Markdown artifact of the training run, which MLflow previews), the
    registered model says what its aliases mean, and the bundle's URI is served by the registry's
    store, not a path on the machine that ran the export."""
    from shiftguard.edge.bundle import open_bundle
    from shiftguard.tracking import CHALLENGER, CHAMPION

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(
        "shiftguard.export.stage.monitor_reference",
        lambda bundle, dicom, splits, trust=None, uid_of=str, findings=None: (
            b"mean,split\n1.0,train\n",
            b"{}",
            1,
        ),
    )
    volumes = _volumes(tmp_path)
    root = tmp_path / "project"
    root.mkdir()
    _export_inputs(root, volumes)
    client, run_id = _store(root, 1)
    summary = run(
        ExportConfig(torchscript=False, intended_use="Triage of brain MRI for review."),
        IngestConfig(shape=(24, 28, 24)),
        root / "model.pt",
        root / "dataset.csv",
        tmp_path,
        root / "reports",
        root / "out",
        root=root,
        parity_series=1,
    )
    card = open_bundle(Path(summary.bundle)).text("model_card.md")
    version = client.get_model_version("shiftguard-classifier", "2")
    assert version.description == card
    described = client.get_registered_model("shiftguard-classifier").description
    assert described.startswith("Triage of brain MRI for review.")
    assert f"`@{CHALLENGER}`" in described and f"`@{CHAMPION}`" in described
    logged = client.download_artifacts(run_id, "model_card.md", str(tmp_path / "dl"))
    assert Path(logged).read_text() == card
    uri = version.tags["bundle_uri"]
    assert uri == f"runs:/{run_id}/bundle/shiftguard-classifier.sgbundle"
    assert "file:" not in uri and str(tmp_path) not in uri
    import mlflow

    mlflow.set_tracking_uri(client.tracking_uri)
    fetched = mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "bundle"))
    assert Path(fetched).read_bytes() == Path(summary.bundle).read_bytes()
