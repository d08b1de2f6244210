"""Pseudonyms: keyed, stable, and refused with a key that is not the config's."""

from __future__ import annotations

from pathlib import Path

import pytest

from shiftguard.data.identifiers import (
    Pseudonymized,
    Pseudonymizer,
    PseudonymKeyError,
    fingerprint,
    generate_key,
    load_key,
)
from shiftguard.dicom.uid import is_uid


def test_pseudonyms_are_stable_per_key_and_differ_between_keys() -> None:
    a, b = Pseudonymizer(bytes(32)), Pseudonymizer(bytes(range(32)))
    assert a.patient("MRN1") == a.patient("MRN1") != b.patient("MRN1")
    assert a.patient("MRN1") != a.accession("MRN1")  # kinds never collide
    uid = a.uid("1.3.12.2.1107.5.2.43.166003.2020031508151234")
    assert is_uid(uid) and "20200315" not in uid
    assert a.study_date("2020-03-15") == "202003" and a.age("89") == "89" and a.age("95") == "90"
    assert "1.2.3" in Pseudonymized(a, [a.uid("1.2.3")]) and "1.2.4" not in Pseudonymized(a, [])


def test_a_missing_or_other_key_stops_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("SHIFTGUARD_PSEUDONYM_KEY", raising=False)
    with pytest.raises(PseudonymKeyError, match="no pseudonym key"):
        load_key("site", "0" * 16)
    path, key_id = generate_key("site")
    assert path.stat().st_mode & 0o077 == 0
    assert generate_key("site") == (path, key_id)  # kept, never replaced silently
    assert fingerprint(load_key("site", key_id)) == key_id
    with pytest.raises(PseudonymKeyError, match=r"is not data\.key_id"):
        load_key("site", "f" * 16)
