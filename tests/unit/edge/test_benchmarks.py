"""The edge benchmarks run end to end on a tiny project, against the code as it is (nothing is timed
here): a benchmark that no longer fits the code fails the suite, not its next reader. It happened:
``edge_serve_latency.py`` read the service's old hand-built histogram after ``/metrics`` moved to
``prometheus_client``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

pytestmark = [pytest.mark.integration, pytest.mark.peers("Orthanc", "storescu", "storescp")]


@pytest.mark.parametrize(
    ("script", "args", "printed"),
    [
        ("edge_predict.py", ["--repeats", "1"], "whole predict path"),
        (
            "edge_serve_latency.py",
            ["--studies", "1", "--rounds", "1", "--receive-studies", "1"],
            "receive throughput",
        ),
        (
            "edge_study_size.py",
            ["--sizes", "10", "--repeats", "1", "--receive-mib", "10", "--receive-rounds", "1"],
            "receive throughput, one",
        ),
    ],
)
def test_an_edge_benchmark_runs_on_a_tiny_project(
    tmp_path: Path, bundle_path: Path, cohort: Path, script: str, args: list[str], printed: str
) -> None:
    # the layout the benchmarks read: a bundle in artifacts/export, the cohort in data/dicom
    (tmp_path / "artifacts" / "export").mkdir(parents=True)
    shutil.copy(bundle_path, tmp_path / "artifacts" / "export" / bundle_path.name)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dicom").symlink_to(cohort, target_is_directory=True)
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )  # fmt: skip
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-3000:])
    assert printed in run.stdout
