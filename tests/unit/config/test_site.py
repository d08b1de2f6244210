"""A site's edge configuration file: the template, overrides, and errors that name the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from shiftguard.config import ConfigError, EdgeConfig
from shiftguard.config.site import load_site_config, site_config_template


def test_the_template_reads_back_as_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(site_config_template())
    assert load_site_config(path) == EdgeConfig()
    assert "# listen address" in path.read_text()  # annotated with the field descriptions


def test_overrides_use_hydra_syntax_with_or_without_the_section(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("edge:\n  port: 11112\n  shadow: true\n")
    cfg = load_site_config(
        path,
        [
            "edge.port=104",
            "shadow=false",
            "calling_ae_titles=[MR1,PACS]",
            "destinations=[{name:pacs,ae_title:PACS,host:10.0.0.5,port:104}]",
        ],
    )
    assert (cfg.port, cfg.shadow, cfg.calling_ae_titles) == (104, False, ["MR1", "PACS"])
    assert cfg.destinations[0].ae_title == "PACS" and cfg.destinations[0].role == "clinical"


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("prot: 104\n", [], "edge.prot: Extra inputs"),
        ("port: 104\n", ["port=abc"], "edge.port: Input should be a valid integer"),
        ("port: [104\n", [], "not valid YAML"),
        ("- 1\n- 2\n", [], "expected a mapping"),
        ("tls_cert: a.pem\n", [], "tls_cert and edge.tls_key go together"),
        ("port: 104\n", ["port"], "overrides"),
    ],
)
def test_bad_site_files_are_refused_naming_the_file_and_key(
    tmp_path: Path, text: str, overrides: list[str], message: str
) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_site_config(path, overrides)
    assert "overrides" in message or str(path) in str(err.value)


def test_a_missing_site_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_site_config(tmp_path / "nope.yaml")
