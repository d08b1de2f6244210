"""The derived template is kept on disk between processes, byte for byte."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from shiftguard.cohort import template as tpl


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv(tpl.CACHE_ENV, str(tmp_path / "cache"))
    tpl.load_template.cache_clear()
    yield tmp_path / "cache"
    tpl.load_template.cache_clear()


def test_a_cached_template_reads_back_identical(cache: Path) -> None:
    derived = tpl.load_template()  # derives and writes the cache
    folder = cache / f"template-{tpl.template_key()}"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{f.name}.npy" for f in fields(tpl.Template)
    )
    tpl.load_template.cache_clear()
    read = tpl.load_template()
    assert read is not derived
    for f in fields(tpl.Template):
        a, b = getattr(derived, f.name), getattr(read, f.name)
        assert a.dtype == b.dtype and a.shape == b.shape, f.name
        assert np.array_equal(a, b, equal_nan=True), f.name


def test_a_damaged_cache_is_derived_again(cache: Path) -> None:
    derived = tpl.load_template()
    folder = cache / f"template-{tpl.template_key()}"
    (folder / "channels.npy").write_bytes(b"\x93NUMPY truncated")
    tpl.load_template.cache_clear()
    again = tpl.load_template()
    assert np.array_equal(again.channels, derived.channels)
    repaired = tpl._read_cached(folder)  # written afresh, so later processes read it again
    assert repaired is not None and np.array_equal(repaired.channels, derived.channels)


def test_the_cache_folder_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(tpl.CACHE_ENV, "")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert tpl.cache_dir() is None
    monkeypatch.delenv(tpl.CACHE_ENV)
    assert tpl.cache_dir() == tmp_path / ".cache" / "shiftguard"
