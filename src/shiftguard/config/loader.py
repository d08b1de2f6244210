"""Compose ``conf/`` with Hydra, write ``params.yaml``, and load validated stage sections.

``conf/`` is the single source of truth. ``dvc exp run`` composes it itself (Hydra composition is
enabled in ``.dvc/config``); ``dvc repro`` does not, so the composed result is committed as
``params.yaml``, written by :func:`write_params` with the same serialisation DVC uses, and a test fails
when regenerating it would change it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from shiftguard.config.sections import SCHEMAS
from shiftguard.errors import ConfigError

CONFIG_NAME = "config"
PARAMS_FILE = "params.yaml"
PARAMS_HEADER = (
    "# GENERATED from conf/ by `shiftguard config dump` (DVC rewrites it on `dvc exp run`).\n"
    "# Do not edit: change conf/ and regenerate.\n"
)

M = TypeVar("M", bound=BaseModel)


def find_conf_dir(start: Path | None = None) -> Path:
    """Locate the ``conf/`` folder.

    Order: ``$SHIFTGUARD_CONF_DIR``; the nearest ``conf/config.yaml`` at or above ``start`` (default:
    the working directory); the repository this package is installed from (editable installs).

    Raises:
        ConfigError: when none of these holds a ``config.yaml``.
    """
    env = os.environ.get("SHIFTGUARD_CONF_DIR")
    if env:
        path = Path(env)
        if not (path / f"{CONFIG_NAME}.yaml").is_file():
            raise ConfigError(
                f"SHIFTGUARD_CONF_DIR={env!r} has no {CONFIG_NAME}.yaml; point it at the project's conf/"
            )
        return path.resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "conf" / f"{CONFIG_NAME}.yaml").is_file():
            return folder / "conf"
    repo = Path(__file__).resolve().parents[3] / "conf"
    if (repo / f"{CONFIG_NAME}.yaml").is_file():
        return repo
    raise ConfigError(
        f"no conf/{CONFIG_NAME}.yaml found at or above {here}; run from a ShiftGuard project "
        "or set SHIFTGUARD_CONF_DIR"
    )


#: Config groups that were renamed: old name -> (new name, why). A project that still has the old
#: folder, or an override that names it, gets a ConfigError saying how to migrate (README, Migration).
RENAMED_GROUPS: dict[str, tuple[str, str]] = {
    "scanner": (
        "scanner_sim",
        "it holds the augmentation's scanner-simulation profiles; 'scanner' is a cohort scanner",
    ),
}


def check_renamed_groups(folder: Path, overrides: Sequence[str] = ()) -> None:
    """Refuse a ``conf/`` folder or overrides that still use a renamed config group.

    Raises:
        ConfigError: naming the old group, the new one and the commands that migrate.
    """
    for old in RENAMED_GROUPS:
        how = _migration(old)
        if (folder / old).is_dir() and any((folder / old).glob("*.yaml")):
            raise ConfigError(f"{folder / old}: {how}")
        for override in overrides:
            key = override.lstrip("+~").split("=", 1)[0]
            if key == old or key.startswith(f"{old}."):
                raise ConfigError(f"override {override!r}: {how}")


def _migration(old: str) -> str:
    new, why = RENAMED_GROUPS[old]
    return (
        f"the config group {old}/ is now {new}/ ({why}): run `git mv conf/{old} conf/{new}`, "
        f"write /{new}@... for /{old}@... in conf/augment/*.yaml, and {new}... for {old}... in "
        "overrides (README, Migration notes)"
    )


def compose(overrides: Sequence[str] = (), conf_dir: Path | None = None) -> dict[str, Any]:
    """Compose the configuration with Hydra and return it resolved, as plain containers.

    Args:
        overrides: Hydra override strings, e.g. ``["cohort.n_subjects=20", "ingest.size=[32,32,32]"]``.
        conf_dir: the ``conf/`` folder; found with :func:`find_conf_dir` when omitted.

    Raises:
        ConfigError: when an override or a config file is malformed, or uses a renamed group.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    folder = (conf_dir or find_conf_dir()).resolve()
    check_renamed_groups(folder, overrides)
    try:
        with initialize_config_dir(str(folder), version_base=None):
            cfg = hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides))
        OmegaConf.resolve(cfg)
        container = OmegaConf.to_container(cfg)
    except (HydraException, OmegaConfBaseException) as exc:
        renamed = [_migration(old) for old in RENAMED_GROUPS if f"'{old}/" in str(exc)]
        raise ConfigError(
            f"cannot compose {folder} with overrides {list(overrides)}: {exc}"
            + "".join(f"; {how}" for how in renamed)
        ) from exc
    assert isinstance(container, dict)
    return {str(k): v for k, v in container.items()}


def dump_params(config: Mapping[str, Any]) -> str:
    """Serialise a composed config exactly as DVC's Hydra composition does, plus a header."""
    from omegaconf import OmegaConf

    return PARAMS_HEADER + OmegaConf.to_yaml(OmegaConf.create(dict(config)))


def validate_all(config: Mapping[str, Any]) -> dict[str, BaseModel]:
    """Validate every section that has a schema (see :data:`shiftguard.config.SCHEMAS`)."""
    return {name: validate(name, config.get(name), model) for name, model in SCHEMAS.items()}


def write_params(path: Path, overrides: Sequence[str] = (), conf_dir: Path | None = None) -> Path:
    """Compose ``conf/``, validate every section, and write it to ``path`` (normally ``params.yaml``).

    Raises:
        ConfigError: when a section is invalid; nothing is written then.
    """
    config = compose(overrides, conf_dir)
    validate_all(config)
    path.write_text(dump_params(config), encoding="utf-8")
    return path


def read_params(path: Path = Path(PARAMS_FILE)) -> dict[str, Any]:
    """Read a params file; the error names the file when it is missing or not a mapping."""
    if not path.is_file():
        raise ConfigError(
            f"{path} does not exist; generate it with `shiftguard config dump` from conf/"
        )
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} must hold a mapping of stage sections, got {type(data).__name__}"
        )
    return data


def validate(section: str, data: Any, model: type[M]) -> M:
    """Validate one section into its typed schema; errors name the offending keys.

    >>> from shiftguard.config.schema import IngestConfig
    >>> validate("ingest", {"min_slices": 3}, IngestConfig).min_slices
    3
    """
    if data is None:
        raise ConfigError(f"section {section!r} is missing from the configuration")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in (section, *err["loc"]))
            problems.append(f"{loc}: {err['msg']}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems)) from None


def load_section(section: str, model: type[M], params: Path = Path(PARAMS_FILE)) -> M:
    """Load and validate one stage's section of ``params.yaml`` (how DVC stages read config)."""
    return validate(section, read_params(params).get(section), model)


def compose_section(
    section: str, model: type[M], overrides: Sequence[str] = (), conf_dir: Path | None = None
) -> M:
    """Compose ``conf/`` with overrides and validate one section (how the CLI reads config)."""
    return validate(section, compose(overrides, conf_dir).get(section), model)
