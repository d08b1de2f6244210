"""The DICOM binary layer against pydicom on every file pydicom ships: the tag table, the walker's raw
values, the file meta group, the early stop of the receive path, and the element encoder."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.filereader import read_file_meta_info

from shiftguard.dicom import binary
from shiftguard.edge.scp import file_meta

# the files pydicom ships (get_testdata_files would also try to download its larger set)
_SHIPPED = sorted(
    p
    for p in (Path(pydicom.data.__file__).parent / "test_files").rglob("*")
    if p.is_file() and p.stat().st_size < 2_000_000
)


def _walked(raw: bytes, fields: binary.Fields = binary.HEADER_FIELDS) -> binary.Header | None:
    try:
        return binary.parse_header(raw, fields)
    except (binary.NeedsFallback, binary.Truncated):
        return None


def _pydicom(raw: bytes) -> pydicom.Dataset | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True, force=True)
    except Exception:
        return None


def test_the_tag_table_is_pydicoms_dictionary() -> None:
    assert len(binary.TAGS) == len(binary.KEYWORDS)  # no keyword twice
    for keyword, tag in binary.TAGS.items():  # built from the dictionary: each has one plain VR
        assert binary.WANTED[tag].encode() in binary.VALID_VRS, keyword
    assert binary.tag_name(binary.TAGS["Rows"]) == "Rows (0028,0010)"
    assert binary.tag_name(0x00091001) == "(0009,1001)"  # private: the tag alone


def test_the_walker_keeps_the_bytes_pydicom_reads_for_every_wanted_tag() -> None:
    compared = 0
    for path in _SHIPPED:
        raw = path.read_bytes()
        header, ds = _walked(raw), _pydicom(raw)
        if header is None or ds is None or header.pixel_offset < 0:
            continue
        compared += 1
        for tag in binary.WANTED:
            if tag >> 16 == 0x0002:
                continue  # the file meta group: the next test
            assert (tag in header.elements) == (tag in ds), (path.name, binary.tag_name(tag))
            item = ds.get_item(tag) if tag in ds else None
            if item is not None and isinstance(item.value, bytes):  # still raw: pydicom's bytes
                assert header.elements[tag][1] == item.value, (path.name, binary.tag_name(tag))
        assert raw[header.pixel_offset - 4 : header.pixel_offset] == (
            header.pixel_length.to_bytes(4, "little")
            if header.pixel_length >= 0
            else b"\xff\xff\xff\xff"
        ), path.name
    assert compared >= 40


def test_the_file_meta_group_agrees_with_pydicom() -> None:
    compared = 0
    for path in _SHIPPED:
        raw = path.read_bytes()
        try:
            meta = binary.parse_meta(raw)
        except (binary.NeedsFallback, binary.Truncated):
            continue
        try:
            expected = read_file_meta_info(str(path))
        except Exception:
            continue
        compared += 1
        assert set(meta) == {int(e.tag) for e in expected}, path.name
        for element in expected:
            value = meta[int(element.tag)][1]
            if element.VR in ("UI", "SH", "AE"):
                assert value.decode("ascii", "replace").strip("\x00 ") == str(element.value).strip(
                    "\x00 "
                ), path.name
    assert compared >= 40


def test_stopping_once_found_gives_what_the_whole_walk_gives() -> None:
    study, series = binary.TAGS["StudyInstanceUID"], binary.TAGS["SeriesInstanceUID"]
    early = binary.Fields((study, series), stop_when_found=True)
    compared = 0
    for path in _SHIPPED:
        raw = path.read_bytes()
        whole, stopped = _walked(raw), _walked(raw, early)
        if whole is None:
            continue
        assert stopped is not None, path.name
        compared += 1
        for tag in (study, series):
            assert stopped.text(tag) == whole.text(tag), path.name
        if stopped.text(study) is not None and stopped.text(series) is not None:
            assert stopped.pixel_offset == -1  # it did not walk on to Pixel Data
    assert compared >= 40


@pytest.mark.parametrize(
    "ts", [binary.EXPLICIT_VR_LE, binary.IMPLICIT_VR_LE, "1.2.840.10008.1.2.4.90"]
)
def test_the_encoded_file_meta_reads_back_in_pydicom_and_the_walker(
    tmp_path: Path, ts: str
) -> None:
    meta = file_meta("1.2.840.10008.5.1.4.1.1.4", "1.2.3.45", ts, "MODALITY")
    (tmp_path / "meta.dcm").write_bytes(meta)
    expected = read_file_meta_info(tmp_path / "meta.dcm")
    assert expected.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
    assert expected.MediaStorageSOPInstanceUID == "1.2.3.45"
    assert expected.TransferSyntaxUID == ts
    assert expected.SourceApplicationEntityTitle == "MODALITY"
    assert expected.FileMetaInformationVersion == b"\x00\x01"
    walked = binary.parse_meta(meta)
    assert walked[binary.MEDIA_SOP_INSTANCE_TAG][1] == b"1.2.3.45"  # 8 characters: no padding
    assert walked[0x00020000][1] == (len(meta) - 132 - 12).to_bytes(4, "little")


def test_an_element_has_the_long_header_only_for_long_vrs() -> None:
    assert binary.explicit_element(0x00100010, b"PN", b"A^B ") == b"\x10\x00\x10\x00PN\x04\x00A^B "
    assert binary.explicit_element(0x00020001, b"OB", b"\x00\x01") == (
        b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01"
    )
