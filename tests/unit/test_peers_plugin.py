"""The rule that a test needing a real peer fails, not skips, where peers are required (CI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]

SAMPLE = """
import pytest

@pytest.mark.peers("no-such-peer-program-xyz")
def test_needs_a_missing_peer():
    pass

@pytest.mark.peers("sh")
def test_needs_a_present_one():
    pass
"""

SKIPS = """
import pytest

@pytest.mark.gpu
def test_gpu_only():
    pytest.skip("needs a CUDA device")

def test_something_else():
    pytest.skip("{reason}")
"""


def _run(folder: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("CI", "SHIFTGUARD_REQUIRE_PEERS")}
    (folder / "pytest.ini").write_text(
        "[pytest]\nmarkers =\n    gpu: needs a CUDA device\n", encoding="utf-8"
    )
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "peers_plugin", "-p", "no:cacheprovider", "-q", "-rsf",
         str(folder)],
        cwd=folder,
        env={**clean, "PYTHONPATH": str(TESTS), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("env", "required"),
    [
        ({}, False),
        ({"SHIFTGUARD_REQUIRE_PEERS": "1"}, True),
        ({"CI": "true"}, True),
        ({"CI": "false"}, False),
        ({"SHIFTGUARD_REQUIRE_PEERS": "0"}, False),
    ],
)
def test_a_missing_peer_skips_on_a_laptop_and_fails_under_ci(
    tmp_path: Path, env: dict[str, str], required: bool
) -> None:
    (tmp_path / "test_sample.py").write_text(SAMPLE, encoding="utf-8")
    out = _run(tmp_path, env)
    text = out.stdout + out.stderr
    assert "no-such-peer-program-xyz" in text  # the message names what is missing
    if required:
        assert out.returncode == 1, text
        assert "1 passed, 1 error" in text and "a missing peer fails the test" in text
    else:
        assert out.returncode == 0, text
        assert "1 passed, 1 skipped" in text
        assert "skipped: 1 (0 gpu-marked, 1 other)" in text


def test_only_gpu_tests_may_skip_where_peers_are_required(tmp_path: Path) -> None:
    (tmp_path / "test_skips.py").write_text(SKIPS.format(reason="no licence"), encoding="utf-8")
    required = _run(tmp_path, {"SHIFTGUARD_REQUIRE_PEERS": "1"})
    text = required.stdout
    assert required.returncode == 1, text
    assert "skipped: 2 (1 gpu-marked, 1 other)" in text
    assert "FAILED: 1 test(s) skipped while peers are required" in text
    listed = text.split("FAILED: 1 test(s) skipped")[1].split("=====")[0]
    assert "test_something_else" in listed and "no licence" in listed
    assert "test_gpu_only" not in listed
    laptop = _run(tmp_path, {})
    assert laptop.returncode == 0 and "skipped: 2 (1 gpu-marked, 1 other)" in laptop.stdout
    gpu_only = tmp_path / "gpu_only"
    gpu_only.mkdir()
    (gpu_only / "test_gpu.py").write_text(SKIPS.split("def test_something_else")[0])
    assert _run(gpu_only, {"SHIFTGUARD_REQUIRE_PEERS": "1"}).returncode == 0
