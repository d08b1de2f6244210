from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from shiftguard.config import (
    SCHEMAS,
    CohortConfig,
    ConfigError,
    IngestConfig,
    SplitConfig,
    compose,
    compose_section,
    dump_params,
    find_conf_dir,
    load_section,
    validate,
)

REPO = Path(__file__).resolve().parents[3]
SECTIONS = SCHEMAS


def test_committed_params_yaml_is_what_conf_composes_to(conf_dir: Path) -> None:
    committed = (REPO / "params.yaml").read_text(encoding="utf-8")
    assert committed == dump_params(compose(conf_dir=conf_dir)), (
        "params.yaml is out of date with conf/: run `shiftguard config dump`"
    )


def test_params_yaml_parses_to_the_same_data_dvc_writes(conf_dir: Path) -> None:
    # DVC's Hydra composition writes OmegaConf.to_yaml(cfg) without our header: same data.
    from omegaconf import OmegaConf

    committed = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    assert committed == yaml.safe_load(OmegaConf.to_yaml(compose(conf_dir=conf_dir)))


@pytest.mark.parametrize("group", sorted(SECTIONS))
def test_every_option_of_every_group_composes_and_validates(conf_dir: Path, group: str) -> None:
    options = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
    assert options, f"conf/{group}/ has no options"
    for option in options:
        section = compose_section(group, SECTIONS[group], [f"{group}={option}"], conf_dir)
        assert isinstance(section, SECTIONS[group])


def test_the_unseen_scanner_is_a_profile_of_a_site_and_the_external_set(conf_dir: Path) -> None:
    cohort = compose_section("cohort", CohortConfig, conf_dir=conf_dir)
    split = compose_section("split", SplitConfig, conf_dir=conf_dir)
    models = {cohort.scanners[s.scanner].model for s in cohort.sites}
    assert set(split.external.values) <= models
    assert len({s.scanner for s in cohort.sites}) >= 4
    assert models - set(split.external.values), "some scanner must remain for training"


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("ingest.spacing=[2,-1,2]", "ingest.spacing.1"),
        ("ingest.interpolation_order=2", "ingest.interpolation_order"),
        ("cohort.lesion.radius_mm=[9,3]", "cohort.lesion.radius_mm"),
        ("cohort.sites.0.scanner=nonexistent", "cohort.sites[0].scanner"),
        ("cohort.scanners.skyra_3t.noise=-0.1", "cohort.scanners.skyra_3t.noise"),
        ("split.fractions.train=0.9", "split.fractions"),
    ],
)
def test_bad_values_fail_at_load_time_naming_the_key(
    conf_dir: Path, override: str, names: str
) -> None:
    section = override.split(".")[0]
    with pytest.raises(ConfigError) as info:
        compose_section(section, SECTIONS[section], [override], conf_dir)
    assert names in str(info.value)


def test_unknown_keys_are_rejected() -> None:
    with pytest.raises(ConfigError, match=r"ingest\.spacng"):
        validate("ingest", {"spacng": [1, 1, 1]}, IngestConfig)


def test_unknown_override_is_a_config_error(conf_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"ingest\.bogus"):
        compose(["ingest.bogus=1"], conf_dir)


def test_load_section_names_the_missing_file_and_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"params\.yaml does not exist"):
        load_section("ingest", IngestConfig, tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("split: {}\n")
    with pytest.raises(ConfigError, match="section 'ingest' is missing"):
        load_section("ingest", IngestConfig, tmp_path / "params.yaml")


def test_conf_dir_comes_from_the_environment_or_the_nearest_project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, conf_dir: Path
) -> None:
    monkeypatch.setenv("SHIFTGUARD_CONF_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="SHIFTGUARD_CONF_DIR"):
        find_conf_dir()
    monkeypatch.delenv("SHIFTGUARD_CONF_DIR")
    nested = REPO / "src" / "shiftguard"
    assert find_conf_dir(nested) == conf_dir


def test_every_experiment_preset_composes_and_validates(conf_dir: Path) -> None:
    from shiftguard.config import validate_all

    presets = sorted(p.stem for p in (conf_dir / "experiment").glob("*.yaml"))
    assert presets
    default = compose(conf_dir=conf_dir)
    for preset in presets:
        config = compose([f"experiment={preset}"], conf_dir)
        validate_all(config)
        if preset != "sim_on":  # the experiment's treatment arm is the default, named explicitly
            assert config != default, f"experiment={preset} changes nothing"


def test_the_two_experiment_arms_differ_only_in_training_time_simulation(conf_dir: Path) -> None:
    on = compose(["experiment=sim_on"], conf_dir)
    off = compose(["experiment=sim_off"], conf_dir)
    assert on["augment"]["enabled"] is True and off["augment"]["enabled"] is False
    assert (on["augment"]["arm"], off["augment"]["arm"]) == ("artifact", "none")
    off["augment"].update(enabled=True, arm="artifact")
    assert on == off  # same data, model, training, robustness sets and evaluation


def test_every_augmentation_arm_changes_only_what_training_does(conf_dir: Path) -> None:
    from shiftguard.config.schema import ARMS

    default = compose(conf_dir=conf_dir)
    assert sorted(p.stem for p in (conf_dir / "augment").glob("*.yaml")) == sorted(
        [*ARMS, "default"]
    )
    for arm in ARMS:
        config = compose([f"augment={arm}"], conf_dir)
        assert config["augment"]["arm"] == arm
        # the robustness sets and the profile catalogue are every arm's, so arms score alike
        for key in ("robustness", "profiles"):
            assert config["augment"][key] == default["augment"][key], (arm, key)
        assert {k: v for k, v in config.items() if k != "augment"} == {
            k: v for k, v in default.items() if k != "augment"
        }


@pytest.mark.parametrize("left_behind", ["folder", "defaults", "override"])
def test_a_project_still_on_the_old_scanner_group_is_told_how_to_migrate(
    conf_dir: Path, tmp_path: Path, left_behind: str
) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(conf_dir, conf)
    overrides = []
    if left_behind == "folder":  # the project kept conf/scanner/
        (conf / "scanner_sim").rename(conf / "scanner")
    elif left_behind == "defaults":  # moved the folder, kept /scanner@ in its augment defaults
        default = conf / "augment" / "default.yaml"
        default.write_text(default.read_text().replace("/scanner_sim@", "/scanner@"))
    else:
        overrides = ["+scanner=low_field"]
    with pytest.raises(ConfigError) as info:
        compose(overrides, conf)
    message = str(info.value)
    assert "scanner/ is now scanner_sim/" in message
    assert "git mv conf/scanner conf/scanner_sim" in message
    assert compose(["+scanner_sim=low_field"], conf_dir)["scanner_sim"]["description"]
