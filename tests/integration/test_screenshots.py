"""``scripts/screenshots.py`` with the real headless Chromium: a page's screenshot is kept and its
text checked, a page lacking its text is named, and offline pages cannot reach the network (so a
report that needs a CDN shows it)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.peers("chromium")]

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "screenshots.py"


@pytest.fixture(scope="module")
def shots() -> ModuleType:
    spec = importlib.util.spec_from_file_location("screenshots", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["screenshots"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def page(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "page.html"
    path.write_text(f"<!doctype html><html><body>{body}</body></html>")
    return path


def test_a_page_showing_its_text_is_kept(shots: ModuleType, tmp_path: Path) -> None:
    html = page(
        tmp_path, "<h1>Drift of window 3</h1><p id=x></p><script>x.textContent='drawn'</script>"
    )
    view = shots.Page("report", html.as_uri(), ("Drift of window 3", "drawn"), height=400)
    problems = shots.shoot(shots.browser(), view, tmp_path, tmp_path / "profile")
    assert problems == []
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(png[16:20], "big") == shots.WIDTH  # the IHDR's width


def test_a_page_missing_its_text_is_named(shots: ModuleType, tmp_path: Path) -> None:
    html = page(tmp_path, "<h1>Shadow evaluation</h1>")
    view = shots.Page("shadow", html.as_uri(), ("Shadow evaluation", "flag reason"), height=400)
    problems = shots.shoot(shots.browser(), view, tmp_path, tmp_path / "profile")
    assert problems == ["shadow: the page does not show 'flag reason'"]


def test_offline_pages_cannot_load_scripts_from_the_network(
    shots: ModuleType, tmp_path: Path
) -> None:
    html = page(
        tmp_path,
        '<p id=x>waiting</p><script src="https://cdn.jsdelivr.net/npm/vega@5"></script>'
        "<script>x.textContent = typeof vega === 'undefined' ? 'no vega' : 'vega loaded'</script>",
    )
    view = shots.Page("plots", html.as_uri(), ("vega loaded",), height=400, offline=True)
    problems = shots.shoot(shots.browser(), view, tmp_path, tmp_path / "profile")
    assert problems == ["plots: the page does not show 'vega loaded'"]


def test_a_page_loading_remote_scripts_is_refused(shots: ModuleType, tmp_path: Path) -> None:
    index = tmp_path / "index.html"
    index.write_text(
        '<script type="text/javascript" src="https://cdn.jsdelivr.net/npm/vega@5.20.2"></script>'
    )
    with pytest.raises(RuntimeError, match=r"cdn\.jsdelivr\.net"):
        shots.remote_scripts_refused(index)
