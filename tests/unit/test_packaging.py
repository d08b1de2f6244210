"""The install surface: extras resolve to what each side needs, and the edge side stays light."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
HEAVY = {"torch", "monai", "mlflow", "dvc", "torchio", "evidently"}
# hydra-core (with omegaconf, ~1 MB, pure Python) is light: `edge serve` composes conf/edge/ with it


def names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in requirements}


def test_edge_install_pulls_no_training_or_tracking_stack() -> None:
    edge = names(PROJECT["dependencies"]) | names(PROJECT["optional-dependencies"]["edge"])
    assert not edge & HEAVY
    assert {"onnxruntime", "highdicom", "pynetdicom", "nibabel", "hydra-core"} <= edge


def test_pipeline_extra_has_every_required_package() -> None:
    pipeline = names(PROJECT["dependencies"]) | names(PROJECT["optional-dependencies"]["pipeline"])
    required = HEAVY | {
        "hydra-core",
        "pydicom",
        "pynetdicom",
        "highdicom",
        "onnxruntime",
        "nilearn",
    }
    assert required <= pipeline


def test_torch_is_pinned_and_pandas_kept_below_3_for_evidently() -> None:
    pipeline = PROJECT["optional-dependencies"]["pipeline"]
    assert any(re.fullmatch(r"torch==[\d.]+", r.split("#")[0].strip()) for r in pipeline)
    assert any(r.startswith("pandas") and "<3" in r for r in pipeline)


def test_console_script_is_shiftguard() -> None:
    assert PROJECT["scripts"]["shiftguard"] == "shiftguard.cli:main"
