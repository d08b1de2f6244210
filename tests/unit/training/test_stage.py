from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pickle_trap import Trap

from shiftguard.config.schema import ModelConfig, TrainConfig
from shiftguard.models import build_model
from shiftguard.training.stage import (
    ModelFileError,
    TrainingDataError,
    load_model,
    read_rows,
    save_model,
)

MODEL = ModelConfig(
    network={"_target_": "shiftguard.models.SmallCNN3d", "channels": [4, 8], "local_contrast": 3}
)


def test_model_file_round_trips_weights_and_input_contract(tmp_path: Path) -> None:
    net = build_model(MODEL).eval()
    cfg = TrainConfig(input_shape=(12, 14, 12), intensity_percentiles=(0.5, 99.5))
    path = save_model(tmp_path / "model.pt", net, MODEL, cfg, (2.0, 2.0, 2.0), (24, 28, 24))
    loaded, payload = load_model(path)
    x = torch.rand(2, 1, 12, 14, 12)
    torch.testing.assert_close(loaded(x), net(x))
    assert payload["input"] == {
        "ingest_spacing": [2.0, 2.0, 2.0],
        "ingest_shape": [24, 28, 24],
        "input_shape": [12, 14, 12],
        "intensity_percentiles": [0.5, 99.5],
    }
    assert TrainConfig.model_validate(payload["train"]) == cfg


def test_bad_model_files_are_named_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="no trained model; run the train stage"):
        load_model(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ModelFileError, match=r"garbage\.pt: not a readable model file"):
        load_model(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": 1}, foreign)
    with pytest.raises(ModelFileError, match="not a ShiftGuard model file"):
        load_model(foreign)
    net = build_model(MODEL)
    path = save_model(tmp_path / "m.pt", net, MODEL, TrainConfig(), (2.0,) * 3, (16, 16, 16))
    payload = torch.load(path, weights_only=False)
    payload["model"]["network"]["channels"] = [4, 16]
    torch.save(payload, path)
    with pytest.raises(ModelFileError, match="weights do not fit"):
        load_model(path)


def test_a_model_file_that_would_run_code_is_refused_unrun(tmp_path: Path) -> None:
    net = build_model(MODEL)
    marker = tmp_path / "the trap ran"
    path = save_model(
        tmp_path / "m.pt", net, MODEL, TrainConfig(), (2.0,) * 3, (16, 16, 16),
        extra={"note": Trap(marker)},
    )  # fmt: skip
    with pytest.raises(ModelFileError, match=r"m\.pt: not a readable model file"):
        load_model(path)
    assert not marker.exists()


def test_split_table_problems_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(TrainingDataError, match="no split table; run the split stage"):
        read_rows(tmp_path / "dataset.csv")
    table = tmp_path / "other.csv"
    table.write_text("series_key,finding\na,1\n")
    with pytest.raises(TrainingDataError, match=r"other\.csv: no 'split' column"):
        read_rows(table)
