"""Header scan: every file becomes slice headers or a file-level quarantine entry, never a crash."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.uid import ExplicitVRLittleEndian

from shiftguard.dicom import binary
from shiftguard.dicom.scan import _read_with_pydicom, iter_files, read_headers, scan_files
from shiftguard.dicom.testing import SeriesSpec, make_datasets, save_dataset, slice_positions
from shiftguard.errors import UnreadableFileError

# The walker and the pydicom fallback must agree on everything but where the pixels are.
_LOCATION_FIELDS = {"pixel_offset", "pixel_length"}


def _walked(path: str) -> bool:
    try:
        lean = binary.read_header(path)
    except (binary.NeedsFallback, binary.Truncated):
        return False
    return 0x52009230 not in lean.elements and lean.pixel_offset >= 0


_BUNDLED = sorted(p for p in get_testdata_files() if "dicomdirtests" not in p and _walked(p))


@pytest.mark.parametrize("path", _BUNDLED, ids=[Path(p).name for p in _BUNDLED])
def test_the_walker_agrees_with_pydicom_on_bundled_files(path: str) -> None:
    try:
        lean = read_headers(path)
    except UnreadableFileError as err:
        with pytest.raises(UnreadableFileError) as ref_err:
            _read_with_pydicom(path)
        assert ref_err.value.code == err.code
        return
    reference = _read_with_pydicom(path)
    assert len(lean) == len(reference) == 1
    for name in lean[0]._fields:
        if name not in _LOCATION_FIELDS:
            assert getattr(lean[0], name) == getattr(reference[0], name), name


def test_bundled_set_is_not_trivially_small() -> None:
    # The agreement test above is only meaningful when the walker handles many real files.
    assert len(_BUNDLED) >= 30


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("MR_truncated.dcm", "truncated"),
        ("rtplan_truncated.dcm", "truncated"),
        ("badVR.dcm", "bad_value"),
        ("no_meta.dcm", "not_dicom"),
        ("meta_missing_tsyntax.dcm", "missing_uid"),
        ("rtplan.dcm", "not_image"),
        ("reportsi.dcm", "not_image"),
        ("test-SR.dcm", "not_image"),
        ("waveform_ecg.dcm", "not_image"),
        ("rtstruct.dcm", "not_image"),
        ("crayons.icc", "not_dicom"),
        ("zipMR.gz", "not_dicom"),
        ("dicomdirtests/DICOMDIR", "dicomdir"),
        ("dicomdirtests/DICOMDIR-bigEnd", "dicomdir"),
        ("dicomdirtests/DICOMDIR-implicit", "dicomdir"),
    ],
)
def test_malformed_and_non_image_files_are_quarantined(
    bundled: Callable[[str], Path], name: str, code: str
) -> None:
    path = bundled(name)
    headers, issues = scan_files([path])
    assert headers == []
    assert len(issues) == 1
    issue = issues[0]
    assert (issue.level, issue.code) == ("file", code)
    assert issue.path == str(path)
    assert issue.reason and issue.fix


def test_not_an_image_says_so(bundled: Callable[[str], Path]) -> None:
    _, issues = scan_files([bundled("rtplan.dcm")])
    assert "not an image" in issues[0].reason
    assert "RT Plan" in issues[0].reason


def test_truncated_pixel_data_is_caught_by_the_scan(bundled: Callable[[str], Path]) -> None:
    # pydicom reads this header happily; only the pixel length betrays the truncation.
    pydicom.dcmread(bundled("MR_truncated.dcm"), stop_before_pixels=True)
    with pytest.raises(UnreadableFileError, match="truncated"):
        read_headers(bundled("MR_truncated.dcm"))


def test_junk_never_crashes_the_scan(tmp_path: Path, bundled: Callable[[str], Path]) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "random.bin").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (tmp_path / "notes.txt").write_text("not a dicom file\n" * 40)
    (tmp_path / "fake_magic.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 300)
    good = bundled("MR_small.dcm").read_bytes()
    (tmp_path / "cut_in_header.dcm").write_bytes(good[:700])
    (tmp_path / "cut_in_meta.dcm").write_bytes(good[:150])
    files = sorted(iter_files(tmp_path))
    headers, issues = scan_files(files)
    assert headers == []
    assert sorted(i.path for i in issues) == sorted(str(f) for f in files)
    codes = {Path(i.path).name: i.code for i in issues}
    assert codes["empty"] == "not_dicom"
    assert codes["notes.txt"] == "not_dicom"
    assert codes["cut_in_header.dcm"] == "truncated"
    assert all(i.level == "file" and i.reason and i.fix for i in issues)


def test_header_fields(tmp_path: Path) -> None:
    spec = SeriesSpec(n_slices=1, rescale_slope=2.5, rescale_intercept=-10)
    path = save_dataset(make_datasets(spec)[0], tmp_path / "a.dcm")
    (h,) = read_headers(path)
    assert h.series_uid == spec.series_uid and h.study_uid == spec.study_uid
    assert (h.modality, h.rows, h.cols) == ("MR", spec.rows, spec.cols)
    assert h.iop == spec.iop
    assert h.ipp == pytest.approx(tuple(slice_positions(spec)[0]))
    assert h.pixel_spacing == spec.pixel_spacing
    assert (h.rescale_slope, h.rescale_intercept) == (2.5, -10.0)
    assert (h.patient_id, h.patient_age, h.institution, h.model) == (
        "SYN001",
        "045Y",
        "Test Hospital",
        "Phantom 3T",
    )
    assert (h.bits_allocated, h.bits_stored, h.pixel_representation) == (16, 12, 0)
    assert h.transfer_syntax == ExplicitVRLittleEndian
    assert h.pixel_offset > 0 and h.pixel_length == spec.rows * spec.cols * 2


def test_file_without_preamble_or_meta_is_read_with_force(tmp_path: Path) -> None:
    ds = make_datasets(SeriesSpec(n_slices=1))[0]
    reference = read_headers(save_dataset(ds, tmp_path / "with_meta.dcm"))[0]
    bare = make_datasets(SeriesSpec(n_slices=1))[0]
    bare.update({k: v for k, v in ds.items()})  # same values
    del bare.file_meta
    bare.preamble = None
    path = tmp_path / "bare.dcm"
    bare.save_as(path, implicit_vr=False, little_endian=True)
    assert path.read_bytes()[128:132] != b"DICM"
    (h,) = read_headers(path)
    for name in h._fields:
        if name not in _LOCATION_FIELDS | {"path"}:
            assert getattr(h, name) == getattr(reference, name), name


def test_missing_transfer_syntax_in_meta_is_guessed(tmp_path: Path) -> None:
    ds = make_datasets(SeriesSpec(n_slices=1))[0]
    path = save_dataset(ds, tmp_path / "a.dcm")
    raw = path.read_bytes()
    # Blank the TransferSyntaxUID value in place (same length, so offsets stay valid).
    ts = ExplicitVRLittleEndian.encode()
    assert raw.count(ts) >= 1
    start = raw.index(b"\x02\x00\x10\x00UI")
    length = int.from_bytes(raw[start + 6 : start + 8], "little")
    patched = raw[: start + 8] + b"\0" * length + raw[start + 8 + length :]
    path.write_bytes(patched)
    (h,) = read_headers(path)
    assert h.transfer_syntax == ExplicitVRLittleEndian
    assert h.rows == 16


def test_iter_files_is_sorted_and_recursive(tmp_path: Path) -> None:
    for rel in ["b/2", "a/z/1", "a/10", "c", "a/2"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    found = [p.relative_to(tmp_path).as_posix() for p in iter_files(tmp_path)]
    assert found == ["a/10", "a/2", "a/z/1", "b/2", "c"]


@pytest.mark.parametrize(
    ("charset", "name"),
    [
        ("ISO_IR 100", "Hôpital Saint-Éloi"),
        ("ISO_IR 192", "Hôpital Saint-Éloi 東京"),
        ("", "Plain"),
    ],
)
def test_text_is_decoded_with_the_specific_character_set(
    tmp_path: Path, charset: str, name: str
) -> None:
    ds = make_datasets(SeriesSpec(n_slices=1, institution=name))[0]
    if charset:
        ds.SpecificCharacterSet = charset
    else:
        del ds.SpecificCharacterSet
    path = save_dataset(ds, tmp_path / "a.dcm")
    (lean,) = read_headers(path)
    (reference,) = _read_with_pydicom(str(path))
    assert lean.institution == reference.institution == name
