"""The experiment's designs (conf/design/): each composes, validates and sweeps every arm."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from shiftguard.config.loader import compose, validate
from shiftguard.config.schema import ARMS, DesignConfig, TrainConfig


@pytest.mark.parametrize("name", ["reduced", "full"])
def test_a_design_composes_and_sweeps_every_arm(conf_dir: Path, name: str) -> None:
    config = compose([f"+design={name}"], conf_dir)
    design = validate("design", config["design"], DesignConfig)
    train = validate("train", config["train"], TrainConfig)
    assert design.name == name
    # a fixed epoch budget: no early stopping, the last epoch kept
    assert train.epochs == design.epochs == train.patience and train.keep == "last"
    raw = yaml.safe_load((conf_dir / "design" / f"{name}.yaml").read_text())
    sweep = raw["hydra"]["sweeper"]["params"]
    assert sorted(sweep["augment"].split(",")) == sorted(ARMS)
    assert len(str(sweep["train.seed"]).split(",")) >= 3  # at least 3 seeds per arm
    assert design.reference_arm in ARMS and design.delta == pytest.approx(0.05)


def test_the_default_config_has_no_design(conf_dir: Path) -> None:
    """params.yaml (what DVC stages read) never carries a design: a sweep selects one."""
    assert "design" not in compose(conf_dir=conf_dir)
