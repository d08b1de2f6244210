from __future__ import annotations

import os
from pathlib import Path

import pytest

from shiftguard.utils import env_workers, loader_workers, write_csv


def test_worker_counts_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHIFTGUARD_WORKERS", raising=False)
    monkeypatch.delenv("SHIFTGUARD_LOADER_WORKERS", raising=False)
    assert env_workers() == (os.cpu_count() or 1)
    assert env_workers(default=3) == 3
    assert loader_workers() == max(0, min(4, (os.cpu_count() or 1) - 2))
    monkeypatch.setenv("SHIFTGUARD_WORKERS", "5")
    monkeypatch.setenv("SHIFTGUARD_LOADER_WORKERS", "0")  # 0: load in the training process
    assert env_workers(default=3) == 5
    assert loader_workers() == 0


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("SHIFTGUARD_WORKERS", "two", "SHIFTGUARD_WORKERS='two' is not an integer"),
        ("SHIFTGUARD_WORKERS", "0", "SHIFTGUARD_WORKERS='0' must be at least 1"),
        ("SHIFTGUARD_LOADER_WORKERS", "-1", "SHIFTGUARD_LOADER_WORKERS='-1' must be at least 0"),
    ],
)
def test_bad_worker_counts_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        env_workers() if name == "SHIFTGUARD_WORKERS" else loader_workers()


def test_write_csv_orders_columns_fills_gaps_and_keeps_the_line_ends_asked_for(
    tmp_path: Path,
) -> None:
    rows = [{"b": 2, "a": 1, "extra": "x"}, {"a": 3}]
    path = write_csv(tmp_path / "deep" / "t.csv", ["a", "b"], rows)
    assert path.read_bytes() == b"a,b\n1,2\n3,\n"
    write_csv(path, ["a", "b"], rows, line_end="\r\n")
    assert path.read_bytes() == b"a,b\r\n1,2\r\n3,\r\n"
    assert [p.name for p in path.parent.iterdir()] == ["t.csv"]  # no temporary file left
    with pytest.raises(ValueError, match="extra"):
        write_csv(path, ["a", "b"], rows, extras="raise")
    assert path.read_bytes() == b"a,b\r\n1,2\r\n3,\r\n"  # a refused table leaves the old one
    assert [p.name for p in path.parent.iterdir()] == ["t.csv"]
