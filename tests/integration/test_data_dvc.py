"""A fresh clone regenerates exactly the cohort that data.dvc tracks (the README's first command
relies on it to leave `dvc status` clean)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shiftguard.cohort import generate
from shiftguard.config import CohortConfig, compose_section

pytestmark = [pytest.mark.integration, pytest.mark.slow(seconds=330)]

REPO = Path(__file__).resolve().parents[2]


def test_default_cohort_regenerates_the_bytes_data_dvc_tracks(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def sh(*args: str) -> str:
        return subprocess.run(
            args, cwd=tmp_path, env=env, capture_output=True, text=True, check=True
        ).stdout

    sh("git", "init", "-q")
    sh("dvc", "init", "-q")
    shutil.copy2(REPO / "data.dvc", tmp_path / "data.dvc")
    cfg = compose_section("cohort", CohortConfig, conf_dir=REPO / "conf")
    generate.run(cfg, tmp_path / "data", workers=2, progress=False)
    # Hash the regenerated tree the way DVC does: data.dvc must come out unchanged.
    sh("dvc", "commit", "--force", "--quiet", "data.dvc")
    assert (tmp_path / "data.dvc").read_text() == (REPO / "data.dvc").read_text(), (
        "the default cohort no longer matches data.dvc: regenerate it and `dvc add data`"
    )
    assert json.loads(sh("dvc", "status", "--json", "data.dvc")) == {}
