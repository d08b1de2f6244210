"""Finding peer programs where Debian installs them, not only on $PATH."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from shiftguard import peers
from shiftguard.peers import PeerMissingError, find_tool, tool


def _program(folder: Path, name: str, executable: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\nexit 0\n")
    if executable:
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_a_program_in_sbin_is_found_without_sbin_on_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Debian installs Orthanc in /usr/sbin, which a normal user's $PATH lacks."""
    sbin = tmp_path / "sbin"
    orthanc = _program(sbin, "Orthanc-test")
    _program(sbin, "not-executable", executable=False)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setattr(peers, "SYSTEM_DIRS", (str(sbin),))
    assert find_tool("Orthanc-test") == str(orthanc)
    assert find_tool("not-executable") is None
    first = _program(tmp_path / "bin", "Orthanc-test")
    assert find_tool("Orthanc-test") == str(first)  # $PATH first
    with pytest.raises(PeerMissingError, match=r"Orthanc: not installed.*package orthanc"):
        tool("Orthanc")


def test_postgres_programs_are_found_in_the_newest_versioned_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for version in ("9.6", "15", "13"):
        _program(tmp_path / "postgresql" / version / "bin", "initdb-test")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setattr(peers, "SYSTEM_DIRS", ())
    monkeypatch.setattr(peers, "POSTGRES_DIRS", str(tmp_path / "postgresql" / "*" / "bin"))
    assert find_tool("initdb-test") == str(tmp_path / "postgresql" / "15" / "bin" / "initdb-test")


def test_a_peer_is_never_the_python_environments_program_of_the_same_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pynetdicom installs its own storescu in the environment's bin, which an activated
    environment puts first on $PATH; the peer is dcmtk's, further along."""
    venv_bin, system_bin = tmp_path / "venv" / "bin", tmp_path / "usr" / "bin"
    _program(venv_bin, "storescu")
    dcmtk = _program(system_bin, "storescu")
    mine = _program(venv_bin, "shiftguard-helper")
    monkeypatch.setenv("PATH", f"{venv_bin}:{system_bin}")
    monkeypatch.setattr(peers, "_python_scripts", lambda: {venv_bin.resolve()})
    assert find_tool("storescu") == str(dcmtk)
    assert find_tool("shiftguard-helper") == str(mine)  # not a peer: found where it is


def test_a_peer_is_never_a_python_program_from_another_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another project's activated environment on $PATH holds pynetdicom's storescu, a Python
    console script this environment's folder check does not see; dcmtk's comes after it."""
    other_bin, system_bin = tmp_path / "other-venv" / "bin", tmp_path / "usr" / "bin"
    other_bin.mkdir(parents=True)
    script = other_bin / "storescu"
    script.write_text("#!/opt/other/bin/python3\nfrom pynetdicom.apps.storescu import main\n")
    script.chmod(0o755)
    dcmtk = _program(system_bin, "storescu")
    monkeypatch.setenv("PATH", f"{other_bin}:{system_bin}")
    assert find_tool("storescu") == str(dcmtk)
