"""The robustness figure shows every profile on its own axes with integer severities, and the
validation stage reports its progress over the volumes it scores."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from shiftguard.config.schema import TrainConfig
from shiftguard.evaluation import validate
from shiftguard.evaluation.validate import ValidationResult, robustness_figure


def _robustness() -> pd.DataFrame:
    rows = [
        {
            "profile": p,
            "severity": s,
            "n": 24,
            "n_positive": 10,
            "auroc": 1.0,
            "auroc_low": 1.0,
            "auroc_high": 1.0,
            "seen_in_training": p in ("low_field", "motion_prone"),
        }
        for p in (
            "high_field_3t",
            "legacy_vendor",
            "low_field",
            "motion_prone",
            "rf_spike",
            "thick_slice",
        )
        for s in range(5)
    ]  # every profile at AUROC 1.000: drawn on one axes, they hid each other
    rows += [
        {"profile": "external", "severity": -1, "n": 76, "n_positive": 32, "auroc": 0.76,
         "auroc_low": 0.62, "auroc_high": 0.88, "seen_in_training": False},
        {"profile": "external:SIGNA Premier", "severity": -1, "n": 19, "n_positive": 9,
         "auroc": 0.98, "auroc_low": 0.9, "auroc_high": 1.0, "seen_in_training": False},
    ]  # fmt: skip
    return pd.DataFrame(rows)


def test_every_profile_gets_its_own_panel_with_integer_severities() -> None:
    rob = _robustness()
    fig = robustness_figure(ValidationResult(0.5, {}, pd.DataFrame(), pd.DataFrame(), rob))
    panels = [ax for ax in fig.axes if ax.get_visible()]
    profiles = sorted(p for p in rob["profile"].unique() if not p.startswith("external"))
    assert len(panels) == len(profiles) + 1  # and one for the unseen real scanners
    for ax, profile in zip(panels, profiles, strict=False):
        assert ax.get_title().startswith(profile)
        trained = "trained with" in ax.get_title()
        assert trained == (profile in ("low_field", "motion_prone"))
        ticks = ax.get_xticks()
        assert list(ticks) == [0, 1, 2, 3, 4]  # integer severities, no 0.5 steps
        (line, *_) = ax.get_lines()
        assert list(line.get_xdata()) == [0, 1, 2, 3, 4]
    scanners = panels[-1]
    labels = [t.get_text() for t in scanners.get_xticklabels()]
    assert labels[0].startswith("pooled") and "SIGNA Premier" in labels[1]
    assert all("-1" not in label for ax in panels for label in [ax.get_title()])
    assert fig.legends, "a legend says what the line styles mean"


def test_scoring_reports_progress_over_every_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    import shiftguard.training.data as data
    import shiftguard.training.loop as loop

    paths = [f"v{i}.nii.gz" for i in range(7)]
    batches = [{"key": [str(i) for i in range(j, min(j + 3, 7))]} for j in range(0, 7, 3)]
    monkeypatch.setattr(data, "build_dataset", lambda items, cfg: items)
    monkeypatch.setattr(data, "build_loader", lambda *a, **k: batches)

    def predict(_net: Any, loader: Any, _device: Any) -> tuple[Any, Any, list[str]]:
        keys = [k for batch in loader for k in batch["key"]]
        return np.zeros(len(keys)), np.arange(len(keys), dtype=float), keys

    monkeypatch.setattr(loop, "predict", predict)
    advanced: list[tuple[str, float]] = []

    class Bar:
        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def add_task(self, description: str, total: float) -> int:
            advanced.append((description, total))
            return 0

        def advance(self, task: int, n: float) -> None:
            advanced.append(("advance", n))

    monkeypatch.setattr(validate, "progress_bar", lambda enabled=True: Bar())
    probs = validate.predict_paths(None, paths, TrainConfig(), progress=True, description="x")  # type: ignore[arg-type]
    assert probs.tolist() == list(range(7))
    assert advanced[0] == ("x: 7 volumes", 7)
    assert [n for what, n in advanced[1:]] == [3, 3, 1]  # one step per batch, summing to 7
