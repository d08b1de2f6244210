"""Seeded, bounded fuzzing of the three hand-written DICOM byte walkers: the lean header reader
(:mod:`shiftguard.dicom.binary`), the receive path's UID scan
(:func:`shiftguard.edge.receiver.scan_uids`) and the encapsulated Pixel Data splitter
(``shiftguard.dicom.pixels._fragments``), plus :func:`~shiftguard.dicom.scan.read_headers` over
the walker and its pydicom fallback.

Inputs are valid files broken on purpose (``tests/fuzz_targets.py``); each walker must return a
result consistent with the bytes or raise only its documented errors. ``scripts/fuzz_campaign.py``
runs the same properties for longer.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from fuzz_targets import (
    DICOM_SEEDS,
    check_fragments,
    check_parse_header,
    check_read_header,
    check_read_headers,
    check_scan_uids,
    delimiter,
    dicom_files,
    element,
    encapsulated_values,
    file_meta,
    fuzz,
    image_dataset,
    pydicom_seed,
    time_limit,
)
from hypothesis import given
from hypothesis import strategies as st

from shiftguard.dicom import binary
from shiftguard.dicom.scan import read_headers
from shiftguard.edge.receiver import scan_uids
from shiftguard.errors import UnreadableFileError

FILES = dicom_files((*DICOM_SEEDS, pydicom_seed()))


@fuzz(500)
@given(FILES)
def test_parse_header_returns_a_header_or_a_documented_error(data: bytes) -> None:
    check_parse_header(data)


def test_read_header_rereads_to_the_same_header_or_a_documented_error(tmp_path: Path) -> None:
    @fuzz(200)
    @given(FILES, st.integers(132, 2048))
    def run(data: bytes, first_read: int) -> None:
        check_read_header(data, tmp_path / "f.dcm", first_read)

    run()


@fuzz(500)
@given(FILES)
def test_scan_uids_returns_uids_none_or_value_error(data: bytes) -> None:
    check_scan_uids(data)


@fuzz(300)
@given(encapsulated_values())
def test_fragments_splits_or_raises_value_error(value: bytes) -> None:
    check_fragments(value)


def test_read_headers_raises_only_unreadable_file_error(tmp_path: Path) -> None:
    @fuzz(150)
    @given(FILES)
    def run(data: bytes) -> None:
        check_read_headers(data, tmp_path / "f.dcm")

    run()


# regressions: the minimal examples the fuzzing found -------------------------------------------


def _nested(depth: int, explicit: bool, vr: str = "SQ") -> bytes:
    """``depth`` undefined-length sequences, each in an undefined-length item of the one above."""
    opening = element(0x00081140, vr, None, explicit) + delimiter(0xFFFEE000, 0xFFFFFFFF)
    closing = delimiter(0xFFFEE00D) + delimiter(0xFFFEE0DD)
    return opening * depth + closing * depth


UIDS = element(0x0020000D, "UI", b"1.2\0") + element(0x0020000E, "UI", b"1.3\0")


@pytest.mark.parametrize("explicit", [True, False])
def test_deeply_nested_sequences_do_not_exhaust_the_stack(tmp_path: Path, explicit: bool) -> None:
    ts = binary.EXPLICIT_VR_LE if explicit else binary.IMPLICIT_VR_LE
    data = file_meta(ts) + _nested(2000, explicit) + (UIDS if explicit else b"")
    # the walker declines (pydicom decides), it does not overflow the stack
    with pytest.raises(binary.NeedsFallback, match="nested"):
        binary.parse_header(data)
    assert scan_uids(data) is None  # the receive path falls back to pydicom
    path = tmp_path / "deep.dcm"
    path.write_bytes(data)
    with pytest.raises(UnreadableFileError):
        read_headers(path)


def test_moderate_nesting_is_still_walked() -> None:
    data = file_meta(binary.EXPLICIT_VR_LE) + _nested(50, True) + UIDS
    assert scan_uids(data) == ("1.2", "1.3")
    assert binary.parse_header(data).elements[0x0020000D][1] == b"1.2\0"


def test_a_meta_group_length_past_the_end_does_not_hang() -> None:
    data = bytes(128) + b"DICM" + element(0x00020000, "UL", b"\xff\xff\xff\x7f") + bytes(20)
    with time_limit():  # it walked 8 bytes at a time to 2 GiB: minutes
        assert scan_uids(data) is None


def test_an_undefined_length_un_element_holds_implicit_vr() -> None:
    seed = next(s for s in DICOM_SEEDS if s.name == "un-sequence")
    assert scan_uids(seed.encode()) == check_uids_with_pydicom(seed.encode())


def check_uids_with_pydicom(data: bytes) -> tuple[str, str]:
    import io

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def test_a_value_pydicom_cannot_convert_is_an_unreadable_file(tmp_path: Path) -> None:
    # an explicit VR data set whose ImageType has the VR b"C\0": the walker declines it,
    # pydicom reads it and fails only when the value is converted
    data = element(0x00080005, "CS", b"ISO_IR 100") + b"\x08\x00\x08\x00C\x00\x02\x00AB"
    path = tmp_path / "bad-vr.dcm"
    path.write_bytes(data)
    with pytest.raises(UnreadableFileError, match="Unknown Value Representation"):
        read_headers(path)


def test_a_character_set_with_a_nul_inside_is_decoded_as_an_unknown_one(tmp_path: Path) -> None:
    dataset = image_dataset(True).replace(b"ISO_IR 100", b"IS\0\0IR 100")
    path = tmp_path / "nul-charset.dcm"
    path.write_bytes(file_meta(binary.EXPLICIT_VR_LE) + dataset)
    (header,) = read_headers(path)
    assert header.manufacturer == "ACME"


@pytest.mark.parametrize("fallback", [False, True], ids=["lean", "pydicom"])
def test_rows_that_are_not_a_number_are_a_bad_value(tmp_path: Path, fallback: bool) -> None:
    rows = element(0x00280010, "US", struct.pack("<H", 4))
    dataset = image_dataset(True).replace(rows, element(0x00280010, "IS", b"ab"))
    if fallback:  # nested deeper than the walker follows: pydicom reads it
        dataset = _nested(binary.MAX_NESTING + 1, True) + dataset
    path = tmp_path / "rows.dcm"
    path.write_bytes(file_meta(binary.EXPLICIT_VR_LE) + dataset)
    with pytest.raises(UnreadableFileError, match=r"Rows \(0028,0010\) holds 'ab'"):
        read_headers(path)
