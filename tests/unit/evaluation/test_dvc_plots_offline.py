"""`dvc plots show` works without internet: the project's HTML template inlines the Vega libraries
DVC would fetch from a CDN, and the validate stage's plots are images with one curve per set."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[3]


def _template() -> Path:
    config = configparser.ConfigParser()
    config.read(REPO / ".dvc" / "config")
    assert config.has_option("plots", "html_template"), "plots.html_template is set"
    path = REPO / ".dvc" / config.get("plots", "html_template")  # DVC: relative to .dvc/
    assert path.is_file(), path
    return path


def test_the_plots_page_loads_no_script_from_the_network(tmp_path: Path) -> None:
    from dvc_render import render_html
    from dvc_render.vega import VegaRenderer

    points = [
        {"epoch": e, "val_auroc": 0.5 + e / 10, "rev": "workspace", "filename": "h.csv",
         "field": "val_auroc"}
        for e in range(4)
    ]  # fmt: skip
    renderer = VegaRenderer(points, "h.csv", x="epoch", y="val_auroc")
    page = Path(render_html([renderer], tmp_path / "index.html", _template())).read_text()
    assert not re.search(r"<script[^>]*\bsrc\s*=", page), "every script is inline"
    assert not re.search(r"<link[^>]*\bhref\s*=\s*['\"]?https?:", page)
    assert "vegaEmbed('#h_csv'" in page  # DVC's plot, placed by the template
    # the same library versions DVC's own page loads from its CDN (its plot specs are written for
    # them): a DVC upgrade that changes them fails here, and the template is rebuilt
    wanted = dict(re.findall(r"npm/(vega(?:-lite|-embed)?)@([\d.]+)", VegaRenderer.SCRIPTS))
    assert set(wanted) == {"vega", "vega-lite", "vega-embed"}
    for name, version in wanted.items():
        assert f"/* {name}@{version} " in page, name
        assert (REPO / ".dvc/plots/licenses" / f"{name}-{version}.LICENSE").is_file()


def test_the_validate_stage_plots_are_images() -> None:
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["validate"]
    plots = [next(iter(p)) if isinstance(p, dict) else p for p in stage["plots"]]
    assert plots and all(p.endswith(".png") for p in plots), plots
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage["outs"]]
    assert {"reports/validate/roc.csv", "reports/validate/reliability.csv"} <= set(outs)
