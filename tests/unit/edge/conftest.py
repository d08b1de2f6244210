"""Fixtures for the edge runner: a tiny real cohort (DICOM on disk) and a bundle made the way the
export stage makes one (ONNX from a real network, the manifest's preprocessing from the config)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from shiftguard.cohort import generate
from shiftguard.config import (
    CohortConfig,
    ExportConfig,
    IngestConfig,
    TrainConfig,
    compose,
    validate,
)
from shiftguard.edge.bundle import bundle_file_name, write_bundle
from shiftguard.export.stage import export_onnx, preprocessing_spec
from shiftguard.models import SmallCNN3d
from shiftguard.peers import Orthanc

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def tiny() -> dict[str, Any]:
    return compose(["experiment=tiny", "cohort.n_subjects=3"], conf_dir=REPO / "conf")


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory, tiny: dict[str, Any]) -> Path:
    """Three synthetic subjects: ``data/dicom/<patient>/<study>/<series files>``."""
    root = tmp_path_factory.mktemp("cohort")
    generate.run(validate("cohort", tiny["cohort"], CohortConfig), root, workers=1, progress=False)
    return root / "dicom"


def make_network() -> SmallCNN3d:
    torch.manual_seed(0)
    return SmallCNN3d(channels=(4, 8), local_contrast=3, pooling="max").eval()


def make_manifest(tiny: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    ingest = validate("ingest", tiny["ingest"], IngestConfig)
    train = validate("train", tiny["train"], TrainConfig)
    export = ExportConfig()
    manifest: dict[str, Any] = {
        "name": "test-model",
        "version": "7",
        "models": [{"member": "model.onnx", "format": "onnx", "outputs": ["logit", "saliency"]}],
        "input": {"name": "image", "shape": [None, 1, *ingest.shape], "dtype": "float32"},
        "preprocessing": preprocessing_spec(ingest, train, ingest.shape),
        "threshold": 0.5,
        "series_selection": export.series_selection.model_dump(mode="json"),
    }
    manifest.update(overrides)
    return manifest


def reference_csv(n: int = 40, seed: int = 0) -> bytes:
    """A reference table whose held-out outputs are low probabilities (Beta(1, 8))."""
    rng = np.random.default_rng(seed)
    p = rng.beta(1, 8, n)
    entropy = -(p * np.log(p) + (1 - p) * np.log(1 - p))
    rows = ["probability,entropy,split"]
    rows += [
        f"{a:.6f},{b:.6f},{'test' if i % 2 else 'val'}"
        for i, (a, b) in enumerate(zip(p, entropy, strict=True))
    ]
    rows += [f"{0.01:.6f},{0.05:.6f},train"] * 10
    return ("\n".join(rows) + "\n").encode()


@pytest.fixture(scope="session")
def network() -> SmallCNN3d:
    return make_network()


@pytest.fixture(scope="session")
def onnx_model(network: SmallCNN3d, tiny: dict[str, Any]) -> bytes:
    shape = tiny["ingest"]["shape"]
    return export_onnx(network, torch.zeros(1, 1, *shape))


def make_bundle(root: Path, tiny: dict[str, Any], onnx_model: bytes, **overrides: Any) -> Path:
    """A bundle of the test model in ``root``, its manifest :func:`make_manifest` with
    ``overrides`` (version 7 unless given)."""
    manifest = make_manifest(tiny, **overrides)
    return write_bundle(
        root / bundle_file_name("test-model", manifest["version"]),
        manifest,
        {"model.onnx": onnx_model, "reference.csv": b"mean,std\n1.0,2.0\n"},
    )


def wait_until(predicate: Any, timeout: float = 60.0) -> None:
    """Poll ``predicate`` every 0.1 s until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture(scope="session")
def bundle_path(
    tmp_path_factory: pytest.TempPathFactory, tiny: dict[str, Any], onnx_model: bytes
) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle"), tiny, onnx_model)


@pytest.fixture(scope="session")
def challenger_path(
    tmp_path_factory: pytest.TempPathFactory, tiny: dict[str, Any], onnx_model: bytes
) -> Path:
    """A second version of the test model, to run as the challenger."""
    return make_bundle(tmp_path_factory.mktemp("challenger"), tiny, onnx_model, version="8")


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A real Orthanc (AE ``ORTHANC``) in ``tmp_path``, stopped afterwards."""
    server = Orthanc(tmp_path / "orthanc")
    server.start()
    yield server
    server.stop()
