"""A pytest plugin (loaded for every run, ``-p clean_tree_plugin``): the tests leave the working tree
as they found it.

Tests write under temporary folders only. This plugin lists every file in the repository before the
run and after it (in the controlling process when the run is spread over xdist workers) and fails the
run, naming them, when files appeared: an MLflow store, a report or a cache a test wrote into the
project. Folders that tools own are left out: git's, the virtual environment, pytest's, ruff's and
mypy's caches, ``__pycache__``, DVC's cache and scratch folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

#: folders (relative to the root, or any folder of this name) whose contents tools own
OWNED = {".git", ".venv", ".pytest_cache", ".ruff_cache", ".mypy_cache", "__pycache__"}
OWNED_PATHS = {Path(".dvc") / "cache", Path(".dvc") / "tmp"}
SHOWN = 20

BEFORE = pytest.StashKey[set[str]]()
APPEARED = pytest.StashKey[list[str]]()


def files_under(root: Path) -> set[str]:
    """Every file below ``root`` as a relative path, outside the folders tools own."""
    found: set[str] = set()
    for folder, dirs, files in os.walk(root):
        here = Path(folder).relative_to(root)
        dirs[:] = [d for d in dirs if d not in OWNED and here / d not in OWNED_PATHS]
        dirs[:] = [d for d in dirs if not d.endswith(".egg-info")]
        found.update(str(here / f) for f in files)
    return found


def _controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput")


def pytest_sessionstart(session: pytest.Session) -> None:
    if _controller(session.config):
        session.config.stash[BEFORE] = files_under(session.config.rootpath)


def pytest_sessionfinish(session: pytest.Session, exitstatus: Any) -> None:
    before = session.config.stash.get(BEFORE, None)
    if before is None or not _controller(session.config):
        return
    appeared = sorted(files_under(session.config.rootpath) - before)
    session.config.stash[APPEARED] = appeared
    if appeared and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    appeared = config.stash.get(APPEARED, [])
    if not appeared:
        return
    terminalreporter.write_line(
        f"the tests wrote {len(appeared)} file(s) into the working tree (tests write under "
        "temporary folders only):",
        red=True,
    )
    for path in appeared[:SHOWN]:
        terminalreporter.write_line(f"  {path}", red=True)
    if len(appeared) > SHOWN:
        terminalreporter.write_line(f"  ... and {len(appeared) - SHOWN} more", red=True)
