"""A site's edge configuration as one YAML file, for hospitals that run ``shiftguard edge serve``
from an installed package and a bundle, without the project's ``conf/`` tree.

``shiftguard edge config > site.yaml`` writes the annotated defaults; ``shiftguard edge serve
--config site.yaml edge.port=104`` reads it, applies command-line overrides (the same ``key=value``
syntax as Hydra, with or without the ``edge.`` prefix) and validates it against
:class:`~shiftguard.config.deploy.EdgeConfig`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from shiftguard.config.deploy import EdgeConfig
from shiftguard.config.loader import validate
from shiftguard.errors import ConfigError


def load_site_config(path: Path, overrides: Sequence[str] = ()) -> EdgeConfig:
    """Read, override and validate a site file; errors name the file and the offending keys.

    The file holds the ``edge`` section's keys, at the top level or under ``edge:``.
    """
    if not path.is_file():
        raise ConfigError(f"site configuration {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"site configuration {path}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if isinstance(data, dict) and set(data) == {"edge"}:
        data = data["edge"]
    if not isinstance(data, dict):
        raise ConfigError(f"site configuration {path}: expected a mapping of edge settings")
    data = _apply_overrides(dict(data), overrides)
    try:
        return validate("edge", data, EdgeConfig)
    except ConfigError as exc:
        raise ConfigError(f"site configuration {path}: {exc}") from None


def _apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Hydra's override grammar (``edge.port=104``, ``destinations=[{name:pacs,...}]``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides([str(o) for o in overrides])
    except HydraException as exc:
        raise ConfigError(f"overrides: {exc}") from None
    for override in parsed:
        keys = override.key_or_group.removeprefix("edge.").split(".")
        node = data
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {override.input_line!r}: {key} is not a mapping")
            node = child
        if override.is_delete():
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = override.value()
    return data


def site_config_template() -> str:
    """The edge section's defaults as an annotated YAML file (each field's description above it)."""
    defaults = EdgeConfig().model_dump(mode="json")
    lines = [
        "# ShiftGuard edge service: `shiftguard edge serve --config this-file.yaml [key=value ...]`",
        "# Every key is optional; what is left out takes the value shown here.",
    ]
    for name, info in EdgeConfig.model_fields.items():
        lines.append("")
        if info.description:
            lines.append(f"# {info.description}")
        lines.append(yaml.safe_dump({name: defaults[name]}, sort_keys=False).rstrip())
    lines += [
        "",
        "# an example destination list:",
        "# destinations:",
        "#   - {name: pacs, ae_title: PACS, host: 10.20.0.5, port: 104, role: clinical}",
        "#   - {name: research, ae_title: RESEARCH, host: 10.20.0.9, port: 11112, role: research}",
    ]
    return "\n".join(lines) + "\n"
