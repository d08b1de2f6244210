"""Constructed shadow logs: a champion and, optionally, a challenger on the same studies, with
known failures planted on chosen segments; a real MLflow registry in a temporary folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from shiftguard.shadow.diagnoses import Diagnosis, DiagnosisBook

SCANNERS = ("Skyra", "Ingenia", "Vantage")


def _scores(rng: np.random.Generator, finding: np.ndarray, separation: float) -> np.ndarray:
    return np.clip(
        0.5 + np.where(finding, separation, -separation) + rng.normal(0, 0.15, finding.size), 0, 1
    )


def build(
    n: int = 600,
    seed: int = 0,
    challenger: bool = True,
    challenger_broken: str | None = None,
    challenger_separation: float = 0.25,
    champion_version: str = "1",
    challenger_version: str = "2",
) -> tuple[pd.DataFrame, DiagnosisBook]:
    """A shadow log (one row per role and study) and the verdicts of every study."""
    rng = np.random.default_rng(seed)
    finding = rng.random(n) < 0.4
    segments = {
        "scanner_model": rng.choice(SCANNERS, n),
        "manufacturer": "Vendor",
        "sex": rng.choice(["F", "M"], n),
        "age_band": rng.choice(["40-59", "60-74"], n),
        "site": "site-a",
    }
    uids = [f"1.2.826.0.1.{i}" for i in range(n)]
    rows = [
        pd.DataFrame({"study_uid": uids, "role": "champion", "probability": _scores(rng, finding, 0.25),
                      "threshold": 0.5, "bundle": f"m-v{champion_version}", "model": "m",
                      "model_version": champion_version, **segments})
    ]  # fmt: skip
    if challenger:
        score = _scores(rng, finding, challenger_separation)
        if challenger_broken is not None:
            score = np.where(segments["scanner_model"] == challenger_broken, rng.random(n), score)
        rows.append(
            pd.DataFrame({"study_uid": uids, "role": "challenger", "probability": score,
                          "threshold": 0.5, "bundle": f"m-v{challenger_version}", "model": "m",
                          "model_version": challenger_version, **segments})
        )  # fmt: skip
    book = DiagnosisBook()
    book.add(
        Diagnosis(u, "2026-01-01T00:00:00Z", "dr", int(f))
        for u, f in zip(uids, finding, strict=True)
    )
    return pd.concat(rows, ignore_index=True), book


@pytest.fixture
def shadow_case() -> Callable[..., tuple[pd.DataFrame, DiagnosisBook]]:
    return build


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Registered model ``m`` with versions 1, 2, 3; version 1 aliased ``champion``."""
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    client.create_registered_model("m")
    for _ in range(3):
        client.create_model_version("m", source=(tmp_path / "model").as_uri())
    client.set_registered_model_alias("m", "champion", "1")
    return client
