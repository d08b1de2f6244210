"""The run fails, naming the files, when a test writes into the project instead of a temporary
folder (tests/clean_tree_plugin.py), and passes when tests keep to tmp_path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from clean_tree_plugin import files_under

TESTS = Path(__file__).resolve().parents[1]


def _run(project: Path, body: str) -> subprocess.CompletedProcess[str]:
    (project / "test_inner.py").write_text(body)
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "clean_tree_plugin", "-p", "no:cacheprovider",
         "-q", "test_inner.py"],
        cwd=project, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_a_file_written_into_the_project_fails_the_run(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "mlruns").mkdir(parents=True)
    (project / "kept.txt").write_text("there before the run")
    leaky = _run(
        project,
        "from pathlib import Path\n\n"
        "def test_leaks():\n"
        "    Path('mlruns/1').mkdir(parents=True)\n"
        "    Path('mlruns/1/decision.json').write_text('{}')\n",
    )
    assert leaky.returncode == 1, leaky.stdout
    assert "wrote 1 file(s) into the working tree" in leaky.stdout
    assert "mlruns/1/decision.json" in leaky.stdout
    (project / "mlruns" / "1" / "decision.json").unlink()
    tidy = _run(project, "def test_tidy(tmp_path):\n    (tmp_path / 'x').write_text('fine')\n")
    assert tidy.returncode == 0, tidy.stdout


def test_folders_tools_own_are_not_counted(tmp_path: Path) -> None:
    for name in (".git/objects/x", ".venv/bin/x", "a/__pycache__/x.pyc", ".dvc/cache/ab/cd",
                 ".dvc/tmp/lock", "src/pkg.egg-info/PKG-INFO", ".pytest_cache/v", "kept/x"):  # fmt: skip
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    assert files_under(tmp_path) == {"kept/x"}
