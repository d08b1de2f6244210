"""The experiment's designs (conf/design/): each composes, validates and sweeps every arm."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from shiftguard.config.loader import compose, validate
from shiftguard.config.schema import ARMS, CohortConfig, DesignConfig, SplitConfig, TrainConfig


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


@pytest.mark.parametrize("name", ["reduced", "full"])
def test_a_designs_cohorts_are_unseen_and_seen_scanners(conf_dir: Path, name: str) -> None:
    """The hold-out cohort has only training scanners, the unseen cohort only scanners the split
    sends to ``external``; each is large enough for the power the design claims."""
    design = validate("design", compose([f"+design={name}"], conf_dir)["design"], DesignConfig)
    split = validate("split", compose(conf_dir=conf_dir)["split"], SplitConfig)
    unseen = set(split.external.values) if split.external else set()
    for role, cohort in (("holdout", design.holdout_cohort), ("external", design.external_cohort)):
        cfg = validate("cohort", compose([f"cohort={cohort}"], conf_dir)["cohort"], CohortConfig)
        models = {cfg.scanners[site.scanner].model for site in cfg.sites}
        assert (models <= unseen) if role == "external" else not (models & unseen), (role, models)
        assert design.cohort_folder(cohort) == Path(design.cohorts) / cohort
    assert design.external == f"{design.cohorts}/{design.external_cohort}/split/dataset.csv"


def test_the_full_design_scores_more_studies_per_scanner_than_the_reduced(conf_dir: Path) -> None:
    sizes = {}
    for name in ("reduced", "full"):
        design = validate("design", compose([f"+design={name}"], conf_dir)["design"], DesignConfig)
        cohort = compose([f"cohort={design.external_cohort}"], conf_dir)["cohort"]
        sizes[name] = cohort["n_subjects"] / len(cohort["sites"])
    assert sizes["reduced"] == 300 and sizes["full"] >= 1600
