"""Fixtures for the DICOM tests: pydicom's bundled files and the synthetic series writer.

The writer itself is :mod:`shiftguard.dicom.testing` (importable from every test folder); these
fixtures only locate pydicom's bundled test files and skip when one is missing.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from peers_plugin import peer_missing
from pydicom.data import get_testdata_file


def _bundled(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        peer_missing(f"pydicom test file {name} is not bundled with this pydicom")
    return Path(str(path))


@pytest.fixture
def bundled() -> Callable[[str], Path]:
    """Path of one of pydicom's bundled test files (skips the test if it is absent, fails it
    where peers are required)."""
    return _bundled


@pytest.fixture
def copy_bundled(tmp_path: Path) -> Callable[..., Path]:
    """Copy bundled test files into ``tmp_path / folder`` and return that folder."""

    def copy(*names: str, folder: str = "in") -> Path:
        dest = tmp_path / folder
        dest.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy(_bundled(name), dest / name)
        return dest

    return copy
