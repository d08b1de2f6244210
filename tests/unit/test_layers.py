"""The package's layers (ARCHITECTURE.md) hold: ``lint-imports`` keeps both contracts in
pyproject.toml, and the contracts are not vacuous: the same check on a copy of the package with one
upward import added, or one lab library imported at the edge, fails and names the import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path, src: Path) -> subprocess.CompletedProcess[str]:
    if not LINT.exists():
        pytest.fail(f"{LINT} missing: pip install -e '.[dev]' installs import-linter")
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run(
        [str(LINT), "--no-cache", "--no-logo", str(root / "pyproject.toml")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_package_keeps_its_layer_contracts() -> None:
    done = _lint(REPO, REPO / "src")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 kept, 0 broken" in done.stdout, done.stdout


def test_every_module_of_the_package_sits_in_a_layer() -> None:
    """A module missing from the layers would be checked by no contract."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    [layers] = [c for c in config["tool"]["importlinter"]["contracts"] if c["id"] == "layers"]
    placed = {name.strip() for line in layers["layers"] for name in line.split("|")}
    package = REPO / "src" / "shiftguard"
    present = {p.stem for p in package.glob("*.py") if p.name != "__init__.py"}
    present |= {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
    assert present == placed, (
        f"not in a layer: {sorted(present - placed)}; no longer present: {sorted(placed - present)}"
    )


def _copy(tmp_path: Path) -> Path:
    shutil.copy2(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(
        REPO / "src" / "shiftguard",
        tmp_path / "src" / "shiftguard",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return tmp_path / "src" / "shiftguard"


@pytest.mark.parametrize(
    ("module", "line", "contract", "named"),
    [
        # the kernels below would reach up into the lab: an upward import
        (
            "metrics.py",
            "from shiftguard.evaluation import validate",
            "Layers only point down",
            "shiftguard.metrics -> shiftguard.evaluation.validate",
        ),
        # training importing evaluation, which imports training: a cycle, hidden in a function
        (
            "training/loop.py",
            "def _hidden():\n    from shiftguard.evaluation import segments\n",
            "Layers only point down",
            "shiftguard.training.loop -> shiftguard.evaluation.segments",
        ),
        # the edge pulling pandas in through a module of its own
        (
            "edge/queue.py",
            "def _frame():\n    import pandas\n",
            "The edge runtime imports no lab-side library",
            "shiftguard.edge.queue -> pandas",
        ),
    ],
)
def test_an_import_that_breaks_a_contract_fails_the_check(
    tmp_path: Path, module: str, line: str, contract: str, named: str
) -> None:
    package = _copy(tmp_path)
    target = package / module
    target.write_text(target.read_text() + "\n\n" + line + "\n")
    done = _lint(tmp_path, tmp_path / "src")
    assert done.returncode != 0, done.stdout
    assert f"{contract} BROKEN" in done.stdout, done.stdout
    assert named in done.stdout, done.stdout


def test_no_module_imports_another_modules_private_names() -> None:
    """Kernels are public: a name one module needs from another has no leading underscore."""
    import ast

    import shiftguard

    package = Path(shiftguard.__file__).parent
    crossings = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("shiftguard"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                # a module, and the package version, are not private names
                private = [n for n in private if n not in ("_kernels", "__version__")]
                if private:
                    crossings.append(f"{path.relative_to(package)}: {node.module} {private}")
    assert not crossings, crossings
