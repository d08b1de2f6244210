from __future__ import annotations

from pathlib import Path

import pytest

from shiftguard import __version__
from shiftguard.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_config_check_passes_on_the_committed_params(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(REPO)
    assert main(["config", "check"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_config_check_fails_and_shows_the_diff_when_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(REPO)
    stale = tmp_path / "params.yaml"
    stale.write_text((REPO / "params.yaml").read_text().replace("min_slices: 8", "min_slices: 3"))
    assert main(["config", "check", "--params", str(stale)]) == 1
    out = capsys.readouterr()
    assert "-  min_slices: 3" in out.out and "+  min_slices: 8" in out.out
    assert "out of date" in out.err


def test_config_dump_applies_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    out = tmp_path / "p.yaml"
    assert main(["config", "dump", "--out", str(out), "ingest.min_slices=5"]) == 0
    assert "min_slices: 5" in out.read_text()


def test_bad_input_exits_2_with_the_key_and_no_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(REPO)
    assert main(["config", "show", "ingest.min_slices=0"]) == 2
    assert (
        "ingest.min_slices: Input should be greater than or equal to 1" in capsys.readouterr().err
    )
    assert main(["split", "--manifest", "/nonexistent/manifest.csv"]) == 2
    err = capsys.readouterr().err
    assert "/nonexistent/manifest.csv: file not found" in err
    assert "Traceback" not in err


def test_config_dump_refuses_an_invalid_config_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    out = tmp_path / "p.yaml"
    assert main(["config", "dump", "--out", str(out), "split.fractions.test=0.5"]) == 2
    assert not out.exists()
