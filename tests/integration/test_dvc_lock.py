"""The committed dvc.lock matches the committed code: a change to a stage's code or parameters must
come with `dvc repro` (otherwise a fresh clone's first `dvc repro` rewrites dvc.lock)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_code_and_params_deps_in_dvc_lock_are_current() -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["dvc", "status", "--json"], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    stale = []
    for stage, changes in json.loads(result.stdout or "{}").items():
        for change in changes:
            if not isinstance(change, dict):
                continue
            for path, state in change.get("changed deps", {}).items():
                # Raw data and upstream outputs may be absent in a fresh clone; code may not differ.
                if path.startswith(("src/", "pipelines/", "conf/", "params.yaml")):
                    stale.append(f"{stage}: {path} {state}")
    assert not stale, "dvc.lock is stale, run `dvc repro` and commit it:\n" + "\n".join(stale)
